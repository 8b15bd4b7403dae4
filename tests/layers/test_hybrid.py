"""CBAM and GlobalContext against hand compositions, numpy and timm's published counts."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn

from attention_flax.layers.hybrid import CBAM, CBAMChannel, GlobalContext
from attention_flax.layers.spatial import SpatialAttention


def _images(shape, seed=0, positive=False):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return np.abs(x) + 0.1 if positive else x


def _run(layer, variables, x, **kwargs):
  y, state = layer.apply(variables, jnp.asarray(x), mutable=["intermediates"], **kwargs)
  return np.asarray(y), jax.tree.map(np.asarray, state["intermediates"])


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _param_count(layer, shape):
  variables = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros(shape))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def _perturbed(variables, seed=7, scale=0.5):
  """Initial variables moved off their special values (zero kernels, unit scales)."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      leaf + scale * jax.random.normal(key, leaf.shape, leaf.dtype)
      for leaf, key in zip(leaves, keys)])


# ----------------------------------------------------------------------------- CBAM


def test_cbam_channel_gate_matches_numpy():
  rng = np.random.default_rng(1)
  x = _images((2, 3, 4, 8))
  w1, w2 = rng.normal(size=(8, 2)), rng.normal(size=(2, 8))
  params = {"fc1": {"kernel": jnp.asarray(w1, jnp.float32)},
            "fc2": {"kernel": jnp.asarray(w2, jnp.float32)}}
  y, sown = _run(CBAMChannel(rd_ratio=0.25), {"params": params}, x)
  mlp = lambda v: np.maximum(v @ w1, 0.0) @ w2  # noqa: E731 - one shared MLP, no biases
  gate = _sigmoid(mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2))))[:, None, None, :]
  np.testing.assert_allclose(sown["channel_gate"][0], gate, rtol=1e-5)
  np.testing.assert_allclose(y, x * gate, rtol=1e-5, atol=1e-6)


def test_cbam_is_channel_gate_then_spatial_gate_with_its_own_params():
  x = _images((2, 5, 6, 32))
  layer = CBAM()
  variables = _perturbed(layer.init(jax.random.PRNGKey(0), x))
  y, sown = _run(layer, variables, x)
  params, stats = variables["params"], variables["batch_stats"]

  w1 = np.asarray(params["channel"]["fc1"]["kernel"])
  w2 = np.asarray(params["channel"]["fc2"]["kernel"])
  mlp = lambda v: np.maximum(v @ w1, 0.0) @ w2  # noqa: E731
  gate = _sigmoid(mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2))))[:, None, None, :]
  after_channel = x * gate
  # timm's spatial gate: maps stacked (mean, max), conv, BatchNorm, sigmoid.
  spatial = SpatialAttention(pool_order=("mean", "max"), use_bn=True)
  expected = spatial.apply({"params": params["spatial"], "batch_stats": stats["spatial"]},
                           after_channel)
  np.testing.assert_allclose(y, np.asarray(expected), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sown["channel"]["channel_gate"][0], gate, rtol=1e-5)
  assert sown["spatial"]["spatial_mask"][0].shape == (2, 5, 6, 1)


def test_cbam_in_two_calls_equals_cbam_in_one():
  # The folding protocol: gate_from_pooled(mean, max) returns the sown channel gate, and
  # after_gate applies the spatial gate only; together they are the layer.
  x = _images((2, 5, 6, 32))
  layer = CBAM()
  assert CBAM.pools == ("mean", "max")
  variables = _perturbed(layer.init(jax.random.PRNGKey(0), x))
  y, sown = _run(layer, variables, x)
  pools = (jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2)))
  gate = layer.apply(variables, *pools, method=CBAM.gate_from_pooled)
  np.testing.assert_allclose(gate, sown["channel"]["channel_gate"][0], rtol=1e-6)
  assert gate.shape == (2, 1, 1, 32)
  y2 = layer.apply(variables, x * gate, method=CBAM.after_gate)
  np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"\(N, C\) spatial mean and max"):
    layer.apply(variables, pools[0], pools[0][:, :3], method=CBAM.gate_from_pooled)


def test_cbam_defaults_reproduce_timm_cbam_module():
  variables = jax.eval_shape(CBAM().init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 256)))
  shapes = jax.tree.map(lambda a: a.shape, variables["params"])
  assert shapes == {
      "channel": {"fc1": {"kernel": (256, 16)}, "fc2": {"kernel": (16, 256)}},  # no biases
      "spatial": {"conv": {"kernel": (7, 7, 2, 1)}, "bn": {"scale": (1,), "bias": (1,)}}}
  assert _param_count(CBAM(), (1, 4, 4, 256)) == 2 * 256 * 16 + 2 * 7 * 7 + 2
  assert CBAM().pool_order == ("mean", "max")


@pytest.mark.parametrize("widths, published_gap", [
    # Bottleneck widths of ResNet-50 (3/4/6/3 blocks): timm cbam_resnet50 - resnet50.
    ([256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3, 28_073_576 - 25_557_032),
    # BasicBlock widths of ResNet-18: CBAM ResNet-18 - resnet18.
    ([64] * 2 + [128] * 2 + [256] * 2 + [512] * 2, 11_777_352 - 11_689_512),
])
def test_cbam_parameters_account_for_timm_published_counts(widths, published_gap):
  counts = {c: _param_count(CBAM(), (1, 2, 2, c)) for c in set(widths)}
  assert sum(counts[c] for c in widths) == published_gap


def test_cbam_train_step_updates_only_the_spatial_batch_norm():
  x = _images((2, 4, 4, 16))
  layer = CBAM()
  variables = layer.init(jax.random.PRNGKey(0), x)
  _, state = layer.apply(variables, x, train=True, mutable=["batch_stats"])
  old, new = variables["batch_stats"]["spatial"]["bn"], state["batch_stats"]["spatial"]["bn"]
  assert set(state["batch_stats"]) == {"spatial"}
  assert float(jnp.abs(new["mean"] - old["mean"]).max()) > 1e-4
  assert float(jnp.abs(new["var"] - old["var"]).max()) > 1e-6


def test_cbam_norm_reaches_the_spatial_batch_norm():
  """Default: PyTorch's unbiased running variance; a Flax BatchNorm factory: the biased one.
  From unit running variance both store 0.9 + 0.1 * v, v scaled by n / (n - 1) or not."""
  x = _images((2, 4, 4, 16))
  variables = CBAM().init(jax.random.key(0, impl="rbg"), x)

  def running_var(**kwargs):
    _, state = CBAM(**kwargs).apply(variables, x, train=True, mutable=["batch_stats"])
    return np.asarray(state["batch_stats"]["spatial"]["bn"]["var"])

  torch_rule = running_var()
  flax_rule = running_var(norm=functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5))
  assert float(flax_rule[0] - 0.9) > 1e-3  # a batch variance large enough to tell apart
  count = 2 * 4 * 4  # values per channel seen by the spatial BatchNorm
  np.testing.assert_allclose(torch_rule - 0.9, (flax_rule - 0.9) * count / (count - 1),
                             rtol=1e-5)


def test_cbam_without_spatial_bn_and_with_mlp_bias():
  variables = jax.eval_shape(CBAM(spatial_bn=False, mlp_bias=True).init, jax.random.PRNGKey(0),
                             jnp.zeros((1, 4, 4, 32)))
  assert set(variables) == {"params"}
  assert variables["params"]["channel"]["fc1"]["bias"].shape == (2,)
  assert set(variables["params"]["spatial"]) == {"conv"}


# ----------------------------------------------------------------------------- GlobalContext


def _layer_norm(v, scale, bias, eps=1e-6):
  mean = v.mean(-1, keepdims=True)
  var = v.var(-1, keepdims=True)
  return (v - mean) / np.sqrt(var + eps) * scale + bias


def _np_transform(p, context):
  hidden = context @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  hidden = np.maximum(_layer_norm(hidden, p["norm"]["scale"], p["norm"]["bias"]), 0.0)
  return hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _np_context(p, x):
  n, h, w, c = x.shape
  scores = (x @ p["conv_attn"]["kernel"] + p["conv_attn"]["bias"]).reshape(n, h * w)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return weights.reshape(n, h, w, 1), np.einsum("nhwc,nhw->nc", x, weights.reshape(n, h, w))


def test_context_weights_are_a_softmax_over_positions():
  x = _images((3, 4, 5, 16))
  layer = GlobalContext()
  variables = _perturbed(layer.init(jax.random.PRNGKey(0), x))
  _, sown = _run(layer, variables, x)
  weights = sown["context_weights"][0]
  assert weights.shape == (3, 4, 5, 1)
  np.testing.assert_allclose(weights.sum(axis=(1, 2, 3)), np.ones(3), rtol=1e-6)
  assert (weights > 0).all()
  expected, _ = _np_context(jax.tree.map(np.asarray, variables["params"]), x)
  np.testing.assert_allclose(weights, expected, rtol=1e-5)


def test_global_context_scale_fusion_matches_numpy():
  x = _images((2, 3, 4, 16))
  layer = GlobalContext()   # timm's default: scale fusion, rd 16 / 8 = 2, LayerNorm eps 1e-6
  variables = _perturbed(layer.init(jax.random.PRNGKey(0), x))
  y, sown = _run(layer, variables, x)
  p = jax.tree.map(np.asarray, variables["params"])
  assert set(p) == {"conv_attn", "mlp_scale"}
  assert p["mlp_scale"]["fc1"]["kernel"].shape == (16, 2)
  _, context = _np_context(p, x)
  gate = _sigmoid(_np_transform(p["mlp_scale"], context))[:, None, None, :]
  np.testing.assert_allclose(sown["channel_gate"][0], gate, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, x * gate, rtol=1e-5, atol=1e-6)


def test_global_context_add_fusion_is_the_identity_at_init():
  x = _images((2, 3, 4, 16))
  layer = GlobalContext(fuse="add")
  variables = layer.init(jax.random.PRNGKey(0), x)
  assert set(variables["params"]) == {"conv_attn", "mlp_add"}
  np.testing.assert_array_equal(np.asarray(layer.apply(variables, x)), x)


def test_global_context_both_fusions_scale_then_add():
  x = _images((2, 3, 4, 16))
  layer = GlobalContext(fuse="both")
  variables = _perturbed(layer.init(jax.random.PRNGKey(0), x))
  y, _ = _run(layer, variables, x)
  p = jax.tree.map(np.asarray, variables["params"])
  _, context = _np_context(p, x)
  gate = _sigmoid(_np_transform(p["mlp_scale"], context))[:, None, None, :]
  delta = _np_transform(p["mlp_add"], context)[:, None, None, :]
  np.testing.assert_allclose(y, x * gate + delta, rtol=1e-5, atol=1e-5)


def test_global_context_layer_norm_epsilon_is_timms():
  """A hidden vector with variance 1e-6 tells epsilon 1e-6 (timm's LayerNorm2d) from
  1e-5 (PyTorch's LayerNorm default): the normalised values are +-0.707 against +-0.30."""
  x = _images((1, 2, 2, 4))
  layer = GlobalContext(rd_channels=2, use_attn=False)
  variables = layer.init(jax.random.PRNGKey(0), x)
  p = jax.tree.map(np.asarray, variables["params"])
  p["mlp_scale"]["fc1"] = {"kernel": np.zeros((4, 2), np.float32),
                           "bias": np.array([0.0, 2e-3], np.float32)}
  p["mlp_scale"]["fc2"] = {"kernel": np.ones((2, 4), np.float32) * [[-1.0], [1.0]],
                           "bias": np.zeros(4, np.float32)}
  p["mlp_scale"]["norm"] = {"scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)}
  _, sown = _run(layer, {"params": jax.tree.map(jnp.asarray, p)}, x)
  # relu keeps only the upper value, 1e-3 / sqrt(1e-6 + eps).
  expected = _sigmoid(1e-3 / np.sqrt(1e-6 + 1e-6))
  np.testing.assert_allclose(sown["channel_gate"][0], np.full((1, 1, 1, 4), expected),
                             rtol=1e-4)
  assert abs(expected - _sigmoid(1e-3 / np.sqrt(1e-6 + 1e-5))) > 0.05


def test_global_context_without_attention_pools_the_mean():
  x = _images((2, 3, 4, 16))
  layer = GlobalContext(use_attn=False)
  variables = _perturbed(layer.init(jax.random.PRNGKey(0), x))
  y, sown = _run(layer, variables, x)
  assert "context_weights" not in sown and "conv_attn" not in variables["params"]
  p = jax.tree.map(np.asarray, variables["params"])
  gate = _sigmoid(_np_transform(p["mlp_scale"], x.mean(axis=(1, 2))))[:, None, None, :]
  np.testing.assert_allclose(y, x * gate, rtol=1e-5, atol=1e-6)


def test_global_context_parameter_count():
  # conv_attn C + 1; transform: fc1 C * rd + rd, LayerNorm 2 * rd, fc2 rd * C + C.
  c, rd = 64, 8
  expected = (c + 1) + (c * rd + rd) + 2 * rd + (rd * c + c)
  assert _param_count(GlobalContext(), (1, 2, 2, c)) == expected


def test_global_context_rejects_unknown_fusion():
  with pytest.raises(ValueError, match="fuse"):
    GlobalContext(fuse="mul").init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 8)))


# ----------------------------------------------------------------------------- contract

LAYERS = {
    "cbam": lambda **kw: CBAM(**kw),
    "cbam_channel": lambda **kw: CBAMChannel(**kw),
    "gc": lambda **kw: GlobalContext(**kw),
    "gc_both": lambda **kw: GlobalContext(fuse="both", **kw),
}
SHAPE = (2, 5, 6, 32)


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

  def loss(params, x):
    y, _ = layer.apply({**variables, "params": params}, x, train=True,
                       mutable=["batch_stats"])
    return jnp.sum(y ** 2)

  grads = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads[1]).sum()) > 0


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bad_inputs_get_clear_errors(name):
  layer = LAYERS[name]()
  with pytest.raises(ValueError, match="NHWC"):
    layer.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE[1:]))
  with pytest.raises(TypeError, match="float"):
    layer.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE, jnp.int32))
