import math

import pytest

from tf_simclr.optim.schedules import (WarmupCosineDecay, scaled_learning_rate,
                                       total_train_steps, warmup_steps)


def test_scaled_learning_rate():
    assert scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    with pytest.raises(ValueError, match="linear"):
        scaled_learning_rate(0.1, 256, "cubic")


def test_total_and_warmup_steps():
    assert total_train_steps(1000, 10, 0, 512) == 20        # 10000 // 512 + 1
    assert total_train_steps(1000, 10, None, 512) == 20
    assert total_train_steps(1000, 10, 7, 512) == 7
    assert total_train_steps(1281167, 100, None, 4096) == 31279
    assert warmup_steps(1000, 2, 512) == 3                  # 2000 // 512
    assert warmup_steps(1281167, 10, 4096) == 3127
    assert warmup_steps(1000, 0.5, 100) == 5
    assert warmup_steps(1000, 0, 512) == 0


def schedule_value(schedule, step):
    return float(schedule(step))


def test_warmup_cosine_linear_values():
    # N=1000, B=512: warmup 3 steps, total 20, peak 0.3 * 2 = 0.6, decay over 17 steps.
    s = WarmupCosineDecay(0.3, 512, 1000, 2, total_train_steps(1000, 10, None, 512))
    assert schedule_value(s, 0) == 0.0
    assert schedule_value(s, 1) == pytest.approx(0.2)
    assert schedule_value(s, 2) == pytest.approx(0.4)
    assert schedule_value(s, 3) == pytest.approx(0.6)        # end of warmup = peak
    assert schedule_value(s, 3 + 8.5) == pytest.approx(0.3)  # half-way through the cosine
    assert schedule_value(s, 3 + 17 / 3) == pytest.approx(0.3 * (1 + math.cos(math.pi / 3)))
    assert schedule_value(s, 20) == pytest.approx(0.0, abs=1e-7)
    assert schedule_value(s, 30) == pytest.approx(0.0, abs=1e-7)


def test_warmup_cosine_sqrt_and_no_warmup():
    s = WarmupCosineDecay(0.1, 64, 640, 0, 100, scaling="sqrt")
    assert schedule_value(s, 0) == pytest.approx(0.8)        # no warmup: starts at peak
    assert schedule_value(s, 50) == pytest.approx(0.4)
    assert schedule_value(s, 100) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        WarmupCosineDecay(0.1, 64, 640, 0, 100, scaling="bogus")


def test_schedule_config_round_trip():
    s = WarmupCosineDecay(0.3, 512, 1000, 2, 20, scaling="sqrt")
    clone = WarmupCosineDecay.from_config(s.get_config())
    assert clone.get_config() == s.get_config()
    for step in (0, 2, 3, 11, 20):
        assert schedule_value(clone, step) == schedule_value(s, step)
