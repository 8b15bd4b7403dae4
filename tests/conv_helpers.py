"""Helpers shared by the convolution tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NHWC = ("NHWC", "HWIO", "NHWC")


def conv_loss(conv_fn, x, k, strides, padding, **kw):
  """A scalar read-out of ``conv_fn``'s output, non-linear so that the output gradient
  differs at every position."""
  y = conv_fn(x, k, strides, padding, dimension_numbers=kw.pop("dn", NHWC), **kw)
  return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)


def random_pair(shape_x, shape_k, dtype=jnp.float32, seed=0):
  """A normal input and kernel of these shapes."""
  kx, kk = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, shape_x, dtype), jax.random.normal(kk, shape_k, dtype))
