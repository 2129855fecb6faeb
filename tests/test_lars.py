import contextlib
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.isolated import run_script
from tf_simclr.optim.factory import build_optimizer
from tf_simclr.optim.lars import LARS
from tf_simclr.optim.schedules import WarmupCosineDecay


def var(value, scope="", name="kernel"):
    # Nested name scopes give a path like 'simclr/trunk/conv/kernel'.
    with contextlib.ExitStack() as stack:
        for part in filter(None, scope.split("/")):
            stack.enter_context(keras.name_scope(part))
        return keras.Variable(np.asarray(value, np.float32), name=name)


def numpy_lars(w, grads, lr, momentum, wd, eeta, decay, adapt, nesterov):
    """Independent re-statement of the update for several steps."""
    w = np.asarray(w, np.float64)
    v = np.zeros_like(w)
    for g in grads:
        g = np.asarray(g, np.float64) + (wd * w if decay else 0.0)
        trust = 1.0
        if adapt:
            wn, gn = np.linalg.norm(w), np.linalg.norm(g)
            trust = eeta * wn / gn if wn > 0 and gn > 0 else 1.0
        v = momentum * v + lr * trust * g
        w = w - (momentum * v + lr * trust * g if nesterov else v)
    return w


def test_single_update_hand_math():
    opt = LARS(0.1, momentum=0.9, weight_decay=0.1, eeta=0.01)
    kernel = var([3.0, 4.0], "block")
    bias = var([1.0, 1.0], "block", "bias")
    opt.apply_gradients([(tf.constant([0.5, -1.0]), kernel), (tf.constant([1.0, 2.0]), bias)])
    # kernel: g' = g + 0.1 w = [0.8, -0.6], |g'| = 1, |w| = 5, trust = 0.01*5/1 = 0.05,
    # v = 0.1 * 0.05 * g' = [0.004, -0.003].
    np.testing.assert_allclose(kernel.numpy(), [2.996, 4.003], rtol=1e-6)
    # bias: no decay, no adaptation -> w - lr * g.
    np.testing.assert_allclose(bias.numpy(), [0.9, 0.8], rtol=1e-6)


def test_zero_norm_cases():
    opt = LARS(0.5, momentum=0.9, weight_decay=0.0)
    zero_w = var([0.0, 0.0], "a")
    zero_g = var([1.0, -2.0], "b")
    opt.apply_gradients([(tf.constant([1.0, 0.0]), zero_w), (tf.constant([0.0, 0.0]), zero_g)])
    # ||w|| = 0 -> trust 1 (not 0): a plain SGD step.
    np.testing.assert_allclose(zero_w.numpy(), [-0.5, 0.0])
    # ||g|| = 0 -> trust 1, no NaN from 0/0, weights unchanged.
    np.testing.assert_allclose(zero_g.numpy(), [1.0, -2.0])


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_over_steps_matches_numpy(nesterov):
    rng = np.random.default_rng(1)
    init = {"k": rng.normal(size=(3, 2)), "gamma": rng.normal(size=(2,)),
            "head": rng.normal(size=(2, 2))}
    grads = [{k: rng.normal(size=v.shape) for k, v in init.items()} for _ in range(3)]
    variables = {"k": var(init["k"], "trunk/conv"),
                 "gamma": var(init["gamma"], "trunk/bn", "gamma"),
                 "head": var(init["head"], "head_supervised")}
    opt = LARS(0.2, momentum=0.9, weight_decay=1e-2, eeta=0.01, nesterov=nesterov)
    for g in grads:
        opt.apply_gradients([(tf.constant(g[k], tf.float32), variables[k]) for k in init])
    for k, excluded in (("k", False), ("gamma", True), ("head", True)):
        expected = numpy_lars(init[k], [g[k] for g in grads], 0.2, 0.9, 1e-2, 0.01,
                              decay=not excluded, adapt=not excluded, nesterov=nesterov)
        np.testing.assert_allclose(variables[k].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_exclusion_matches_path_not_short_name():
    # All three are named 'kernel'; only their path differs.
    plain = var([3.0, 4.0], "simclr/trunk/conv")
    head = var([3.0, 4.0], "simclr/head_supervised")
    custom = var([3.0, 4.0], "simclr/proj_head")
    assert head.path == "simclr/head_supervised/kernel" and head.name == "kernel"
    g = tf.constant([0.0, 1.0])
    opt = LARS(1.0, momentum=0.0, weight_decay=0.5, eeta=1.0,
               exclude_from_weight_decay=("head_supervised",),
               exclude_from_layer_adaptation=("head_supervised", "proj_head"))
    opt.apply_gradients([(g, plain), (g, head), (g, custom)])
    # plain: g' = [1.5, 3], trust = 5 / |g'| -> step of norm 5 along g'.
    gp = np.array([1.5, 3.0])
    np.testing.assert_allclose(plain.numpy(), [3.0, 4.0] - 5 * gp / np.linalg.norm(gp), rtol=1e-6)
    np.testing.assert_allclose(head.numpy(), [3.0, 3.0])          # neither decay nor trust
    np.testing.assert_allclose(custom.numpy(), [1.5, 1.0])        # decay, no trust


def test_layer_adaptation_defaults_to_weight_decay_exclusions():
    opt = LARS(0.1, exclude_from_weight_decay=("foo",))
    assert opt.adaptation_exclusions == ("foo",)
    assert LARS(0.1, exclude_from_layer_adaptation=()).adaptation_exclusions == ()


def test_weight_decay_not_in_keras_base():
    opt = LARS(0.1, weight_decay=1e-4)
    assert opt.weight_decay is None  # Keras' decoupled decay stays off


def test_get_config_round_trip():
    schedule = WarmupCosineDecay(0.3, 256, 1000, 1, 40)
    opt = LARS(schedule, momentum=0.8, weight_decay=1e-6, eeta=0.002,
               exclude_from_weight_decay=("bias",), nesterov=True)
    clone = LARS.from_config(opt.get_config())
    assert clone.get_config() == opt.get_config()
    assert clone.momentum == 0.8 and clone.l2_weight_decay == 1e-6 and clone.nesterov
    assert clone.adaptation_exclusions == ("bias",)
    assert float(clone.learning_rate) == pytest.approx(float(opt.learning_rate))
    clone2 = LARS.from_config(LARS(0.1, exclude_from_layer_adaptation=["x"]).get_config())
    assert clone2.adaptation_exclusions == ("x",) and clone2.wd_exclusions[0] == "gamma"


def test_build_optimizer():
    lars = build_optimizer("lars", 0.5, momentum=0.8, weight_decay=1e-6)
    assert isinstance(lars, LARS) and lars.momentum == 0.8 and lars.l2_weight_decay == 1e-6
    sgd = build_optimizer("momentum", 0.1, momentum=0.9, weight_decay=1e-4)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.momentum == 0.9
    assert sgd.weight_decay is None
    adam = build_optimizer("adam", 1e-3, weight_decay=1e-4)
    assert isinstance(adam, keras.optimizers.Adam) and adam.weight_decay is None
    with pytest.raises(ValueError, match="lars, momentum, adam"):
        build_optimizer("rmsprop", 0.1)


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json
    import keras
    import numpy as np
    import tensorflow as tf
    R = 2
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * R)
    from tf_simclr.optim.lars import LARS

    def make_model():
        inp = keras.Input((4,))
        x = keras.layers.Dense(6, activation="tanh", name="trunk")(inp)
        out = keras.layers.Dense(3, name="head_supervised")(x)
        return keras.Model(inp, out, name="simclr")

    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.normal(size=(8, 3)).astype(np.float32)
    steps = 3

    def loss_fn(model, xb, yb, scale):
        return tf.reduce_mean(tf.square(model(xb) - yb)) * scale

    single = make_model()
    init = [v.numpy() for v in single.trainable_variables]
    opt = LARS(0.5, weight_decay=1e-2, eeta=0.01)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(single, x, y, 1.0)
        opt.apply_gradients(zip(tape.gradient(loss, single.trainable_variables),
                                single.trainable_variables))

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(R)])
    with strategy.scope():
        model = make_model()
        for v, w in zip(model.trainable_variables, init):
            v.assign(w)
        dopt = LARS(0.5, weight_decay=1e-2, eeta=0.01)
        dopt.build(model.trainable_variables)
    shard = len(x) // R
    data = strategy.experimental_distribute_values_from_function(
        lambda ctx: (x[ctx.replica_id_in_sync_group * shard:(ctx.replica_id_in_sync_group + 1) * shard],
                     y[ctx.replica_id_in_sync_group * shard:(ctx.replica_id_in_sync_group + 1) * shard]))

    @tf.function
    def train_step(batch):
        xb, yb = batch
        with tf.GradientTape() as tape:
            # apply_gradients sums over replicas: scale to a global mean.
            loss = loss_fn(model, xb, yb, 1.0 / R)
        dopt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                 model.trainable_variables))

    for _ in range(steps):
        strategy.run(train_step, args=(data,))
    err = max(float(np.abs(a.numpy() - b.numpy()).max())
              for a, b in zip(model.trainable_variables, single.trainable_variables))
    moved = max(float(np.abs(a.numpy() - b).max())
                for a, b in zip(single.trainable_variables, init))
    print("RESULT" + json.dumps({"err": err, "moved": moved}))
""")


def test_lars_under_mirrored_strategy_matches_single_device():
    out = run_script(_MIRRORED_SCRIPT)
    assert out["moved"] > 1e-3
    assert out["err"] < 1e-5, out
