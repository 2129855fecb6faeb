"""Import of reference (google-research/simclr) weights, checked by matching outputs against
our own statement of the reference's layout.

`ReferenceNet` below is written in this test from the reference architecture's definition:
it creates random parameters in the reference's layer creation order under both of its
layouts (TF1 `tf.layers` names and TF2 object paths) and runs its inference forward pass
with plain TF ops. Converting those parameters and comparing our model's outputs with it
checks the layer mapping, BN statistics included, as far as that statement is right; the
check against the reference's own tf2 code is benchmarks/reference_convert.py (it needs the
reference installed, docs/EXPORT.md).
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tf_simclr  # noqa: F401
from tf_simclr import convert, pretrained
from tf_simclr.config import ModelConfig
from tf_simclr.models.simclr import build_model
from tf_simclr.train import checkpoints

EPS = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = {18: ("basic", [2, 2, 2, 2]), 50: ("bottleneck", [3, 4, 6, 3])}


class ReferenceNet:
  """The reference ResNet + heads (inference mode), creating parameters on first use."""

  def __init__(self, cfg: ModelConfig, seed=0):
    self.cfg = cfg
    self.rng = np.random.default_rng(seed)
    self.tf1 = {}   # TF1 variable name -> value
    self.tf2 = {}   # TF2 object path (under the root's `model`) -> value
    self.counts = {"conv2d": 0, "batch_normalization": 0}

  def _tf1_name(self, base):
    n = self.counts[base]
    self.counts[base] += 1
    return f"base_model/{base}" + (f"_{n}" if n else "")

  def _param(self, tf1, tf2, value):
    value = value.astype(np.float32)
    self.tf1[tf1] = value
    self.tf2[tf2] = value
    return value

  def conv(self, x, filters, k, stride, tf2, bias=False, tf1=None):
    cin = x.shape[-1]
    tf1 = tf1 or self._tf1_name("conv2d")
    kernel = self._param(f"{tf1}/kernel", f"{tf2}/kernel",
                         self.rng.normal(0, np.sqrt(2.0 / (k * k * cin)), (k, k, cin, filters)))
    if stride > 1:
      begin = (k - 1) // 2
      x = tf.pad(x, [[0, 0], [begin, k - 1 - begin], [begin, k - 1 - begin], [0, 0]])
    x = tf.nn.conv2d(x, kernel, stride, "SAME" if stride == 1 else "VALID")
    if bias:
      x += self._param(f"{tf1}/bias", f"{tf2}/bias", self.rng.normal(0, 0.1, filters))
    return x

  def bn(self, x, tf2, relu=True, center=True, tf1=None):
    tf1 = tf1 or self._tf1_name("batch_normalization")
    c = x.shape[-1]
    gamma = self._param(f"{tf1}/gamma", f"{tf2}/gamma", self.rng.uniform(0.5, 1.5, c))
    beta = (self._param(f"{tf1}/beta", f"{tf2}/beta", self.rng.normal(0, 0.2, c))
            if center else 0.0)
    mean = self._param(f"{tf1}/moving_mean", f"{tf2}/moving_mean", self.rng.normal(0, 0.2, c))
    var = self._param(f"{tf1}/moving_variance", f"{tf2}/moving_variance",
                      self.rng.uniform(0.5, 2.0, c))
    x = (x - mean) / np.sqrt(var + EPS) * gamma + beta
    return tf.nn.relu(x) if relu else x

  def se(self, x, filters, tf2_prefix):
    s = tf.reduce_mean(x, [1, 2], keepdims=True)
    s = tf.nn.relu(self.conv(s, max(1, int(filters * self.cfg.se_ratio)), 1, 1,
                             f"{tf2_prefix}se_reduce", bias=True))
    s = self.conv(s, x.shape[-1], 1, 1, f"{tf2_prefix}se_expand", bias=True)
    return tf.sigmoid(s) * x

  def shortcut(self, x, filters, stride, path):
    """Projection shortcut; returns (output, next list index)."""
    i = 0
    if self.cfg.sk_ratio > 0:
      if stride > 1:
        x = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
        i += 1
      x = tf.nn.avg_pool2d(x, 2, stride, "SAME" if stride == 1 else "VALID")
      i += 1
      stride = 1
    x = self.conv(x, filters, 1, stride, f"{path}/{i}/conv2d")
    return self.bn(x, f"{path}/{i + 1}/bn", relu=False)

  def sk_conv(self, x, filters, stride, path):
    x = self.conv(x, 2 * filters, 3, stride, f"{path}/conv2d_fixed_padding/conv2d")
    x = self.bn(x, f"{path}/batch_norm_relu/bn")
    streams = tf.stack(tf.split(x, 2, axis=-1))
    g = tf.reduce_mean(tf.reduce_sum(streams, 0), [1, 2], keepdims=True)
    g = self.conv(g, max(int(filters * self.cfg.sk_ratio), 32), 1, 1, f"{path}/conv2d_0")
    g = self.bn(g, f"{path}/batch_norm_relu_1/bn")
    mix = self.conv(g, 2 * filters, 1, 1, f"{path}/conv2d_1")
    mix = tf.nn.softmax(tf.stack(tf.split(mix, 2, axis=-1)), axis=0)
    return tf.reduce_sum(streams * mix, 0)

  def basic_block(self, x, filters, stride, projection, path):
    short = self.shortcut(x, filters, stride, f"{path}/shortcut_layers") if projection else x
    p = f"{path}/conv2d_bn_layers"
    x = self.bn(self.conv(x, filters, 3, stride, f"{p}/0/conv2d"), f"{p}/1/bn")
    x = self.bn(self.conv(x, filters, 3, 1, f"{p}/2/conv2d"), f"{p}/3/bn", relu=False)
    if self.cfg.se_ratio > 0:
      x = self.se(x, filters, f"{path}/se_layer/")
    return tf.nn.relu(x + short)

  def bottleneck_block(self, x, filters, stride, projection, path):
    short = (self.shortcut(x, 4 * filters, stride, f"{path}/projection_layers")
             if projection else x)
    p = f"{path}/conv_relu_dropblock_layers"
    x = self.bn(self.conv(x, filters, 1, 1, f"{p}/0/conv2d"), f"{p}/1/bn")
    # Index 2 is a DropBlock; the list has no parameters there.
    if self.cfg.sk_ratio > 0:
      x = self.sk_conv(x, filters, stride, f"{p}/3")
      i = 5
    else:
      x = self.bn(self.conv(x, filters, 3, stride, f"{p}/3/conv2d"), f"{p}/4/bn")
      i = 6
    x = self.bn(self.conv(x, 4 * filters, 1, 1, f"{p}/{i}/conv2d"), f"{p}/{i + 1}/bn",
                relu=False)
    if self.cfg.se_ratio > 0:
      x = self.se(x, filters, f"{p}/{i + 3}/")
    return tf.nn.relu(x + short)

  def trunk(self, images):
    cfg = self.cfg
    width = int(64 * cfg.width_multiplier)
    stem = "resnet_model/initial_conv_relu_max_pool"
    if cfg.cifar_stem:
      x = self.bn(self.conv(images, width, 3, 1, f"{stem}/0/conv2d"), f"{stem}/2/bn")
    else:
      if cfg.sk_ratio > 0:
        x = self.bn(self.conv(images, width // 2, 3, 2, f"{stem}/0/conv2d"), f"{stem}/1/bn")
        x = self.bn(self.conv(x, width // 2, 3, 1, f"{stem}/2/conv2d"), f"{stem}/3/bn")
        x = self.bn(self.conv(x, width, 3, 1, f"{stem}/4/conv2d"), f"{stem}/6/bn")
      else:
        x = self.bn(self.conv(images, width, 7, 2, f"{stem}/0/conv2d"), f"{stem}/2/bn")
      x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    kind, blocks = BLOCKS[cfg.resnet_depth]
    block = self.basic_block if kind == "basic" else self.bottleneck_block
    for g in range(4):
      for b in range(blocks[g]):
        x = block(x, width * 2**g, (1 if g == 0 else 2) if b == 0 else 1, b == 0,
                  f"resnet_model/block_groups/{g}/layers/{b}")
    return tf.reduce_mean(x, [1, 2])

  def dense(self, x, units, tf1, tf2, bias):
    kernel = self._param(f"{tf1}/kernel", f"{tf2}/kernel",
                         self.rng.normal(0, 1 / np.sqrt(x.shape[-1]), (x.shape[-1], units)))
    x = tf.matmul(x, kernel)
    if bias:
      x += self._param(f"{tf1}/bias", f"{tf2}/bias", self.rng.normal(0, 0.1, units))
    return x

  def __call__(self, images):
    cfg = self.cfg
    pooled = self.trunk(images)
    hiddens = [pooled]
    for j in range(cfg.num_proj_layers):
      last = j == cfg.num_proj_layers - 1
      tf1 = f"head_contrastive/nl_{j}"
      tf2 = f"_projection_head/linear_layers/{j}"
      x = self.dense(hiddens[-1], cfg.proj_out_dim if last else hiddens[-1].shape[-1],
                     f"{tf1}/dense", f"{tf2}/dense", bias=False)
      x = self.bn(x, f"{tf2}/bn_relu/bn", relu=not last, center=not last,
                  tf1=f"{tf1}/batch_normalization")
      hiddens.append(x)
    logits = self.dense(hiddens[cfg.ft_proj_selector], cfg.num_classes,
                        "head_supervised/linear_layer/dense",
                        "supervised_head/linear_layer/dense", bias=True)
    return {"final_avg_pool": pooled, "proj_head_output": hiddens[-1], "logits_sup": logits}


def _write_tf1(values, prefix):
  """A name-based checkpoint, as the TF1 reference's Saver writes (with optimizer slots)."""
  names = sorted(values)
  tensors = [tf.constant(values[n]) for n in names]
  names += ["global_step", names[0] + "/Momentum"]
  tensors += [tf.constant(7, tf.int64), tf.zeros_like(tensors[0])]
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=tensors)


def _trackable_tree(values):
  """Nested tf.Modules (lists where names are indices) holding `values` at their paths."""
  tree = {}
  for path, value in values.items():
    node = tree
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = tf.Variable(value)

  def build(node):
    if isinstance(node, tf.Variable):
      return node
    if all(k.isdigit() for k in node):
      return [build(node[str(i)]) if str(i) in node else tf.Module()
              for i in range(max(int(k) for k in node) + 1)]
    module = tf.Module()
    for name, child in node.items():
      setattr(module, name, build(child))
    return module

  return build(tree)


def _write_tf2_saved_model(values, path):
  """A SavedModel laid out like the TF2 reference's hub export: the model under `model`,
  and its trainable variables also in a flat list (so most checkpoint keys name that list)."""
  root = tf.Module()
  root.model = _trackable_tree(values)
  root.trainable_variables_list = [v for v in root.model.trainable_variables
                                   if "moving" not in v.name]
  tf.saved_model.save(root, path)


def _check_outputs(model, reference, images):
  ours = model(images, training=False)
  for name, expected in reference.items():
    expected = np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(ours[name]), expected, rtol=1e-4, atol=1e-4 * scale,
                               err_msg=name)


def _reference(cfg, size, seed=0):
  net = ReferenceNet(cfg, seed)
  images = np.random.default_rng(seed + 1).uniform(0, 1, (2, size, size, 3)).astype(np.float32)
  return net, images, net(tf.constant(images))


SK50 = ModelConfig(resnet_depth=50, width_multiplier=0.125, sk_ratio=0.0625, image_size=64,
                   proj_out_dim=16, num_classes=10, ft_proj_selector=1, global_bn=False)
SE18 = ModelConfig(resnet_depth=18, width_multiplier=0.25, se_ratio=0.25, image_size=32,
                   proj_out_dim=16, num_classes=10, global_bn=False)


@pytest.mark.parametrize("cfg", [SK50, SE18], ids=["r50_sk", "r18_se_cifar"])
def test_tf1_checkpoint_matches_reference_forward(tmp_path, cfg):
  net, images, expected = _reference(cfg, cfg.image_size)
  prefix = str(tmp_path / "model.ckpt-7")
  _write_tf1(net.tf1, prefix)
  model = build_model(cfg)
  notes = convert.load_reference_weights(model, cfg, convert.read_reference(prefix))
  assert notes == []
  _check_outputs(model, expected, images)


def test_tf2_saved_model_matches_reference_forward(tmp_path):
  # A 224-style stem on 64x64 images: ResNet-D stem, max pool, ResNet-D shortcuts, SK.
  cfg = SK50
  net, images, expected = _reference(cfg, 64, seed=3)
  _write_tf2_saved_model(net.tf2, str(tmp_path / "hub"))
  model = build_model(cfg)
  prefix = checkpoints.resolve_weights(str(tmp_path / "hub"))
  convert.load_reference_weights(model, cfg, convert.read_reference(prefix))
  _check_outputs(model, expected, images)


def test_mismatch_names_first_variable_and_shapes(tmp_path):
  net, _, _ = _reference(SE18, 32)
  prefix = str(tmp_path / "ckpt")
  _write_tf1(net.tf1, prefix)
  reference = convert.read_reference(prefix)
  wider = build_model(dataclasses.replace(SE18, width_multiplier=0.5))
  with pytest.raises(convert.ConversionError,
                     match=r"base_model/conv2d/kernel is \[3, 3, 3, 16\] but our "
                           r"stem_conv/conv/kernel is \[3, 3, 3, 32\]"):
    convert.load_reference_weights(wider, dataclasses.replace(SE18, width_multiplier=0.5),
                                   reference)
  classes = dataclasses.replace(SE18, num_classes=5)
  with pytest.raises(convert.ConversionError, match=r"head_supervised.*\[128, 10\].*\[128, 5\]"):
    convert.load_reference_weights(build_model(classes), classes, reference)
  deeper = dataclasses.replace(SE18, resnet_depth=34)
  with pytest.raises(convert.ConversionError,
                     match=r"base_model/conv2d_10/kernel is \[1, 1, 16, 32\] but our "
                           r"block_group1/block_2/conv_1/conv/conv/kernel is \[3, 3, 16, 16\]"):
    convert.load_reference_weights(build_model(deeper), deeper, reference)
  no_se = dataclasses.replace(SE18, se_ratio=0.0)
  with pytest.raises(convert.ConversionError, match=r"conv2d_4/kernel is \[1, 1, 16, 4\]"):
    convert.load_reference_weights(build_model(no_se), no_se, reference)


def test_cli_writes_checkpoint_saved_model_and_config(tmp_path):
  cfg = dataclasses.replace(SE18, se_ratio=0.0, ft_proj_selector=1)
  net, images, expected = _reference(cfg, 32, seed=5)
  _write_tf2_saved_model(net.tf2, str(tmp_path / "hub"))
  out = tmp_path / "converted"
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, "-m", "tf_simclr.convert", f"--source={tmp_path / 'hub'}",
       f"--output={out}", "--resnet_depth=18", "--width_multiplier=0.25", "--image_size=32",
       "--proj_out_dim=16", "--ft_proj_selector=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  # num_classes read from the head; BN as the converter's defaults.
  assert pretrained.read_model_config(str(out)) == dataclasses.replace(cfg, global_bn=True)
  model, _, prefix = pretrained.load_pretrained(str(out))
  assert prefix == checkpoints.resolve_checkpoint(str(out))
  assert prefix.endswith("ckpt-0") and checkpoints.checkpoint_step(prefix) == 0
  _check_outputs(model, expected, images)
  # The SavedModel serves the same outputs.
  loaded = tf.saved_model.load(str(out / "saved_model" / "0"))
  served = loaded.signatures["serving_default"](images=tf.constant(images))
  np.testing.assert_allclose(served["logits_sup"], model(images)["logits_sup"], atol=1e-5)
  # A mismatching architecture is a usage error naming the variable.
  bad = subprocess.run(
      [sys.executable, "-m", "tf_simclr.convert", f"--source={tmp_path / 'hub'}",
       f"--output={tmp_path / 'bad'}", "--resnet_depth=18", "--width_multiplier=0.5",
       "--image_size=32", "--proj_out_dim=16"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert "initial_conv_relu_max_pool/0/conv2d/kernel is [3, 3, 3, 16]" in bad.stderr
