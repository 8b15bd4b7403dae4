"""SE, EffectiveSE, ECA and Gather-Excite against numpy hand computations and timm's counts."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from attention_flax.layers.channel import (
    ECA,
    EffectiveSE,
    GatherExcite,
    SqueezeExcite,
    eca_kernel_size,
)


def _images(shape, seed=0, positive=False):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return np.abs(x) + 0.1 if positive else x


def _run(layer, variables, x):
  """Applies ``layer`` and returns (output, sown intermediates) as numpy."""
  y, state = layer.apply(variables, jnp.asarray(x), mutable=["intermediates"])
  return np.asarray(y), jax.tree.map(np.asarray, state["intermediates"])


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _param_count(layer, shape):
  variables = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros(shape))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables.get("params", {})))


# ----------------------------------------------------------------------------- SE


def test_se_matches_numpy_with_hand_set_weights():
  rng = np.random.default_rng(1)
  x = _images((2, 3, 4, 6))
  w1, b1 = rng.normal(size=(6, 3)), rng.normal(size=3)
  w2, b2 = rng.normal(size=(3, 6)), rng.normal(size=6)
  layer = SqueezeExcite(rd_ratio=0.5, rd_divisor=1)
  params = {"fc1": {"kernel": w1, "bias": b1}, "fc2": {"kernel": w2, "bias": b2}}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  y, sown = _run(layer, {"params": params}, x)

  squeezed = x.mean(axis=(1, 2))
  gate = _sigmoid(np.maximum(squeezed @ w1 + b1, 0.0) @ w2 + b2)
  np.testing.assert_allclose(sown["channel_gate"][0], gate[:, None, None, :], rtol=1e-5)
  np.testing.assert_allclose(y, x * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


def test_se_scales_each_channel_uniformly_over_space():
  x = _images((2, 5, 7, 16), positive=True)
  layer = SqueezeExcite(rd_ratio=0.25)
  variables = layer.init(jax.random.PRNGKey(0), x)
  y, sown = _run(layer, variables, x)
  ratio = y / x
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1, :1, :], ratio.shape),
                             rtol=1e-5)
  np.testing.assert_allclose(ratio[:, :1, :1, :], sown["channel_gate"][0], rtol=1e-5)
  assert np.all((ratio > 0) & (ratio < 1))  # a sigmoid gate only attenuates


@pytest.mark.parametrize("channels, kwargs, width", [
    (64, {}, 8),                       # timm: make_divisible(4, 8) = 8
    (64, {"rd_divisor": 1}, 4),        # the paper's C // 16
    (256, {}, 16),
    (4, {"rd_divisor": 1}, 1),         # 0.25 rounds to 0, clamped to 1
    (64, {"rd_channels": 5}, 5),
])
def test_se_reduced_width(channels, kwargs, width):
  variables = jax.eval_shape(SqueezeExcite(**kwargs).init, jax.random.PRNGKey(0),
                             jnp.zeros((1, 2, 2, channels)))
  assert variables["params"]["fc1"]["kernel"].shape == (channels, width)
  assert variables["params"]["fc2"]["kernel"].shape == (width, channels)


@pytest.mark.parametrize("widths, published_gap", [
    # Bottleneck output widths of ResNet-50, 3/4/6/3 blocks: seresnet50 - resnet50.
    ([256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3, 28_088_024 - 25_557_032),
    # BasicBlock widths of ResNet-18, 2 blocks per stage: seresnet18 - resnet18.
    ([64] * 2 + [128] * 2 + [256] * 2 + [512] * 2, 11_779_624 - 11_689_512),
])
def test_se_parameters_account_for_timm_published_counts(widths, published_gap):
  counts = {c: _param_count(SqueezeExcite(), (1, 2, 2, c)) for c in set(widths)}
  assert sum(counts[c] for c in widths) == published_gap


# ----------------------------------------------------------------------------- EffectiveSE


def test_effective_se_matches_numpy_hard_sigmoid():
  rng = np.random.default_rng(2)
  x = _images((2, 3, 3, 5))
  w, b = 4.0 * rng.normal(size=(5, 5)), 3.0 * rng.normal(size=5)
  params = {"fc": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}}
  y, sown = _run(EffectiveSE(), {"params": params}, x)
  z = x.mean(axis=(1, 2)) @ w + b
  gate = np.clip((z + 3.0) / 6.0, 0.0, 1.0)
  # The weights are large enough that both clipped regions and the linear part occur.
  assert (gate == 0).any() and (gate == 1).any() and ((gate > 0) & (gate < 1)).any()
  np.testing.assert_allclose(sown["channel_gate"][0][:, 0, 0], gate, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, x * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


def test_effective_se_has_one_full_width_layer():
  assert _param_count(EffectiveSE(), (1, 2, 2, 32)) == 32 * 32 + 32


# ----------------------------------------------------------------------------- ECA


@pytest.mark.parametrize("channels, k", [
    (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_kernel_size_table(channels, k):
  assert eca_kernel_size(channels) == k
  variables = jax.eval_shape(ECA().init, jax.random.PRNGKey(0),
                             jnp.zeros((1, 1, 1, channels)))
  assert variables["params"]["conv"]["kernel"].shape == (k, 1, 1)


def test_eca_parameters_account_for_timm_published_counts():
  # ecaresnet50d - resnet50d: one bias-free 1-D kernel per bottleneck.
  widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
  assert sum(eca_kernel_size(c) for c in widths) == 25_576_350 - 25_576_264


def test_eca_matches_numpy_zero_padded_correlation():
  x = _images((2, 2, 3, 9))
  w = np.array([0.5, -1.0, 2.0, 0.25, -0.75], np.float32)  # asymmetric: catches a flip
  params = {"conv": {"kernel": jnp.asarray(w.reshape(5, 1, 1))}}
  y, sown = _run(ECA(kernel_size=5), {"params": params}, x)
  pooled = np.pad(x.mean(axis=(1, 2)), ((0, 0), (2, 2)))
  z = np.stack([sum(w[j] * pooled[:, c + j] for j in range(5)) for c in range(9)], axis=1)
  gate = _sigmoid(z)
  np.testing.assert_allclose(sown["channel_gate"][0][:, 0, 0], gate, rtol=1e-5)
  np.testing.assert_allclose(y, x * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [4, 0, -3])
def test_eca_rejects_kernel_sizes_without_symmetric_padding(k):
  with pytest.raises(ValueError, match="odd"):
    ECA(kernel_size=k).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 8)))


# ----------------------------------------------------------------------------- Gather-Excite


def test_gather_excite_global_parameter_free_is_sigmoid_of_the_mean():
  x = _images((2, 3, 4, 5))
  layer = GatherExcite(use_mlp=False)
  variables = layer.init(jax.random.PRNGKey(0), x)
  assert "params" not in variables
  y, sown = _run(layer, variables, x)
  gate = _sigmoid(x.mean(axis=(1, 2), keepdims=True))
  np.testing.assert_allclose(sown["channel_gate"][0], gate, rtol=1e-5)
  np.testing.assert_allclose(y, x * gate, rtol=1e-5, atol=1e-6)


def test_gather_excite_with_mlp_matches_numpy():
  rng = np.random.default_rng(3)
  x = _images((2, 3, 4, 8))
  layer = GatherExcite(rd_ratio=0.25)   # timm's default form: mean -> MLP -> sigmoid
  w1, b1 = rng.normal(size=(8, 2)), rng.normal(size=2)
  w2, b2 = rng.normal(size=(2, 8)), rng.normal(size=8)
  params = {"mlp": {"fc1": {"kernel": w1, "bias": b1}, "fc2": {"kernel": w2, "bias": b2}}}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  y, _ = _run(layer, {"params": params}, x)
  gate = _sigmoid(np.maximum(x.mean(axis=(1, 2)) @ w1 + b1, 0.0) @ w2 + b2)
  np.testing.assert_allclose(y, x * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extent, size", [(2, (5, 6)), (4, (7, 4))])
def test_gather_excite_local_extent_matches_numpy(extent, size):
  height, width = size
  x = _images((2, height, width, 3))
  layer = GatherExcite(extent=extent, use_mlp=False)
  y, sown = _run(layer, {}, x)
  window, pad = 2 * extent - 1, extent - 1
  out_h, out_w = -(-height // extent), -(-width // extent)
  gathered = np.zeros((2, out_h, out_w, 3), np.float32)
  for i in range(out_h):
    for j in range(out_w):
      r0, c0 = i * extent - pad, j * extent - pad
      rows = slice(max(r0, 0), min(r0 + window, height))
      cols = slice(max(c0, 0), min(c0 + window, width))
      gathered[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))  # padding not counted
  gate = _sigmoid(gathered)
  np.testing.assert_allclose(sown["gather_gate"][0], gate, rtol=1e-5)
  # Nearest upsampling: output row r reads gathered row floor(r * out_h / height).
  rows = [r * out_h // height for r in range(height)]
  cols = [c * out_w // width for c in range(width)]
  np.testing.assert_allclose(y, x * gate[:, rows][:, :, cols], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"extra_params": True}, "parameter-free"),
    ({"extent": 3}, "even"),
    ({"extent": -2}, "even"),
])
def test_gather_excite_rejects_unsupported_configs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    GatherExcite(**kwargs).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8)))


# ----------------------------------------------------------------------------- contract

LAYERS = {
    "se": lambda **kw: SqueezeExcite(rd_ratio=0.25, **kw),
    "ese": lambda **kw: EffectiveSE(**kw),
    "eca": lambda **kw: ECA(**kw),
    "ge": lambda **kw: GatherExcite(**kw),
    "ge_local": lambda **kw: GatherExcite(extent=2, **kw),
}
SHAPE = (2, 5, 6, 16)


class ContractTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(name, name) for name in LAYERS])
  def test_jit_equals_eager(self, name):
    layer = LAYERS[name]()
    x = jnp.asarray(_images(SHAPE))
    variables = layer.init(jax.random.PRNGKey(0), x)
    y = self.variant(lambda v, x: layer.apply(v, x))(variables, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(layer.apply(variables, x)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bfloat16_runs_and_stays_close(name):
  x = jnp.asarray(_images(SHAPE))
  variables = LAYERS[name]().init(jax.random.PRNGKey(0), x)
  y16 = LAYERS[name](dtype=jnp.bfloat16).apply(variables, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  chex.assert_tree_all_finite(y16)
  y32 = LAYERS[name]().apply(variables, x)
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), atol=0.05)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradients_are_finite(name):
  layer = LAYERS[name]()
  x = jnp.asarray(_images(SHAPE))
  variables = layer.init(jax.random.PRNGKey(0), x)
  loss = lambda v, x: jnp.sum(layer.apply(v, x) ** 2)  # noqa: E731
  grads = jax.grad(loss, argnums=(0, 1))(variables, x)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads[1]).sum()) > 0


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bad_inputs_get_clear_errors(name):
  layer = LAYERS[name]()
  with pytest.raises(ValueError, match="NHWC"):
    layer.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE[1:]))
  with pytest.raises(TypeError, match="float"):
    layer.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE, jnp.int32))


@pytest.mark.parametrize("cls, kwargs", [(SqueezeExcite, {}), (EffectiveSE, {}),
                                         (ECA, {"kernel_size": 3})])
def test_gate_from_a_given_mean_is_the_sown_gate(cls, kwargs):
  # gate_from_pooled: the gate of mean_hw(x), returned instead of applied, as x's path sows it.
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 32)) + jnp.linspace(-1.0, 1.0, 32)
  layer = cls(**kwargs)
  assert cls.pools == ("mean",)
  variables = layer.init(jax.random.key(0), x)
  y, state = layer.apply(variables, x, mutable=["intermediates"])
  sown = state["intermediates"]["channel_gate"][0]
  gate, state2 = layer.apply(variables, jnp.mean(x, axis=(1, 2)),
                             method=cls.gate_from_pooled, mutable=["intermediates"])
  assert gate.shape == (2, 1, 1, 32)
  np.testing.assert_allclose(gate, sown, atol=1e-6, rtol=0)
  np.testing.assert_allclose(state2["intermediates"]["channel_gate"][0], sown, atol=1e-6)
  np.testing.assert_allclose(x * gate, y, atol=1e-6, rtol=0)
  assert float(jnp.std(gate)) > 1e-3  # the gates differ across channels and samples
  # The pooled path creates the same parameters as the image path.
  from_pooled = layer.init(jax.random.key(0), jnp.mean(x, axis=(1, 2)),
                           method=cls.gate_from_pooled)
  assert jax.tree.map(jnp.shape, from_pooled) == jax.tree.map(jnp.shape, variables)
  with pytest.raises(ValueError, match=r"\(N, C\)"):
    layer.apply(variables, jnp.mean(x, axis=1), method=cls.gate_from_pooled)
