"""SpatialAttention and CoordAttention against numpy hand computations."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn

from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.layers.spatial import CoordAttention, SpatialAttention

# The batch-norm factories the layers accept: the default keeps PyTorch's running-variance
# rule (unbiased, n / (n - 1)), Flax's BatchNorm the biased one.
NORMS = {"torch": (TorchBatchNorm, True),
         "flax": (functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5), False)}


def _images(shape, seed=0, positive=False):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return np.abs(x) + 0.1 if positive else x


def _run(layer, variables, x, **kwargs):
  y, state = layer.apply(variables, jnp.asarray(x), mutable=["intermediates"], **kwargs)
  return np.asarray(y), jax.tree.map(np.asarray, state["intermediates"])


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _hard_swish(z):
  return z * np.clip(z + 3.0, 0.0, 6.0) / 6.0


def _np_correlate(maps, kernel):
  """'Same' k x k cross-correlation with symmetric zero padding: (N, H, W, I) with kernel
  (k, k, I, 1) -> (N, H, W)."""
  k = kernel.shape[0]
  p = (k - 1) // 2
  padded = np.pad(maps, ((0, 0), (p, p), (p, p), (0, 0)))
  n, h, w, _ = maps.shape
  out = np.zeros((n, h, w), np.float64)
  for a in range(k):
    for b in range(k):
      out += padded[:, a:a + h, b:b + w, :] @ kernel[a, b, :, 0]
  return out


# ----------------------------------------------------------------------------- spatial


@pytest.mark.parametrize("pool_order", [("max", "mean"), ("mean", "max"), ("max",), ("mean",),
                                        ("mean_max",), ("mean_max", "max", "mean")])
@pytest.mark.parametrize("k", [7, 3])
def test_spatial_mask_matches_numpy_correlation(pool_order, k):
  x = _images((2, 5, 6, 4))   # smaller than the 7x7 kernel: the padding matters
  kernel = np.random.default_rng(1).normal(size=(k, k, len(pool_order), 1)).astype(np.float32)
  layer = SpatialAttention(kernel_size=k, pool_order=pool_order)
  y, sown = _run(layer, {"params": {"conv": {"kernel": jnp.asarray(kernel)}}}, x)
  pools = {"max": x.max(axis=-1), "mean": x.mean(axis=-1)}
  pools["mean_max"] = 0.5 * pools["mean"] + 0.5 * pools["max"]
  maps = np.stack([pools[name] for name in pool_order], axis=-1)
  mask = _sigmoid(_np_correlate(maps, kernel))[..., None]
  np.testing.assert_allclose(sown["spatial_mask"][0], mask, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, x * mask, rtol=1e-5, atol=1e-6)


def test_pool_order_only_permutes_the_kernel_inputs():
  x = _images((1, 6, 6, 5), seed=2)
  kernel = np.random.default_rng(3).normal(size=(7, 7, 2, 1)).astype(np.float32)
  authors = SpatialAttention(pool_order=("max", "mean"))
  timm = SpatialAttention(pool_order=("mean", "max"))
  y_authors = authors.apply({"params": {"conv": {"kernel": jnp.asarray(kernel)}}}, x)
  y_timm = timm.apply({"params": {"conv": {"kernel": jnp.asarray(kernel[:, :, ::-1])}}}, x)
  np.testing.assert_allclose(np.asarray(y_authors), np.asarray(y_timm), rtol=1e-5, atol=1e-6)


def test_spatial_mask_is_shared_by_all_channels():
  x = _images((2, 5, 7, 6), positive=True)
  layer = SpatialAttention()
  variables = layer.init(jax.random.PRNGKey(0), x)
  y, sown = _run(layer, variables, x)
  ratio = y / x
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-5)
  np.testing.assert_allclose(ratio[..., :1], sown["spatial_mask"][0], rtol=1e-5)


def test_spatial_parameters():
  variables = jax.eval_shape(SpatialAttention(use_bn=True).init, jax.random.PRNGKey(0),
                             jnp.zeros((1, 8, 8, 3)))
  assert jax.tree.map(lambda a: a.shape, variables["params"]) == {
      "conv": {"kernel": (7, 7, 2, 1)}, "bn": {"scale": (1,), "bias": (1,)}}
  assert set(variables["batch_stats"]["bn"]) == {"mean", "var"}
  no_bn = jax.eval_shape(SpatialAttention().init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  assert set(no_bn) == {"params"} and set(no_bn["params"]) == {"conv"}


def _running_var(batch_var, count, unbiased):
  """0.9 * 1 + 0.1 * v from unit running variance; PyTorch's rule stores v * n / (n - 1)."""
  return 0.9 + 0.1 * batch_var * (count / (count - 1) if unbiased else 1.0)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_spatial_batch_norm_train_step_uses_and_records_batch_statistics(norm):
  x = _images((3, 4, 5, 2))
  kernel = np.random.default_rng(4).normal(size=(7, 7, 2, 1)).astype(np.float32)
  factory, unbiased = NORMS[norm]
  layer = SpatialAttention(use_bn=True, norm=factory)
  variables = {"params": {"conv": {"kernel": jnp.asarray(kernel)},
                          "bn": {"scale": jnp.full((1,), 1.5), "bias": jnp.full((1,), -0.5)}},
               "batch_stats": {"bn": {"mean": jnp.zeros((1,)), "var": jnp.ones((1,))}}}
  y, state = layer.apply(variables, x, train=True, mutable=["batch_stats"])
  z = _np_correlate(np.stack([x.max(-1), x.mean(-1)], axis=-1), kernel)
  mean, var = z.mean(), z.var()   # both normalise with the biased batch variance
  mask = _sigmoid((z - mean) / np.sqrt(var + 1e-5) * 1.5 - 0.5)[..., None]
  np.testing.assert_allclose(np.asarray(y), x * mask, rtol=1e-4, atol=1e-5)
  stats = state["batch_stats"]["bn"]
  np.testing.assert_allclose(np.asarray(stats["mean"]), [0.1 * mean], rtol=1e-4)
  # 3 * 4 * 5 = 60 values per channel: PyTorch's rule stores 60/59 of the batch variance.
  np.testing.assert_allclose(np.asarray(stats["var"]), [_running_var(var, 60, unbiased)],
                             rtol=1e-5)
  # Evaluation uses the running statistics instead and leaves them alone.
  y_eval = layer.apply(variables, x)
  mask_eval = _sigmoid(z / np.sqrt(1.0 + 1e-5) * 1.5 - 0.5)[..., None]
  np.testing.assert_allclose(np.asarray(y_eval), x * mask_eval, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool_order", [("max", "max"), (), ("avg", "max"),
                                        ("max", "mean", "mean")])
def test_spatial_rejects_bad_pool_order(pool_order):
  with pytest.raises(ValueError, match="pool_order"):
    SpatialAttention(pool_order=pool_order).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))


@pytest.mark.parametrize("k", [6, 0])
def test_spatial_rejects_even_kernel(k):
  with pytest.raises(ValueError, match="odd"):
    SpatialAttention(kernel_size=k).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))


# ----------------------------------------------------------------------------- coordinate


def _coord_params(channels, mip, seed=5, bias=False):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  params = {"conv1": {"kernel": f(channels, mip)}, "conv_h": {"kernel": f(mip, channels)},
            "conv_w": {"kernel": f(mip, channels)},
            "bn1": {"scale": f(mip), "bias": f(mip)}}
  if bias:
    for name, width in (("conv1", mip), ("conv_h", channels), ("conv_w", channels)):
      params[name]["bias"] = f(width)
  stats = {"bn1": {"mean": f(mip), "var": jnp.abs(f(mip)) + 0.5}}
  return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("use_bias", [False, True])
def test_coord_attention_matches_numpy(use_bias):
  x = _images((2, 4, 5, 6))
  variables = _coord_params(6, 3, bias=use_bias)
  layer = CoordAttention(rd_channels=3, use_bias=use_bias)
  y, sown = _run(layer, variables, x)
  p = jax.tree.map(np.asarray, variables)
  lin = lambda v, name: v @ p["params"][name]["kernel"] + (  # noqa: E731
      p["params"][name]["bias"] if use_bias else 0.0)
  strips = np.concatenate([x.mean(axis=2), x.mean(axis=1)], axis=1)     # (N, H + W, C)
  bn, stats = p["params"]["bn1"], p["batch_stats"]["bn1"]
  hidden = (lin(strips, "conv1") - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)
  hidden = _hard_swish(hidden * bn["scale"] + bn["bias"])
  a_h = _sigmoid(lin(hidden[:, :4], "conv_h"))[:, :, None, :]
  a_w = _sigmoid(lin(hidden[:, 4:], "conv_w"))[:, None, :, :]
  np.testing.assert_allclose(sown["coord_gate_h"][0], a_h, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sown["coord_gate_w"][0], a_w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(y, x * a_h * a_w, rtol=1e-4, atol=1e-6)


def test_coord_attention_output_is_input_times_sown_gates():
  x = _images((2, 7, 3, 16))
  layer = CoordAttention()
  variables = layer.init(jax.random.PRNGKey(0), x)
  y, sown = _run(layer, variables, x)
  a_h, a_w = sown["coord_gate_h"][0], sown["coord_gate_w"][0]
  assert a_h.shape == (2, 7, 1, 16) and a_w.shape == (2, 1, 3, 16)
  np.testing.assert_allclose(y, x * a_h * a_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("channels, kwargs, mip", [
    (64, {}, 8),                        # paper: max(8, 64 // 32)
    (512, {}, 16),                      # paper: 512 // 32
    (1024, {}, 32),
    (256, {"rd_ratio": 1 / 24}, 8),     # timm: make_divisible(256 / 16 * 2 / 3, 8)
    (768, {"rd_ratio": 1 / 24}, 32),    # timm: make_divisible(32, 8)
    (64, {"rd_divisor": 1, "min_channels": 4}, 4),
    (64, {"rd_channels": 5}, 5),
])
def test_coord_attention_width(channels, kwargs, mip):
  variables = jax.eval_shape(CoordAttention(**kwargs).init, jax.random.PRNGKey(0),
                             jnp.zeros((1, 2, 3, channels)))
  shapes = jax.tree.map(lambda a: a.shape, variables["params"])
  # timm's CoordAttn has no bias on any of its three 1x1 layers.
  assert shapes == {"conv1": {"kernel": (channels, mip)}, "bn1": {"scale": (mip,), "bias": (mip,)},
                    "conv_h": {"kernel": (mip, channels)}, "conv_w": {"kernel": (mip, channels)}}


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_coord_attention_train_records_statistics_over_both_strips(norm):
  x = _images((2, 3, 4, 6))
  variables = _coord_params(6, 3)
  variables["batch_stats"] = {"bn1": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
  factory, unbiased = NORMS[norm]
  _, state = CoordAttention(rd_channels=3, norm=factory).apply(variables, x, train=True,
                                                               mutable=["batch_stats"])
  strips = np.concatenate([x.mean(axis=2), x.mean(axis=1)], axis=1)
  z = strips @ np.asarray(variables["params"]["conv1"]["kernel"])     # (N, H + W, mip)
  stats = state["batch_stats"]["bn1"]
  np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * z.mean(axis=(0, 1)),
                             rtol=1e-4, atol=1e-6)
  # N * (H + W) = 2 * (3 + 4) = 14 values per channel.
  np.testing.assert_allclose(np.asarray(stats["var"]),
                             _running_var(z.var(axis=(0, 1)), 14, unbiased), rtol=1e-5)


def test_default_norm_is_torch_batch_norm_with_pytorch_settings():
  for layer in (SpatialAttention(), CoordAttention()):
    assert layer.norm is TorchBatchNorm
  bn = TorchBatchNorm()
  assert (bn.momentum, bn.epsilon, bn.unbiased_running_var) == (0.9, 1e-5, True)


@pytest.mark.parametrize("layer", [SpatialAttention(use_bn=True, norm="batch"),
                                   CoordAttention(norm=None)])
def test_norm_that_is_not_a_factory_is_a_type_error(layer):
  with pytest.raises(TypeError, match="TorchBatchNorm"):
    layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8)))


# ----------------------------------------------------------------------------- contract

LAYERS = {
    "spatial": lambda **kw: SpatialAttention(**kw),
    "spatial_bn": lambda **kw: SpatialAttention(use_bn=True, pool_order=("mean", "max"), **kw),
    "coord": lambda **kw: CoordAttention(**kw),
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
