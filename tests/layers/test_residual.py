"""ResidualUnit, ResidualAttention and the bilinear resize: hand-checked numbers."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from attention_flax.layers.residual import ResidualAttention, ResidualUnit, resize_bilinear

EPS = 1e-5  # BatchNorm epsilon: at init an eval-mode norm divides by sqrt(1 + EPS).


def _normal(shape, seed=1, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _zero_conv3(params, names):
  """Zeroes the last convolution of the named units, turning them into identities."""
  params = jax.tree.map(lambda a: a, params)  # a copy we may edit
  for name in names:
    kernel = params[name]["conv3"]["kernel"]
    params[name]["conv3"]["kernel"] = jnp.zeros_like(kernel)
  return params


def _max_pool_np(x):
  """3x3 max-pool, stride 2, one pixel of -inf padding each side, by hand."""
  n, h, w, c = x.shape
  padded = np.full((n, h + 2, w + 2, c), -np.inf, np.float64)
  padded[:, 1:-1, 1:-1] = x
  out_h, out_w = (h + 1) // 2, (w + 1) // 2
  out = np.empty((n, out_h, out_w, c), np.float64)
  for i in range(out_h):
    for j in range(out_w):
      out[:, i, j] = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
  return out


# ----------------------------------------------------------------------------- resize


def test_resize_half_pixel_by_hand():
  x = jnp.array([0.0, 1.0]).reshape(1, 2, 1, 1)
  y = resize_bilinear(x, (4, 1))
  # Output pixel i samples (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped.
  np.testing.assert_allclose(np.asarray(y).ravel(), [0.0, 0.25, 0.75, 1.0], atol=1e-7)


def test_resize_aligned_corners_by_hand():
  x = jnp.array([0.0, 2.0, 4.0]).reshape(1, 3, 1, 1)
  y = resize_bilinear(x, (5, 1), align_corners=True)
  np.testing.assert_allclose(np.asarray(y).ravel(), [0.0, 1.0, 2.0, 3.0, 4.0], atol=1e-6)
  # Both axes at once: a bilinear function is reproduced exactly, corners included.
  rows, cols = np.meshgrid(np.arange(3.0), np.arange(4.0), indexing="ij")
  image = jnp.asarray((2 * rows + 3 * cols)[None, :, :, None], jnp.float32)
  out = np.asarray(resize_bilinear(image, (5, 7), align_corners=True))[0, :, :, 0]
  r, c = np.meshgrid(np.linspace(0, 2, 5), np.linspace(0, 3, 7), indexing="ij")
  np.testing.assert_allclose(out, 2 * r + 3 * c, atol=1e-5)


def test_resize_same_size_is_identity_and_keeps_dtype():
  x = _normal((1, 3, 5, 2), dtype=jnp.bfloat16)
  assert resize_bilinear(x, (3, 5)) is x
  assert resize_bilinear(x, (6, 9)).dtype == jnp.bfloat16
  assert resize_bilinear(x, (6, 9), align_corners=True).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- unit


def test_unit_identity_shortcut_is_exact():
  x = _normal((2, 11, 9, 8))  # the shapes of the shared module below: compiled ops reused
  unit = ResidualUnit()
  variables = unit.init(jax.random.PRNGKey(0), x)
  assert "shortcut" not in variables["params"]
  params = _zero_conv3({"u": variables["params"]}, ["u"])["u"]
  y = unit.apply({**variables, "params": params}, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_unit_projection_acts_on_the_preactivated_input():
  x = _normal((2, 7, 7, 8))
  unit = ResidualUnit(features=16, stride=2)
  variables = unit.init(jax.random.PRNGKey(0), x)
  params = _zero_conv3({"u": variables["params"]}, ["u"])["u"]
  y = unit.apply({**variables, "params": params}, x)
  assert y.shape == (2, 4, 4, 16)  # ceil(7 / 2)
  # Eval-mode BN at init is x / sqrt(1 + eps); the 1x1 stride-2 conv samples 0, 2, 4, 6.
  pre = np.maximum(np.asarray(x, np.float64) / np.sqrt(1 + EPS), 0.0)[:, ::2, ::2]
  kernel = np.asarray(params["shortcut"]["kernel"], np.float64)[0, 0]
  np.testing.assert_allclose(np.asarray(y), pre @ kernel, rtol=1e-5, atol=1e-5)


def test_unit_parameter_counts_by_hand():
  x = jnp.zeros((1, 5, 5, 8))
  variables = jax.eval_shape(ResidualUnit(features=16).init, jax.random.PRNGKey(0), x)
  # bn1 2*8 + conv1 8*4 + bn2 2*4 + conv2 9*4*4 + bn3 2*4 + conv3 4*16 + shortcut 8*16.
  assert _count(variables["params"]) == 16 + 32 + 8 + 144 + 8 + 64 + 128 == 400
  assert _count(variables["batch_stats"]) == 2 * (8 + 4 + 4)
  shapes = jax.tree.map(lambda a: a.shape, variables["params"])
  assert shapes["conv2"]["kernel"] == (3, 3, 4, 4)
  assert shapes["shortcut"]["kernel"] == (1, 1, 8, 16)
  same = jax.eval_shape(ResidualUnit().init, jax.random.PRNGKey(0), x)
  assert _count(same["params"]) == 16 + 8 * 2 + 4 + 9 * 2 * 2 + 4 + 2 * 8 == 92


def test_unit_rejects_bad_settings():
  x = _normal((1, 5, 5, 8))
  with pytest.raises(ValueError, match="features"):
    ResidualUnit(features=0).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="stride"):
    ResidualUnit(stride=0).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="NHWC"):
    ResidualUnit().init(jax.random.PRNGKey(0), x[0])


# ----------------------------------------------------------------------------- module


@functools.lru_cache(maxsize=None)
def _shared_module():
  """One two-level module on an odd, non-square input, initialised once for many tests."""
  layer = ResidualAttention(levels=2)
  x = _normal((2, 11, 9, 8))
  return layer, layer.init(jax.random.PRNGKey(0), x), x


@pytest.fixture
def module_and_variables():
  return _shared_module()


@pytest.mark.parametrize("size, levels, pooled", [
    (28, 3, (14, 7, 4)),
    (33, 3, (17, 9, 5)),
    (56, 3, (28, 14, 7)),
    (7, 3, (4, 2, 1)),
    (1, 3, (1, 1, 1)),
    (33, 2, (17, 9)),
    (33, 1, (17,)),
])
def test_any_size_shapes_at_every_level(size, levels, pooled):
  """Shapes only (``jax.eval_shape``): output, mask, and every level of the hourglass."""
  layer = ResidualAttention(levels=levels)
  x = jnp.zeros((1, size, size, 8))

  def run(key, x):
    variables = layer.init(key, x)
    return layer.apply(variables, x, mutable=["intermediates"], capture_intermediates=True)

  y, state = jax.eval_shape(run, jax.random.PRNGKey(0), x)
  assert y.shape == x.shape
  inter = state["intermediates"]
  assert inter["residual_mask"][0].shape == x.shape
  for level, side in enumerate(pooled, start=1):
    units = [k for k in inter if k.startswith(f"down{level}_")]
    assert units == [f"down{level}_{j + 1}" for j in range(1 if level < levels else 2)]
    for name in units:
      assert inter[name]["__call__"][0].shape == (1, side, side, 8)
    if level < levels:
      assert inter[f"skip{level}"]["__call__"][0].shape == (1, side, side, 8)
      assert inter[f"up{level}_1"]["__call__"][0].shape == (1, side, side, 8)
  assert f"down{levels + 1}_1" not in inter and f"skip{levels}" not in inter


def test_mask_is_a_soft_mask(module_and_variables):
  layer, variables, x = module_and_variables
  y, state = layer.apply(variables, x, train=True, mutable=["intermediates", "batch_stats"])
  chex.assert_shape(y, x.shape)
  chex.assert_tree_all_finite(y)
  (mask,) = state["intermediates"]["residual_mask"]
  chex.assert_shape(mask, x.shape)
  # Train-mode norms keep the mask logits moderate: M strictly inside (0, 1), and varied.
  assert 0.0 < float(mask.min()) and float(mask.max()) < 1.0
  assert float(mask.std()) > 0.01


@pytest.mark.parametrize("levels, mask_units", [
    (1, {"down1_1", "down1_2"}),
    (2, {"down1_1", "down2_1", "down2_2", "skip1", "up1_1"}),
    (3, {"down1_1", "down2_1", "down3_1", "down3_2", "skip1", "skip2", "up2_1", "up1_1"}),
])
def test_levels_set_the_children(levels, mask_units):
  shapes = jax.eval_shape(ResidualAttention(levels=levels).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 16, 16, 8)))
  fixed = {"pre1", "trunk1", "trunk2", "post1", "mask_bn1", "mask_conv1", "mask_bn2",
           "mask_conv2"}
  assert set(shapes["params"]) == fixed | mask_units
  unit = 92  # an 8-channel identity unit, counted in test_unit_parameter_counts_by_hand
  head = 2 * (2 * 8 + 8 * 8)
  assert _count(shapes["params"]) == (4 + len(mask_units)) * unit + head


def test_p_t_r_set_the_number_of_units():
  shapes = jax.eval_shape(ResidualAttention(p=2, t=3, r=2, levels=2).init,
                          jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 8)))
  names = set(shapes["params"])
  assert {"pre1", "pre2", "post1", "post2", "trunk1", "trunk2", "trunk3"} <= names
  # r = 2: two units per level on the way down and up, 2 r = 4 at the bottom.
  assert {"down1_1", "down1_2", "up1_1", "up1_2", "skip1"} <= names
  assert {f"down2_{j}" for j in range(1, 5)} <= names and "down2_5" not in names


def test_output_is_one_plus_mask_times_trunk(module_and_variables):
  layer, variables, x = module_and_variables
  params = jax.tree.map(lambda a: a, variables["params"])
  params["mask_conv2"]["kernel"] = jnp.zeros_like(params["mask_conv2"]["kernel"])
  full = {**variables, "params": params}
  y, state = layer.apply(full, x, mutable=["intermediates"])
  np.testing.assert_array_equal(np.asarray(state["intermediates"]["residual_mask"][0]), 0.5)

  def run(name, inputs):
    sub = {c: v[name] for c, v in full.items()}
    return ResidualUnit().apply(sub, inputs)

  trunk = run("trunk2", run("trunk1", run("pre1", x)))
  np.testing.assert_allclose(np.asarray(y), np.asarray(run("post1", 1.5 * trunk)),
                             rtol=1e-5, atol=1e-5)


def test_mask_branch_adds_only_the_skips(module_and_variables):
  """With identity units, the input of the mask head is the hourglass of max-pools and
  bilinear up-samplings plus the skips, and nothing else (no re-added pre-pool feature)."""
  layer, variables, x = module_and_variables
  params = _zero_conv3(variables["params"], ["pre1", "down1_1", "down2_1", "down2_2",
                                             "skip1", "up1_1"])
  _, state = layer.apply({**variables, "params": params}, x, capture_intermediates=True,
                         mutable=["intermediates"])
  head_input = np.asarray(state["intermediates"]["mask_bn1"]["__call__"][0]) * np.sqrt(1 + EPS)
  level1 = _max_pool_np(np.asarray(x, np.float64))  # (2, 6, 5, 8); also the skip
  level2 = _max_pool_np(level1)  # (2, 3, 3, 8)
  up = np.asarray(jax.image.resize(jnp.asarray(level2, jnp.float32), level1.shape, "bilinear"))
  expected = jax.image.resize(jnp.asarray(up + level1, jnp.float32), x.shape, "bilinear")
  np.testing.assert_allclose(head_input, np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_aligned_corners_option_changes_only_the_sampling(module_and_variables):
  layer, variables, x = module_and_variables
  aligned = layer.clone(align_corners=True)
  y_aligned = aligned.apply(variables, x)
  chex.assert_tree_all_finite(y_aligned)
  assert float(jnp.max(jnp.abs(layer.apply(variables, x) - y_aligned))) > 1e-4


def test_width_change_happens_in_the_first_unit():
  x = jnp.zeros((1, 8, 8, 8))
  layer = ResidualAttention(levels=1, features=16)
  y, state = jax.eval_shape(
      lambda key: layer.init_with_output(key, x, mutable=True), jax.random.PRNGKey(0))
  assert y.shape == (1, 8, 8, 16)
  assert state["intermediates"]["residual_mask"][0].shape == (1, 8, 8, 16)
  assert state["params"]["pre1"]["shortcut"]["kernel"].shape == (1, 1, 8, 16)
  assert "shortcut" not in state["params"]["trunk1"]
  with pytest.raises(ValueError, match="p >= 1"):
    ResidualAttention(p=0, features=16).init(jax.random.PRNGKey(0), x)


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_eager(self):
    layer, variables, x = _shared_module()
    y = self.variant(lambda v, x: layer.apply(v, x))(variables, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(layer.apply(variables, x)),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_compute(module_and_variables):
  layer, variables, x = module_and_variables
  def run(module, x):
    return module.apply(variables, x, train=True, mutable=["batch_stats"])[0]

  y32 = run(layer, x)
  y16 = jax.jit(run, static_argnums=0)(layer.clone(dtype=jnp.bfloat16), x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  chex.assert_tree_all_finite(y16)
  error = float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32)))
  assert error < 0.05 * float(jnp.max(jnp.abs(y32)))


def test_gradients_reach_both_branches(module_and_variables):
  layer, variables, x = module_and_variables

  def loss(params):
    y, _ = layer.apply({**variables, "params": params}, x, train=True,
                       mutable=["batch_stats"])
    return jnp.mean(y * y)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  chex.assert_tree_all_finite(grads)
  for name in ("trunk1", "down2_2", "skip1", "mask_conv2"):
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads[name]))) > 0.0


def test_train_mode_updates_batch_stats(module_and_variables):
  layer, variables, x = module_and_variables
  _, state = layer.apply(variables, x, train=True, mutable=["batch_stats"])
  stats = state["batch_stats"]
  # pre1's first norm sees x itself: with momentum 0.9 the running mean moves from 0 a
  # tenth of the way to the batch mean, and the variance from 1 towards the batch's
  # unbiased variance (PyTorch's rule, the default TorchBatchNorm's).
  np.testing.assert_allclose(np.asarray(stats["pre1"]["bn1"]["mean"]),
                             0.1 * np.asarray(x).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats["pre1"]["bn1"]["var"]),
                             0.9 + 0.1 * np.asarray(x).var(axis=(0, 1, 2), ddof=1), rtol=1e-4)
  moved = float(jnp.max(jnp.abs(stats["down2_1"]["bn1"]["mean"])))
  assert moved > 0.0
  # The norm factory is honoured: Flax's BatchNorm keeps the biased variance, and its
  # variables have the same names and shapes.
  flax_layer = layer.clone(norm=nn.BatchNorm)
  _, flax_state = flax_layer.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(flax_state["batch_stats"]["pre1"]["bn1"]["var"]),
                             0.9 + 0.1 * np.asarray(x).var(axis=(0, 1, 2)), rtol=1e-4)


def test_bad_input_and_settings_are_rejected():
  x = _normal((1, 8, 8, 4))
  layer = ResidualAttention()
  with pytest.raises(ValueError, match="NHWC"):
    layer.init(jax.random.PRNGKey(0), x[0])
  with pytest.raises(TypeError, match="float"):
    layer.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 4), jnp.int32))
  for kwargs, field in [({"levels": 0}, "levels"), ({"r": 0}, "r"), ({"t": -1}, "t"),
                        ({"p": 1.5}, "p")]:
    with pytest.raises(ValueError, match=field):
      ResidualAttention(**kwargs).init(jax.random.PRNGKey(0), x)
