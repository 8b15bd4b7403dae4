"""Residual Attention Networks: parameter counts against the paper, shapes, tiny forwards."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax.models.common import ModelEntry
from attention_flax.models.residual_attention import MODELS, ResidualAttentionNet


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------- parameter counts worked out by hand


def _unit(cin: int, c: int, stride: int = 1) -> int:
  """A pre-activation bottleneck unit: BNs (scale + bias), 1x1, 3x3, 1x1, projection."""
  w = c // 4
  count = 2 * cin + cin * w + 2 * w + 9 * w * w + 2 * w + w * c
  return count + (cin * c if (cin != c or stride != 1) else 0)


def _module(c: int, levels: int) -> int:
  """p = 1, t = 2, r = 1: 4 trunk-line units; mask: one unit per level, two at the bottom,
  a skip and an up unit per level above it; head of two BN + 1x1 conv (no bias)."""
  mask_units = (levels - 1) + 2 + (levels - 1) + (levels - 1)
  return (4 + mask_units) * _unit(c, c) + 2 * (2 * c + c * c)


def _imagenet(modules) -> int:
  count = 7 * 7 * 3 * 64 + 2 * 64
  cin = 64
  for width, m, levels, stride in zip((256, 512, 1024), modules, (3, 2, 1), (1, 2, 2)):
    count += _unit(cin, width, stride) + m * _module(width, levels)
    cin = width
  count += _unit(1024, 2048, 2) + 2 * _unit(2048, 2048)
  return count + 2 * 2048 + 2048 * 1000 + 1000


def _cifar(m: int, classes: int) -> int:
  count = 3 * 3 * 3 * 16  # bare stem convolution
  cin = 16
  for width, levels, stride in zip((64, 128, 256), (3, 2, 1), (1, 2, 2)):
    count += _unit(cin, width, stride) + m * _module(width, levels) + _unit(width, width)
    cin = width
  return count + 2 * 256 + 256 * classes + classes


@functools.lru_cache(maxsize=None)
def _abstract(name: str, size: int, classes: int | None = None):
  """Parameter shapes, stage outputs and logits of a registered model, traced only."""
  kwargs = {} if classes is None else {"num_classes": classes}
  model = MODELS[name].factory(**kwargs)
  x = jnp.zeros((1, size, size, 3))

  def run(key):
    variables = model.init(key, x)
    logits, state = model.apply(variables, x, mutable=["intermediates"])
    return variables, logits, state["intermediates"]

  return jax.eval_shape(run, jax.random.PRNGKey(0))


def test_hand_formula_matches_the_paper_where_the_structure_allows():
  assert _imagenet((1, 1, 1)) == 31_810_728
  assert _imagenet((1, 2, 3)) == 52_466_344
  assert abs(_imagenet((1, 1, 1)) / 31.9e6 - 1) < 0.01
  # The paper's 51.3M is 2.3% below what its own prototxt defines (see the module doc).
  assert abs(_imagenet((1, 2, 3)) / 51.3e6 - 1) < 0.025
  # CIFAR (36 m + 20 layers): Attention-92 (m = 2) 1.9M, Attention-236 (m = 6) 5.1M.
  assert abs(_cifar(2, 100) / 1.9e6 - 1) < 0.02
  assert abs(_cifar(6, 100) / 5.1e6 - 1) < 0.005


@pytest.mark.parametrize("name, modules", [("attention56", (1, 1, 1)),
                                           ("attention92", (1, 2, 3))])
def test_imagenet_parameter_counts(name, modules):
  variables, logits, _ = _abstract(name, 224)
  assert _count(variables["params"]) == _imagenet(modules)
  assert logits.shape == (1, 1000) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name, m, classes", [("attention56_cifar", 1, 10),
                                              ("attention92_cifar", 2, 100)])
def test_cifar_parameter_counts(name, m, classes):
  variables, logits, stages = _abstract(name, 32, classes)
  assert _count(variables["params"]) == _cifar(m, classes)
  assert logits.shape == (1, classes)
  assert [stages[f"stage{i}"][0].shape for i in (1, 2, 3)] == [
      (1, 32, 32, 64), (1, 16, 16, 128), (1, 8, 8, 256)]
  assert "stage4" not in stages


@pytest.mark.parametrize("name", ["attention56", "attention92"])
@pytest.mark.parametrize("size", [224, 192])
def test_imagenet_stage_shapes(name, size):
  _, logits, stages = _abstract(name, size)
  assert logits.shape == (1, 1000)
  side = size // 4
  widths = (256, 512, 1024, 2048)
  for i, width in enumerate(widths, start=1):
    assert stages[f"stage{i}"][0].shape == (1, side >> (i - 1), side >> (i - 1), width)
  masks = [k for k in stages if k.startswith("stage3_attn")]
  assert len(masks) == {"attention56": 1, "attention92": 3}[name]
  assert stages["stage1_attn1"]["residual_mask"][0].shape == (1, side, side, 256)


def test_modules_per_stage_follow_table_2():
  variables, _, _ = _abstract("attention92", 224)
  names = set(variables["params"])
  assert {"stage1_attn1", "stage2_attn2", "stage3_attn3", "stage4_unit3"} <= names
  assert not {"stage1_attn2", "stage2_attn3", "stage3_attn4", "stage4_unit4"} & names
  assert variables["params"]["stage1_attn1"]["down3_2"]["conv3"]["kernel"].shape == (
      1, 1, 64, 256)


# ------------------------------------------------------------------- tiny real forwards


def _he_variables(model, x, seed=0):
  """Deterministic variables with He-scaled kernels, drawn by numpy from the traced shapes.

  Avoids compiling one random-number kernel per parameter shape on a small CPU; norms start
  as Flax initialises them (scale 1, bias 0, mean 0, var 1)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_out = leaf.shape[-1] * int(np.prod(leaf.shape[:-2]))
      return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_out), leaf.dtype)
    return (jnp.ones if name in ("scale", "var") else jnp.zeros)(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _tiny():
  model = MODELS["attention_tiny"].factory()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  return model, _he_variables(model, x), x


def test_tiny_forward_train_updates_batch_stats():
  model, variables, x = _tiny()
  # Under jit: one compilation is cheaper here than compiling every operation eagerly.
  logits, state = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats", "intermediates"]))(variables, x)
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  assert logits.dtype == jnp.float32
  # 32 -> stem /2 -> pool /2 = 8; stage 2 and the final stage halve it again.
  stages = state["intermediates"]
  assert [stages[f"stage{i}"][0].shape for i in (1, 2, 3)] == [
      (2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 64)]
  # Every running statistic moved, and the stem's by a tenth of the batch mean (momentum 0.9).
  before, after = variables["batch_stats"], state["batch_stats"]
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), before, after)
  assert min(jax.tree.leaves(moved)) > 0.0
  stem = jax.lax.conv_general_dilated(
      x, variables["params"]["stem_conv"]["kernel"], (2, 2), ((3, 3), (3, 3)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(after["stem_bn"]["mean"]),
                             0.1 * np.asarray(stem).mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-6)


def test_tiny_eval_is_deterministic_and_finite():
  model, variables, x = _tiny()
  apply = jax.jit(model.apply)
  first = apply(variables, x)
  chex.assert_tree_all_finite(first)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(apply(variables, x)))
  # Eval mode uses running statistics: the logits of one image ignore the rest of the batch.
  swapped = apply(variables, x.at[1].set(-x[1]))
  np.testing.assert_allclose(np.asarray(swapped[0]), np.asarray(first[0]), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(swapped[1] - first[1]))) > 1e-3


def test_tiny_bfloat16_gives_float32_logits():
  model, variables, x = _tiny()
  reference = jax.jit(model.apply)(variables, x)
  logits = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, x)
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  error = float(jnp.max(jnp.abs(logits - reference)))
  assert error < 0.05 * float(jnp.max(jnp.abs(reference)))


def test_tiny_cifar_forward():
  model = MODELS["attention_tiny_cifar"].factory(num_classes=7)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
  variables = _he_variables(model, x)
  logits, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
      variables, x)
  chex.assert_shape(logits, (2, 7))
  chex.assert_tree_all_finite(logits)
  assert state["intermediates"]["stage3"][0].shape == (2, 8, 8, 32)
  assert "stem_bn" not in variables["params"]


# ------------------------------------------------------------------------ registry, errors


def test_registry_entries():
  public = {name for name, entry in MODELS.items() if not entry.test_only}
  assert public == {"attention56", "attention92", "attention56_cifar", "attention92_cifar"}
  for name, entry in MODELS.items():
    assert isinstance(entry, ModelEntry)
    assert "1704.06904" in entry.paper
    assert entry.input_size == (32 if "cifar" in name else 224) or entry.test_only
    model = entry.factory(num_classes=5)
    assert isinstance(model, ResidualAttentionNet) and model.num_classes == 5


def test_bad_input_is_rejected():
  model = MODELS["attention_tiny"].factory()
  with pytest.raises(ValueError, match="NHWC"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)))
  with pytest.raises(TypeError, match="float"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match="one entry per stage"):
    ResidualAttentionNet(stage_levels=(3, 2)).init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="stem_kernel"):
    ResidualAttentionNet(stem_kernel=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
