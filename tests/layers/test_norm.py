"""TorchBatchNorm: one-pass shifted statistics against the two-pass formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax.layers import norm
from attention_flax.layers.norm import TorchBatchNorm, affine_max, extrema

KEY = jax.random.key(0)


def _two_pass(x, scale, bias, eps=1e-5):
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def _variables(bn, x, running_mean):
  variables = bn.init(KEY, x, use_running_average=False)
  scale = jnp.linspace(0.5, 2.0, x.shape[-1])
  bias = jnp.linspace(-1.0, 1.0, x.shape[-1])
  return {"params": {"scale": scale, "bias": bias},
          "batch_stats": {"mean": jnp.full((x.shape[-1],), running_mean, jnp.float32),
                          "var": jnp.ones((x.shape[-1],), jnp.float32)}}


@pytest.mark.parametrize("offset, running_mean, rtol", [
    (0.0, 0.0, 1e-5),
    (1000.0, 1000.0, 1e-4),  # trained: the running mean is near the batch mean
    (1000.0, 999.0, 1e-3),
    (10.0, 0.0, 1e-3),  # first steps: shift 0, moderate mean
])
def test_statistics_and_output_equal_two_pass(offset, running_mean, rtol):
  x = jax.random.normal(KEY, (4, 5, 6, 3)) * jnp.array([1.0, 0.5, 2.0]) + offset
  bn = TorchBatchNorm()
  variables = _variables(bn, x, running_mean)
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  x64 = np.asarray(x, np.float64)
  var64 = x64.var(axis=(0, 1, 2))
  n = x.size // x.shape[-1]
  np.testing.assert_allclose(updates["batch_stats"]["mean"],
                             0.9 * running_mean + 0.1 * x64.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * var64 * n / (n - 1),
                             rtol=rtol)
  want = _two_pass(jnp.asarray(x64), variables["params"]["scale"],
                   variables["params"]["bias"])
  np.testing.assert_allclose(y, want, atol=30 * rtol, rtol=0)


def test_gradients_equal_two_pass():
  # The shift is a constant: the gradient is that of the plain formula, whatever it is.
  x = jax.random.normal(KEY, (3, 4, 4, 2)) * 2.0 + 1.5
  bn = TorchBatchNorm()
  variables = _variables(bn, x, 0.7)
  cot = jax.random.normal(jax.random.key(1), x.shape)

  def ours(x, params):
    y, _ = bn.apply({**variables, "params": params}, x, use_running_average=False,
                    mutable=["batch_stats"])
    return jnp.sum(y * cot)

  def reference(x, params):
    return jnp.sum(_two_pass(x, params["scale"], params["bias"]) * cot)

  g_ours = jax.grad(ours, argnums=(0, 1))(x, variables["params"])
  g_ref = jax.grad(reference, argnums=(0, 1))(x, variables["params"])
  np.testing.assert_allclose(g_ours[0], g_ref[0], atol=1e-5, rtol=1e-4)
  for key in ("scale", "bias"):
    np.testing.assert_allclose(g_ours[1][key], g_ref[1][key], atol=1e-5, rtol=1e-4)
  assert np.abs(np.asarray(g_ref[0])).max() > 0.1


def test_eval_uses_running_statistics():
  x = jax.random.normal(KEY, (2, 3, 3, 2))
  bn = TorchBatchNorm()
  variables = _variables(bn, x, 0.25)
  variables["batch_stats"]["var"] = jnp.array([4.0, 0.25])
  y = bn.apply(variables, x, use_running_average=True)
  want = ((x - 0.25) / jnp.sqrt(jnp.array([4.0, 0.25]) + 1e-5)
          * variables["params"]["scale"] + variables["params"]["bias"])
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_fold_gives_the_affine_and_the_per_sample_mean(train):
  # fold=True: x * mul + add is the normalised output, pooled its mean over H and W per
  # sample, and the running statistics move exactly as without fold.
  x = jax.random.normal(KEY, (3, 4, 5, 6)) * jnp.linspace(0.5, 3.0, 6) + 2.0
  bn = TorchBatchNorm()
  variables = _variables(bn, x, 1.5)
  y, upd = bn.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])
  (mul, add, pooled), upd_fold = bn.apply(variables, x, use_running_average=not train,
                                          fold=True, mutable=["batch_stats"])
  assert mul.shape == add.shape == (6,) and pooled.shape == (3, 6)
  np.testing.assert_allclose(x * mul + add, y, atol=2e-5, rtol=0)
  x64 = np.asarray(x, np.float64)
  if train:
    want = (x64 - x64.mean(axis=(0, 1, 2))) / np.sqrt(x64.var(axis=(0, 1, 2)) + 1e-5)
  else:
    want = (x64 - 1.5) / np.sqrt(1.0 + 1e-5)
  want = want * np.asarray(variables["params"]["scale"]) + np.asarray(variables["params"]["bias"])
  np.testing.assert_allclose(pooled, want.mean(axis=(1, 2)), atol=1e-5, rtol=0)
  assert np.abs(want.mean(axis=(1, 2))).max() > 0.05  # per-sample means are not all zero
  for key in ("mean", "var"):
    np.testing.assert_allclose(upd_fold["batch_stats"][key], upd["batch_stats"][key],
                               rtol=1e-6)
  if train:
    assert not np.allclose(upd["batch_stats"]["mean"], variables["batch_stats"]["mean"])


@pytest.mark.parametrize("train", [True, False])
def test_fold_max_is_the_per_sample_maximum_of_the_output(train):
  # Channels with positive, negative and zero scale: the maximum of x * mul + add comes
  # from max(x), min(x), or is add itself.
  x = jax.random.normal(KEY, (3, 4, 5, 3)) * 2.0 + 1.0
  bn = TorchBatchNorm()
  variables = _variables(bn, x, 0.5)
  variables["params"]["scale"] = jnp.array([1.5, -0.75, 0.0])
  (mul, add, pooled, top), _ = bn.apply(variables, x, use_running_average=not train,
                                        fold=True, fold_max=True, mutable=["batch_stats"])
  y = x * mul + add
  np.testing.assert_allclose(top, jnp.max(y, axis=(1, 2)), atol=1e-6, rtol=0)
  np.testing.assert_allclose(pooled, jnp.mean(y, axis=(1, 2)), atol=1e-5, rtol=0)
  assert float(mul[2]) == 0.0 and float(mul[1]) < 0.0 < float(mul[0])
  with pytest.raises(ValueError, match="fold_max=True needs fold=True"):
    bn.apply(variables, x, use_running_average=True, fold_max=True)


@pytest.mark.parametrize("mul", [[0.5, -1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
def test_affine_max_has_the_derivatives_of_the_maximum_ties_included(mul):
  # Where mul == 0 every entry ties and the maximum's derivative (shared among ties, as
  # jnp.max and PyTorch's amax share it) with respect to mul is the mean of x.
  x = jax.random.normal(KEY, (3, 7, 4))
  mul = jnp.asarray(mul)

  def layered(mul, x):
    return jnp.max(x * mul, axis=1)

  def folded(mul, x):
    return affine_max(mul, jnp.max(x, axis=1), jnp.min(x, axis=1), jnp.mean(x, axis=1))

  cotangent = jax.random.normal(jax.random.key(1), (3, 4))
  (want, want_vjp), (got, got_vjp) = jax.vjp(layered, mul, x), jax.vjp(folded, mul, x)
  np.testing.assert_allclose(got, want, atol=1e-6)
  for g, w in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(g, w, atol=1e-5)
  d_mul = got_vjp(cotangent)[0]
  assert float(jnp.abs(d_mul[2])) > 1e-3  # the zero-scale channel still learns its scale
  np.testing.assert_allclose(
      jax.jvp(lambda m: folded(m, x), (mul,), (jnp.ones(4),))[1],
      jax.jvp(lambda m: layered(m, x), (mul,), (jnp.ones(4),))[1], atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extrema_derivatives_share_ties_like_jnp_max_and_min(dtype):
  # Small integers tie often: several maxima and minima per slice, and in one slice every
  # entry ties (max == min), where both cotangents reach every entry.
  x = jax.random.randint(KEY, (3, 5, 6, 4), -2, 3).astype(dtype)
  x = x.at[1, :, :, 2].set(1)
  axes = (1, 2)

  def plain(x):
    return jnp.max(x, axis=axes), jnp.min(x, axis=axes)

  d = tuple(jax.random.normal(jax.random.key(i), (3, 4)).astype(dtype) for i in (1, 2))
  (want, want_vjp), (got, got_vjp) = jax.vjp(plain, x), jax.vjp(lambda x: extrema(x, axes), x)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.float32(got_vjp(d)[0]), np.float32(want_vjp(d)[0]), atol=tol)
  assert int(jnp.sum(x == jnp.max(x, axis=axes, keepdims=True))) > 3 * 4  # ties exist


def test_extrema_tie_counts_agree_on_every_backend_path():
  # The CPU path's one fused reduction and the other backends' two sums.
  x = jax.random.randint(KEY, (2, 7, 3, 5), 0, 3).astype(jnp.float32)
  axes = (1, 2)
  top, bottom = jnp.max(x, axis=axes), jnp.min(x, axis=axes)
  fused = norm._tie_counts_fused(x, top, bottom, axes)
  plain = norm._tie_counts_plain(x, top, bottom, axes)
  for f, p, v in zip(fused, plain, (top, bottom)):
    want = jnp.sum(x == v[:, None, None, :], axis=axes)
    np.testing.assert_array_equal(f, want)
    np.testing.assert_array_equal(p, want)


def test_extrema_shares_among_many_ties():
  # 400 tied entries in one slice (a dead channel's constant map), each gets 1/400.
  x = jnp.zeros((1, 20, 20, 2)).at[..., 1].set(jnp.arange(400.0).reshape(20, 20))
  _, pullback = jax.vjp(lambda x: extrema(x, (1, 2)), x)
  (grad,) = pullback((jnp.ones((1, 2)), jnp.zeros((1, 2))))
  np.testing.assert_allclose(grad[..., 0], np.full((1, 20, 20), 1 / 400), rtol=1e-6)
  assert float(grad[0, 19, 19, 1]) == 1.0 and float(jnp.sum(grad[..., 1])) == 1.0
