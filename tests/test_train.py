"""run.py end to end on real Fashion-MNIST (tiny model, few steps): pretrain, finetune,
distill, eval, checkpoints, resume, result.json, and one-line errors for bad flags."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import precision as precision_lib
from tf_simclr.train import evaluation, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--dataset=fashion_mnist", "--train_split=train[:2048]", "--eval_split=test[:512]",
        "--image_size=16", "--resnet_depth=10", "--width_multiplier=0.125",
        "--proj_out_dim=16", "--global_bn=false", "--cache_dataset=true",
        "--train_batch_size=64", "--eval_batch_size=128", "--steps_per_loop=2", "--seed=1",
        # Exports at the end of training are tested where they are read (test_distill,
        # test_distributed); here they would add ~10 s per run.
        "--keep_hub_module_max=0"]


def run(*args, check=True):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *TINY, *args],
                       cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  if check:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out


def result(model_dir):
  with open(os.path.join(model_dir, "result.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("pretrain"))
  out = run("--train_mode=pretrain", "--mode=train_then_eval", "--train_steps=6",
            "--checkpoint_steps=3", "--learning_rate=0.5", "--warmup_epochs=0",
            "--knn_monitor", "--knn_k=20", "--precision=auto", f"--model_dir={model_dir}")
  return model_dir, out


def test_pretrain_writes_checkpoints_results_and_summaries(pretrained):
  model_dir, out = pretrained
  assert "step 6/6" in out.stdout and "img/s" in out.stdout and "ETA" in out.stdout
  # The recipes' --precision=auto, resolved for this machine's CPU.
  assert f"Precision: auto -> {precision_lib.native_precision()}" in out.stdout
  assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-6")
  assert os.path.exists(os.path.join(model_dir, "ckpt-3.index"))
  res = result(model_dir)
  assert res["global_step"] == 6
  assert 0 <= res["eval/label_top_1_accuracy"] <= res["eval/label_top_5_accuracy"] <= 1
  assert res["eval/num_examples"] == 512
  # The kNN monitor: 512 test images against the 2,048 training images; random features of
  # this trunk already score well above chance (0.1).
  assert 0.2 < res["eval/knn_top_1_accuracy"] <= 1
  assert "kNN monitor: top-1" in out.stdout and "2048 training images" in out.stdout
  with open(os.path.join(model_dir, "result_6.json")) as f:
    assert json.load(f) == res
  with open(os.path.join(model_dir, "flags.json")) as f:
    saved = json.load(f)
  assert saved["train_mode"] == "pretrain" and saved["resnet_depth"] == 10
  assert tf.io.gfile.glob(os.path.join(model_dir, "train", "events.out.tfevents.*"))


def test_image_summary_shows_the_first_training_images(pretrained):
  """The step-0 image summary holds both views of the first 4 images of step 1's batch."""
  from tensorboard.backend.event_processing import event_accumulator
  from tf_simclr.config import DataConfig
  from tf_simclr.data import pipeline
  model_dir, _ = pretrained
  events = event_accumulator.EventAccumulator(os.path.join(model_dir, "train"),
                                              size_guidance={"tensors": 0})
  events.Reload()
  cfg = DataConfig(dataset="fashion_mnist", train_split="train[:2048]", eval_split="test[:512]",
                   image_size=16, cache_dataset=True, seed=1)
  batch = next(iter(pipeline.build_train_dataset(
      tf.distribute.get_strategy(), cfg, global_batch_size=64, views=2, contrastive=True,
      subset="all")))
  for view in (1, 2):
    (event,) = events.Tensors(f"augmented_images/view_{view}")
    assert event.step == 0
    # [width, height, png_1, ..., png_4]
    pngs = tf.make_ndarray(event.tensor_proto)[2:]
    assert len(pngs) == 4
    shown = np.stack([tf.io.decode_png(png).numpy() for png in pngs]).astype(np.float32) / 255
    expected = batch["image"][:4, :, :, 3 * (view - 1):3 * view].numpy()
    assert shown.shape == expected.shape == (4, 16, 16, 3)
    np.testing.assert_allclose(shown, expected, atol=1 / 255 + 1e-6)


def test_finetune_from_pretrained_then_distill(pretrained, tmp_path):
  pretrain_dir, _ = pretrained
  finetune_dir = str(tmp_path / "finetune")
  out = run("--train_mode=finetune", "--mode=train_then_eval", "--train_steps=4",
            "--train_label_fraction=0.1", "--train_batch_size=32", "--ft_proj_selector=1",
            "--zero_init_logits_layer=true", f"--checkpoint={pretrain_dir}",
            "--optimizer=momentum", "--learning_rate=0.1", f"--model_dir={finetune_dir}")
  assert "Initialised resnet, projection_head from" in out.stdout
  # 10% of each class of the 2048 training images, rounded per class.
  examples = int(re.search(r"\((\d+) examples, batch 32", out.stdout).group(1))
  assert 195 <= examples <= 215
  assert result(finetune_dir)["global_step"] == 4

  distill_dir = str(tmp_path / "distill")
  out = run("--train_mode=distill", "--mode=train_then_eval", "--train_steps=4",
            f"--teacher_checkpoint={finetune_dir}", "--ft_proj_selector=1",
            f"--model_dir={distill_dir}")
  assert "Teacher: ResNet-10" in out.stdout
  res = result(distill_dir)
  assert 0 <= res["eval/teacher_student_agreement"] <= 1
  # The teacher is the fine-tuned model, evaluated on the same split.
  assert res["eval/teacher_top_1_accuracy"] == pytest.approx(
      result(finetune_dir)["eval/label_top_1_accuracy"], abs=1e-6)


def test_eval_mode_evaluates_every_checkpoint(pretrained, tmp_path):
  model_dir, _ = pretrained
  out = run("--train_mode=pretrain", "--mode=eval", "--train_steps=6", "--knn_monitor",
            "--knn_k=20", f"--model_dir={model_dir}")
  assert "eval at step 3" in out.stdout and "eval at step 6" in out.stdout
  with open(os.path.join(model_dir, "result_3.json")) as f:
    assert 0 <= json.load(f)["eval/knn_top_1_accuracy"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--ft_proj_selector=4"], "ft_proj_selector=4 must be in -1..3"),
    (["--train_mode=distill", "--teacher_checkpoint=/nonexistent", "--distill_alpha=0"],
     "--distill_alpha must be in (0, 1], got 0.0: it is the paper's alpha"),
    (["--mode=train_then_eval", "--eval_split=validation"],
     "has no split 'validation' (splits: test, train)"),
    (["--fine_tune_after_block=5", "--train_mode=finetune"],
     "fine_tune_after_block=5 must be in -1..4"),
    (["--recompute_block_groups=5"], "recompute_block_groups=5 must be in 0..4"),
    (["--train_batch_size=0"], "--train_batch_size must be > 0"),
    (["--num_cpu_replicas=3"], "not divisible by the 3 replicas"),
    (["--train_label_fraction=1.5"], "--train_label_fraction must be in (0, 1]"),
    (["--train_mode=distill"], "--teacher_checkpoint is required for distillation"),
    (["--fine_tune_after_block=2"], "does not support"),
    (["--dataset=no_such_dataset"], "no_such_dataset"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, message):
  out = run(f"--model_dir={tmp_path}", "--train_steps=1", *args, check=False)
  assert out.returncode != 0
  assert message in out.stderr
  assert "Traceback" not in out.stderr


def test_model_dir_of_another_run_is_refused(pretrained):
  model_dir, _ = pretrained
  out = run("--train_mode=pretrain", "--resnet_depth=18", "--train_steps=1",
            f"--model_dir={model_dir}", check=False)
  assert out.returncode != 0
  assert "holds a run with resnet_depth=10, not 18" in out.stderr


def test_checkpoint_of_another_architecture_names_the_variable(pretrained, tmp_path):
  pretrain_dir, _ = pretrained
  out = run("--train_mode=finetune", "--train_steps=1", "--width_multiplier=0.25",
            f"--checkpoint={pretrain_dir}", f"--model_dir={tmp_path}", check=False)
  assert out.returncode != 0
  assert "does not fit the model: variable stem_conv/conv/kernel has shape [3, 3, 3, 8] " \
         "in the checkpoint but [3, 3, 3, 16] in the model" in out.stderr


def test_top_k_correct_breaks_ties_by_class_index_like_argmax():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 3, size=(200, 6)).astype(np.float32)  # many ties
  logits[:20] = 0.0  # a degenerate head: every class tied
  labels = rng.integers(0, 6, size=200)
  for k in (1, 2, 5):
    # Independently: a stable sort on -logits keeps tied classes in index order.
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    expected = (top == labels[:, None]).any(axis=1).astype(np.float32)
    np.testing.assert_array_equal(evaluation.top_k_correct(labels, logits, k), expected)
  np.testing.assert_array_equal(evaluation.top_k_correct(labels, logits, 1),
                                (logits.argmax(1) == labels).astype(np.float32))


def test_zero_head_scores_the_share_of_class_zero(tmp_path):
  """A head whose logits are all equal predicts class 0 (argmax), not every class."""
  from tf_simclr import strategy as strategy_lib
  from tf_simclr.config import DataConfig, ModelConfig, TrainConfig
  from tf_simclr.data import datasets
  data = DataConfig(dataset="fashion_mnist", train_split="train[:256]", eval_split="test[:300]",
                    image_size=16, cache_dataset=True)
  spec = loop.RunSpec(
      strategy=strategy_lib.build_strategy("one_device"), model_dir=str(tmp_path),
      model_cfg=ModelConfig(resnet_depth=10, width_multiplier=0.125, image_size=16,
                            num_classes=10, proj_out_dim=16, global_bn=False),
      data_cfg=data, train_cfg=TrainConfig(train_mode="finetune", train_batch_size=64,
                                           eval_batch_size=128, train_steps=1))
  trainer = loop.Trainer(spec)
  for v in trainer.model.supervised_head.variables:
    v.assign(tf.zeros(v.shape, v.dtype))
  result = trainer.evaluate()
  labels = datasets.load_eval(data).labels
  assert result["eval/num_examples"] == 300
  assert result["eval/label_top_1_accuracy"] == pytest.approx(np.mean(labels == 0))
  assert result["eval/label_top_5_accuracy"] == pytest.approx(np.mean(labels < 5))


def test_trainer_applies_the_configs_precision_and_seed(tmp_path):
  """A library caller's TrainConfig decides precision and initial weights; no global state
  set beforehand does."""
  import keras
  from tf_simclr import strategy as strategy_lib
  from tf_simclr.config import DataConfig, ModelConfig, TrainConfig
  data = DataConfig(dataset="fashion_mnist", train_split="train[:256]", eval_split="test[:64]",
                    image_size=16, cache_dataset=True)
  model = ModelConfig(resnet_depth=10, width_multiplier=0.125, image_size=16, num_classes=10,
                      proj_out_dim=16, global_bn=False)

  def trainer(precision, seed):
    spec = loop.RunSpec(strategy=strategy_lib.build_strategy("one_device"),
                        model_dir=str(tmp_path / f"{precision}_{seed}"), model_cfg=model,
                        data_cfg=data, train_cfg=TrainConfig(train_batch_size=64, train_steps=1,
                                                             precision=precision, seed=seed))
    return loop.Trainer(spec)

  keras.mixed_precision.set_global_policy("float32")
  bf16 = trainer("mixed_bfloat16", 5)
  assert bf16.model.resnet.compute_dtype == "bfloat16"
  assert {v.dtype for v in bf16.model.trainable_variables} == {"float32"}
  again = trainer("float32", 5)
  assert again.model.resnet.compute_dtype == "float32"
  other = trainer("float32", 6)
  kernel = lambda t: t.model.trainable_variables[0].numpy()  # noqa: E731
  np.testing.assert_array_equal(kernel(bf16), kernel(again))
  assert not np.array_equal(kernel(again), kernel(other))


def test_device_placement_trains_like_the_host(tmp_path):
  """--augment_on=device: Fashion-MNIST's images are held in memory, so the step crops and
  distorts them itself; the first steps' losses equal the host placement's."""
  from tf_simclr import strategy as strategy_lib
  from tf_simclr.config import DataConfig, ModelConfig, TrainConfig

  def first_losses(augment_on):
    data = DataConfig(dataset="fashion_mnist", train_split="train[:256]", eval_split="test[:64]",
                      image_size=28, use_blur=True, cache_dataset=True,
                      augment_on=augment_on)
    spec = loop.RunSpec(
        strategy=strategy_lib.build_strategy("one_device"), model_dir=str(tmp_path / augment_on),
        model_cfg=ModelConfig(resnet_depth=10, width_multiplier=0.125, image_size=28,
                              num_classes=10, proj_out_dim=16, global_bn=False),
        data_cfg=data, train_cfg=TrainConfig(train_batch_size=32, train_steps=2, seed=3))
    trainer = loop.Trainer(spec)
    assert trainer.augment_on == augment_on
    iterator = iter(trainer.train_dataset(trainer.strategy, 0))
    train_loop = trainer.make_train_loop()
    losses = []
    for _ in range(2):
      train_loop(iterator, None, tf.constant(1))
      losses.append(float(trainer.metrics["contrast_loss"].result()))
      trainer.metrics["contrast_loss"].reset_state()
    return losses

  host, device = first_losses("host"), first_losses("device")
  np.testing.assert_allclose(device, host, rtol=1e-4)
