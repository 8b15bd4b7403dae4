"""attention_flax.ops.pooling.max_pool: flax.linen.max_pool's values and derivatives."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from attention_flax.ops.pooling import max_pool

CASES = [
    # window, strides, padding: ResNet's stem pool, STN's 2x2 pools, odd sizes, SAME
    ((3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 2), (2, 2), "VALID"),
    ((3, 3), (2, 2), "SAME"),
    ((3, 2), (1, 2), ((0, 2), (1, 0))),
    ((2, 2), None, "VALID"),
]


def _readout(pool, x):
  """A scalar of the pooled map whose gradient differs at every output position."""
  y = pool(x)
  return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)


def _pools(window, strides, padding):
  ours = functools.partial(max_pool, window_shape=window, strides=strides, padding=padding)
  theirs = functools.partial(nn.max_pool, window_shape=window, strides=strides,
                             padding=padding)
  return ours, theirs


def _tied(shape=(2, 7, 9, 3), seed=0):
  """ReLU-like input: many windows tie at 0, and integer values tie elsewhere."""
  x = np.round(np.random.default_rng(seed).standard_normal(shape) * 1.5)
  return jnp.asarray(np.maximum(x, 0.0), jnp.float32)


@pytest.mark.parametrize("window, strides, padding", CASES)
def test_values_and_gradients_equal_flax(window, strides, padding):
  ours, theirs = _pools(window, strides, padding)
  for x in (jax.random.normal(jax.random.key(0), (2, 7, 9, 3)), _tied()):
    np.testing.assert_array_equal(jax.jit(ours)(x), theirs(x))
    g1 = jax.jit(jax.grad(functools.partial(_readout, ours)))(x)
    g2 = jax.grad(functools.partial(_readout, theirs))(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-7)
    assert np.count_nonzero(np.asarray(g2)) > x.size // 8  # not a comparison of zeros


def test_tied_window_passes_its_gradient_to_the_first_maximum():
  x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 0, 0].set(5.0).at[0, 1, 1, 0].set(5.0)
  g = jax.grad(lambda v: max_pool(v, (2, 2), (2, 2)).sum())(x)
  np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], [[0.0, 0.0], [1.0, 0.0]])
  zeros = jax.grad(lambda v: max_pool(v, (2, 2), (2, 2)).sum())(jnp.zeros((1, 2, 2, 1)))
  np.testing.assert_array_equal(np.asarray(zeros)[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_overlapping_windows_add_up_by_hand():
  # 3x3 windows, stride 2, padding 1 over a 1x3 row [1, 9, 2]: both windows pick the 9.
  x = jnp.asarray([1.0, 9.0, 2.0]).reshape(1, 1, 3, 1)
  y, vjp = jax.vjp(lambda v: max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))), x)
  np.testing.assert_array_equal(np.asarray(y).ravel(), [9.0, 9.0])
  (g,) = vjp(jnp.asarray([3.0, 4.0]).reshape(y.shape))
  np.testing.assert_array_equal(np.asarray(g).ravel(), [0.0, 7.0, 0.0])


def test_forward_mode_vmap_and_bfloat16():
  ours, theirs = _pools((3, 3), (2, 2), ((1, 1), (1, 1)))
  x, t = (jax.random.normal(k, (2, 6, 5, 4)) for k in jax.random.split(jax.random.key(1)))
  chex.assert_trees_all_close(jax.jvp(ours, (x,), (t,)), jax.jvp(theirs, (x,), (t,)),
                              rtol=1e-6)
  batched = jnp.stack([x, -x])
  chex.assert_trees_all_close(jax.vmap(jax.grad(lambda v: _readout(ours, v)))(batched),
                              jax.vmap(jax.grad(lambda v: _readout(theirs, v)))(batched),
                              rtol=1e-6, atol=1e-7)
  xb = x.astype(jnp.bfloat16)
  gb = jax.grad(lambda v: ours(v).astype(jnp.float32).sum())(xb)
  assert gb.dtype == jnp.bfloat16
  np.testing.assert_array_equal(gb, jax.grad(lambda v: theirs(v).astype(jnp.float32).sum())(xb))


def test_nan_max_sends_the_gradient_to_the_first_nan():
  x = jnp.asarray([1.0, jnp.nan, 3.0, jnp.nan]).reshape(1, 2, 2, 1)
  g = jax.grad(lambda v: max_pool(v, (2, 2), (2, 2)).sum())(x)
  np.testing.assert_array_equal(np.asarray(g).ravel(), [0.0, 1.0, 0.0, 0.0])


def test_cpu_gradient_scatters_nothing():
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))

  def opcodes(pool):
    text = jax.jit(jax.grad(lambda v: pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))).sum())).lower(
        x).compile().as_text()
    return set(re.findall(r"= \S+ ([\w-]+)\(", text))

  assert not {op for op in opcodes(max_pool) if "scatter" in op}
  assert {op for op in opcodes(nn.max_pool) if "scatter" in op}  # the route it replaces


def test_other_ranks_are_flax_max_pool():
  x = jax.random.normal(jax.random.key(3), (2, 9, 4))
  np.testing.assert_array_equal(max_pool(x, (3,), (2,), "SAME"),
                                nn.max_pool(x, (3,), (2,), "SAME"))
