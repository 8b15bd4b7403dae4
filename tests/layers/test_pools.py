"""attention_flax.ops.stats.mean_and_max: CBAM's two pools at once, jnp.mean's and jnp.max's."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax.ops import backends
from attention_flax.ops.stats import mean_and_max


def _images(seed=0, shape=(2, 5, 6, 8)):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  x = np.maximum(x, 0.0)  # ReLU output: many zeros, so whole rows tie at the max 0
  x[0, 1, 2, :] = 0.0
  x[1, 0, 0, :3] = 9.0  # three tied maxima over the channels
  x[1, :, :, 4] = 3.0  # a channel whose whole map ties over H x W
  return jnp.asarray(x)


def _reference(x, axis, keepdims):
  return jnp.mean(x, axis=axis, keepdims=keepdims), jnp.max(x, axis=axis, keepdims=keepdims)


CASES = [((1, 2), False), ((-1,), True), ((3,), False), ((1, 2), True)]


@pytest.mark.parametrize("axis, keepdims", CASES)
def test_values_equal_jnp(axis, keepdims):
  x = _images()
  ours = jax.jit(mean_and_max, static_argnums=(1, 2))(x, axis, keepdims)
  ref = _reference(x, axis, keepdims)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(ours[1], ref[1])
  assert ours[0].shape == ref[0].shape and ours[1].shape == ref[1].shape


@pytest.mark.parametrize("axis, keepdims", CASES)
def test_gradients_equal_jnp_with_ties(axis, keepdims):
  x = _images(1)
  w = jax.random.normal(jax.random.PRNGKey(0), _reference(x, axis, keepdims)[0].shape)

  def loss(pool, x):
    mean, top = pool(x)
    return jnp.sum(w * mean) + jnp.sum(jnp.sin(w) * top)

  ours = jax.jit(jax.grad(functools.partial(loss, lambda x: mean_and_max(x, axis, keepdims))))(x)
  ref = jax.jit(jax.grad(functools.partial(loss, lambda x: _reference(x, axis, keepdims))))(x)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
  # Ties share the max's gradient: three tied channels get a third each.
  if tuple(axis) in ((-1,), (3,)):
    w_here = float(np.asarray(w).reshape(2, 5, 6)[1, 0, 0])
    share = np.asarray(ours)[1, 0, 0, :3] - w_here / 8
    np.testing.assert_allclose(share, np.sin(w_here) / 3, rtol=1e-5)


def test_forward_mode_and_vmap_equal_jnp():
  x = _images(2)
  t = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)
  ours = jax.jvp(lambda a: mean_and_max(a, (1, 2)), (x,), (t,))
  ref = jax.jvp(lambda a: _reference(a, (1, 2), False), (x,), (t,))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  batched = jax.vmap(lambda a: mean_and_max(a, (0, 1)))(x)
  for a, b in zip(batched, _reference(x, (1, 2), False)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bfloat16_mean_accumulates_in_float32():
  # 4096 values of 1 + 2**-7 in bfloat16: a bfloat16 running sum would stall at 256.
  x = jnp.full((1, 64, 64, 1), 1.0 + 2.0 ** -7, jnp.bfloat16)
  mean, top = mean_and_max(x, (1, 2))
  assert mean.dtype == jnp.bfloat16 and top.dtype == jnp.bfloat16
  assert float(mean[0, 0]) == 1.0 + 2.0 ** -7
  grad = jax.grad(lambda a: mean_and_max(a, (1, 2))[1].astype(jnp.float32).sum())(x)
  # Every entry ties at the max: each gets 1/4096 of its gradient, exactly.
  np.testing.assert_array_equal(np.asarray(grad, np.float32), 1.0 / 4096)


def test_nan_and_minus_infinity_follow_jnp():
  x = np.zeros((1, 2, 2, 3), np.float32)
  x[0, 0, 0, 1] = np.nan
  x[0, 1, :, :] = -np.inf
  x = jnp.asarray(x)
  ours = mean_and_max(x, (-1,))
  ref = _reference(x, (-1,), False)
  for a, b in zip(ours, ref):
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(np.where(np.isnan(a), 0, a), np.where(np.isnan(b), 0, b))
  g_ours = jax.grad(lambda a: jnp.sum(mean_and_max(a, (-1,))[1][0, 0]))(x)
  g_ref = jax.grad(lambda a: jnp.sum(jnp.max(a, axis=-1)[0, 0]))(x)
  np.testing.assert_array_equal(np.isnan(g_ours), np.isnan(g_ref))
  np.testing.assert_array_equal(np.nan_to_num(g_ours), np.nan_to_num(g_ref))


def test_plain_reductions_where_fast_paths_says_so(monkeypatch):
  # Backends not listed for "fused_reductions" take separate sums, maxima and tie counts:
  # the same values and gradients, and no per-platform switch in the program.
  x = _images(4)
  w = jax.random.normal(jax.random.PRNGKey(5), (2, 8))

  def value_and_grad(x):
    def loss(x):
      mean, top = mean_and_max(x, (1, 2))
      return jnp.sum(w * mean) + jnp.sum(jnp.sin(w) * top)
    return jax.value_and_grad(loss)(x)

  assert "platform_index" in str(jax.make_jaxpr(lambda v: value_and_grad(v))(x))
  fused = value_and_grad(x)
  monkeypatch.setitem(backends.FAST_PATHS, "fused_reductions", ())
  assert "platform_index" not in str(jax.make_jaxpr(lambda v: value_and_grad(v))(x))
  plain = value_and_grad(x)
  ref = jax.value_and_grad(lambda v: jnp.sum(w * jnp.mean(v, axis=(1, 2)))
                           + jnp.sum(jnp.sin(w) * jnp.max(v, axis=(1, 2))))(x)
  for ours in (fused, plain):
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(ref[1]).max()) > 0.1
