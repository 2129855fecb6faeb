"""Distillation: the frozen teacher, the mixed objective, and students that learn from it."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tests.test_train import run
from tf_simclr import losses, strategy as strategy_lib
from tf_simclr.config import DataConfig, DistillConfig, ModelConfig, TrainConfig
from tf_simclr.models.simclr import build_model
from tf_simclr.objectives.distill import Distill
from tf_simclr.train import loop

MODEL = ModelConfig(resnet_depth=10, width_multiplier=0.125, image_size=16, num_classes=10,
                    proj_out_dim=16, global_bn=False, ft_proj_selector=1)
DATA = DataConfig(dataset="fashion_mnist", train_split="train[:512]", eval_split="test[:128]",
                  image_size=16, cache_dataset=True, seed=3)


def trainer(tmp_path, alpha=1.0, steps=3):
  strategy = strategy_lib.build_strategy("one_device")
  with strategy.scope():
    teacher = build_model(MODEL)
  teacher.trainable = False
  spec = loop.RunSpec(
      strategy=strategy, model_dir=str(tmp_path), model_cfg=MODEL, data_cfg=DATA,
      train_cfg=TrainConfig(train_mode="distill", train_batch_size=32, train_steps=steps,
                            optimizer="momentum", learning_rate=0.1, warmup_epochs=0,
                            steps_per_loop=steps, checkpoint_steps=steps),
      distill_cfg=DistillConfig(distill_temperature=2.0, distill_alpha=alpha))
  return loop.Trainer(spec, objective=Distill(spec, teacher=teacher))


def test_teacher_gets_no_gradient_and_keeps_its_bn_statistics(tmp_path):
  t = trainer(tmp_path)
  # Move the teacher's BN statistics off their initial values, so "unchanged" means something.
  t.objective.teacher(np.random.rand(8, 16, 16, 3).astype("float32"), training=True)
  teacher_before = [v.numpy() for v in t.objective.teacher.variables]
  student_before = [v.numpy() for v in t.model.variables]
  assert not t.objective.teacher.trainable_variables
  t.train(0)
  for before, v in zip(teacher_before, t.objective.teacher.variables):
    np.testing.assert_array_equal(before, v.numpy(), err_msg=v.path)
  moved = [not np.array_equal(b, v.numpy()) for b, v in zip(student_before, t.model.variables)]
  assert sum(moved) > len(moved) // 2


def test_objective_mixes_distillation_and_labels_with_alpha(tmp_path):
  t = trainer(tmp_path, alpha=0.75)  # the paper's alpha: the distillation loss's weight
  images = tf.constant(np.random.rand(6, 16, 16, 3), tf.float32)
  labelled = tf.constant(np.random.rand(6, 16, 16, 3), tf.float32)
  labels = tf.constant([0, 1, 2, 3, 4, 5])
  loss, metrics = t.objective.loss(t.model, {"image": images, "label": labels},
                                   {"image": labelled, "label": labels})
  # Independently: teacher in inference mode, student in training mode (batch statistics).
  teacher_p = tf.nn.softmax(t.objective.teacher(images, training=False)["logits_sup"] / 2.0)
  student_logp = tf.nn.log_softmax(t.model(images, training=True)["logits_sup"] / 2.0)
  distill = -np.mean(np.sum(teacher_p * student_logp, -1))
  sup_logits = t.model(labelled, training=True)["logits_sup"]
  sup = np.mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, sup_logits))
  np.testing.assert_allclose(float(metrics["distill_loss"]), distill, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["supervised_loss"]), sup, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 0.75 * distill + 0.25 * sup, rtol=1e-5)
  # The labelled loss really is the one of losses.supervised_loss.
  np.testing.assert_allclose(float(losses.supervised_loss(labels, sup_logits)), sup, rtol=1e-6)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("teacher"))
  run("--train_mode=finetune", "--mode=train_then_eval", "--train_steps=60",
      "--optimizer=momentum", "--learning_rate=0.2", "--warmup_epochs=0",
      "--ft_proj_selector=1", "--keep_hub_module_max=1",  # its export is a teacher below
      f"--model_dir={model_dir}")
  return model_dir


def result(model_dir):
  with open(os.path.join(model_dir, "result.json")) as f:
    return json.load(f)


def test_student_learns_to_agree_with_the_teacher(teacher_dir, tmp_path):
  teacher_top1 = result(teacher_dir)["eval/label_top_1_accuracy"]
  assert teacher_top1 > 0.3  # a teacher worth distilling (chance: 0.1)
  student = str(tmp_path / "student")
  run("--train_mode=distill", "--mode=train_then_eval", "--train_steps=60",
      "--optimizer=momentum", "--learning_rate=0.2", "--warmup_epochs=0",
      f"--teacher_checkpoint={teacher_dir}", "--ft_proj_selector=1", f"--model_dir={student}")
  res = result(student)
  # Chance agreement between two 10-class predictors is about 0.1.
  assert res["eval/teacher_student_agreement"] > 0.4
  assert res["eval/teacher_top_1_accuracy"] == pytest.approx(teacher_top1, abs=1e-6)


def test_smaller_student_from_a_saved_model_teacher(teacher_dir, tmp_path):
  exports = os.listdir(os.path.join(teacher_dir, "saved_model"))
  assert exports == ["60"]
  saved_model = os.path.join(teacher_dir, "saved_model", "60")
  student = str(tmp_path / "student")
  out = run("--train_mode=distill", "--mode=train_then_eval", "--train_steps=4",
            "--width_multiplier=0.0625", "--proj_out_dim=8",
            f"--teacher_checkpoint={saved_model}", f"--model_dir={student}")
  assert "Teacher: ResNet-10 0.125x" in out.stdout
  res = result(student)
  assert res["eval/teacher_top_1_accuracy"] == pytest.approx(
      result(teacher_dir)["eval/label_top_1_accuracy"], abs=1e-6)


def test_finetune_initialised_from_a_saved_model(teacher_dir, tmp_path):
  saved_model = os.path.join(teacher_dir, "saved_model", "60")
  model_dir = str(tmp_path / "ft")
  out = run("--train_mode=finetune", "--mode=train_then_eval", "--train_steps=1",
            "--learning_rate=0", "--ft_proj_selector=1", f"--checkpoint={saved_model}",
            f"--model_dir={model_dir}")
  assert "Initialised resnet, projection_head, supervised_head from" in out.stdout
  # One step at learning rate 0 changes only BN statistics: accuracy stays near the teacher's.
  assert abs(result(model_dir)["eval/label_top_1_accuracy"]
             - result(teacher_dir)["eval/label_top_1_accuracy"]) < 0.1


def test_teacher_with_other_classes_is_a_clear_error(teacher_dir, tmp_path):
  # A 3-class image folder: the 10-class teacher cannot label it.
  for c in range(3):
    os.makedirs(tmp_path / "images" / f"class_{c}")
    for i in range(12):
      pixels = np.random.randint(0, 255, (16, 16, 3), np.uint8)
      tf.io.write_file(str(tmp_path / "images" / f"class_{c}" / f"{i}.png"),
                       tf.io.encode_png(pixels))
  out = run("--train_mode=distill", "--train_steps=1", "--train_batch_size=8",
            f"--dataset=folder:{tmp_path / 'images'}", f"--teacher_checkpoint={teacher_dir}",
            f"--model_dir={tmp_path / 'run'}", check=False)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "predicts 10 classes but" in out.stderr and "has 3" in out.stderr


def test_teacher_without_model_config_takes_architecture_overrides(teacher_dir, tmp_path):
  # A bare checkpoint has no tf_simclr_config.json: the student's architecture flags then
  # describe the teacher, unless --teacher_<name> overrides them.
  prefix = tf.train.latest_checkpoint(teacher_dir)
  os.makedirs(tmp_path / "bare")
  for f in glob.glob(prefix + ".*"):
    shutil.copy(f, tmp_path / "bare")
  student = ["--train_mode=distill", "--train_steps=1", "--width_multiplier=0.0625",
             "--proj_out_dim=8", "--ft_proj_selector=0",
             f"--teacher_checkpoint={tmp_path / 'bare' / os.path.basename(prefix)}"]
  out = run(*student, f"--model_dir={tmp_path / 'as_student'}", check=False)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "does not fit the model: variable stem_conv/conv/kernel" in out.stderr
  out = run(*student, "--teacher_width_multiplier=0.125", "--teacher_proj_out_dim=16",
            "--teacher_ft_proj_selector=1", f"--model_dir={tmp_path / 'overridden'}")
  assert "Teacher: ResNet-10 0.125x" in out.stdout
  out = run(*student, "--teacher_proj_head_mode=quadratic", f"--model_dir={tmp_path / 'bad'}",
            check=False)
  assert out.returncode != 0 and "--teacher_proj_head_mode" in out.stderr
