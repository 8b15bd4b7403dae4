"""attention_flax.ops.stats: extrema and affine_max, the folded tail's per-sample maximum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.ops import backends, stats
from attention_flax.ops.stats import affine_max, extrema

KEY = jax.random.key(0)


def _variables(bn, x, running_mean, scale):
  """TorchBatchNorm variables for ``x`` with this per-channel ``scale`` and a bias ramp."""
  channels = x.shape[-1]
  return {"params": {"scale": jnp.asarray(scale, jnp.float32),
                     "bias": jnp.linspace(-1.0, 1.0, channels)},
          "batch_stats": {"mean": jnp.full((channels,), running_mean, jnp.float32),
                          "var": jnp.ones((channels,), jnp.float32)}}


def _folded_pools(bn, x, use_running_average):
  """The norm's (mul, add), its output's per-sample mean and maximum, as ops.tail takes
  them: the mean from ``fold``, the maximum from the input's extrema and affine_max."""
  top, bottom = extrema(x.astype(jnp.float32), (1, 2))
  mul, add, sample_mean = bn.fold(x, use_running_average)
  return mul, add, sample_mean * mul + add, affine_max(mul, top, bottom, sample_mean) + add


@pytest.mark.parametrize("train", [True, False])
def test_fold_and_affine_max_give_the_per_sample_maximum_of_the_output(train):
  # Channels with positive, negative and zero scale: the maximum of x * mul + add comes
  # from max(x), min(x), or is add itself.
  x = jax.random.normal(KEY, (3, 4, 5, 3)) * 2.0 + 1.0
  bn = TorchBatchNorm()
  variables = _variables(bn, x, 0.5, [1.5, -0.75, 0.0])
  (mul, add, pooled, top), _ = bn.apply(variables, x, use_running_average=not train,
                                        method=_folded_pools, mutable=["batch_stats"])
  y = x * mul + add
  np.testing.assert_allclose(top, jnp.max(y, axis=(1, 2)), atol=1e-6, rtol=0)
  np.testing.assert_allclose(pooled, jnp.mean(y, axis=(1, 2)), atol=1e-5, rtol=0)
  assert float(mul[2]) == 0.0 and float(mul[1]) < 0.0 < float(mul[0])


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
  fused = stats._tie_counts_fused(x, top, bottom, axes)
  plain = stats._tie_counts_plain(x, top, bottom, axes)
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


def test_extrema_take_the_plain_tie_counts_where_fast_paths_says_so(monkeypatch):
  # Backends not listed for "fused_reductions" count ties with two plain sums: the same
  # values and derivatives, and no per-platform switch in the program.
  x = jax.random.randint(KEY, (2, 5, 4, 3), -1, 2).astype(jnp.float32)
  d = tuple(jax.random.normal(jax.random.key(i), (2, 3)) for i in (3, 4))

  def pulled(x):
    out, pullback = jax.vjp(lambda v: extrema(v, (1, 2)), x)
    return out, pullback(d)[0]

  assert "platform_index" in str(jax.make_jaxpr(lambda v: pulled(v))(x))
  fused = pulled(x)
  monkeypatch.setitem(backends.FAST_PATHS, "fused_reductions", ())
  assert "platform_index" not in str(jax.make_jaxpr(lambda v: pulled(v))(x))
  plain = pulled(x)
  for f, p in zip(jax.tree.leaves(fused), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(f, p)
  _, want_vjp = jax.vjp(lambda v: (jnp.max(v, axis=(1, 2)), jnp.min(v, axis=(1, 2))), x)
  np.testing.assert_allclose(plain[1], want_vjp(d)[0], atol=1e-6)
  assert float(jnp.abs(plain[1]).max()) > 0.1
