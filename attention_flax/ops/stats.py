"""Channel and spatial pools with derivatives written for one pass over the data.

* :func:`mean_and_max`: ``(jnp.mean(x, axis), jnp.max(x, axis))`` together, CBAM's two
  pools; on CPU both (and the count of tied maxima) come from one variadic reduction and
  the derivative is one element-wise pass (a ``jax.custom_jvp``: every mode works).
* :func:`extrema` and :func:`affine_max`: the per-sample maximum of a batch norm's output
  from the extremes of its input, used by the folded residual tail (``ops.tail``).
Values and derivatives are those of ``jnp.mean`` / ``jnp.max`` (ties share the derivative
equally, as JAX's and PyTorch's ``amax``). Measurements: docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from attention_flax.checks import accumulation_dtype
from attention_flax.ops.backends import route

Array = jax.Array


def _variadic_stats(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array, Array]:
  """(sum, max, number of entries equal to the max) over ``axes`` with kept dims, in one
  variadic reduction: one pass over x, which XLA:CPU fuses with x's producer."""
  acc = accumulation_dtype(x.dtype)

  def combine(a, b):
    top = jnp.maximum(a[1], b[1])
    zero = jnp.zeros((), acc)
    return (a[0] + b[0], top,
            jnp.where(a[1] == top, a[2], zero) + jnp.where(b[1] == top, b[2], zero))

  wide = x.astype(acc)  # XLA reduces all operands in one precision; x's values fit exactly
  init = (jnp.zeros((), acc), jnp.array(-jnp.inf, acc), jnp.zeros((), acc))
  total, top, count = jax.lax.reduce((wide, wide, jnp.ones(x.shape, acc)), init, combine, axes)
  shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
  return total.reshape(shape), top.astype(x.dtype).reshape(shape), count.reshape(shape)


def _plain_stats(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array, Array]:
  acc = accumulation_dtype(x.dtype)
  top = jnp.max(x, axis=axes, keepdims=True)
  return (jnp.sum(x, axis=axes, keepdims=True, dtype=acc), top,
          jnp.sum(x == top, axis=axes, keepdims=True, dtype=acc))


def _pool_stats(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array, Array]:
  # Separate sums and maxima go to a reduction library on XLA:CPU, which reads x once per
  # statistic and needs it written out; other backends keep XLA's own reductions.
  return route("fused_reductions", functools.partial(_variadic_stats, axes=axes),
               functools.partial(_plain_stats, axes=axes), x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def mean_and_max(x: Array, axis: Sequence[int], keepdims: bool = False) -> tuple[Array, Array]:
  """``(jnp.mean(x, axis), jnp.max(x, axis))``, the two pools of CBAM's gates, together.

  ``axis`` is a tuple of axes (hashable: it is a static argument).

  Values and derivatives are those of ``jnp.mean`` and ``jnp.max`` (the max's derivative
  shared equally among tied entries, as JAX and PyTorch's ``amax`` do), but on CPU both
  pools and the number of tied maxima come from one pass over x, and the derivative is one
  element-wise pass. The mean is accumulated in float32 and returned in x's dtype.
  """
  total, top, _ = _pool_stats(x, _axes(x, axis))
  return _pooled(x, axis, keepdims, total, top)


def _axes(x: Array, axis: Sequence[int]) -> tuple[int, ...]:
  return tuple(sorted(a % x.ndim for a in axis))


def _pooled(x: Array, axis: Sequence[int], keepdims: bool, total: Array,
            top: Array) -> tuple[Array, Array]:
  """(total / pooled size in x's dtype, top), without the pooled axes unless keepdims."""
  axes = _axes(x, axis)
  mean = (total / math.prod(x.shape[a] for a in axes)).astype(x.dtype)
  if not keepdims:
    mean, top = jnp.squeeze(mean, axes), jnp.squeeze(top, axes)
  return mean, top


@mean_and_max.defjvp
def _mean_and_max_jvp(axis, keepdims, primals, tangents):
  (x,), (x_dot,) = primals, tangents
  axes = _axes(x, axis)
  total, top, count = _pool_stats(x, axes)
  acc = accumulation_dtype(x.dtype)
  mean_dot = jnp.sum(x_dot, axis=axes, keepdims=True, dtype=acc)
  # A product with the tie mask, as JAX's own max rule: a NaN max (no entry equals it) then
  # spreads NaN to the whole slice's gradient, as it does for jnp.max.
  at_top = x_dot.astype(acc) * (x == top).astype(acc)
  top_dot = jnp.sum(at_top, axis=axes, keepdims=True) / count
  mean_dot, top_dot = _pooled(x, axis, keepdims, mean_dot, top_dot.astype(x.dtype))
  return _pooled(x, axis, keepdims, total, top), (mean_dot, top_dot)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def extrema(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
  """``(jnp.max(x, axes), jnp.min(x, axes))`` with the same derivatives (shared equally
  among tied entries), whose reverse mode keeps only ``x``, the two results and how many
  entries tie for each: JAX's own rule for ``jnp.max`` stores a full-size array marking
  the maxima. The forward pass counts the ties (on CPU in one fused pass over ``x`` for
  both extremes); the backward pass marks the extremes again element by element, in the
  pass where a batch norm's gradient reads ``x`` anyway, with no reduction of its own.
  Being a ``jax.custom_vjp``, it has no forward mode (``jax.jvp``, ``jax.jacfwd``): a
  CBAM ResNet differentiated that way needs the plain tail and convolution
  (``attention_flax.models.plain_factories``)."""
  return jnp.max(x, axis=axes), jnp.min(x, axis=axes)


def _tie_counts_fused(x: Array, top: Array, bottom: Array,
                      axes: tuple[int, ...]) -> tuple[Array, Array]:
  # One variadic reduction, which XLA:CPU fuses with the comparisons; two plain sums would
  # each go to its reduction library, which needs the comparison written out first.
  acc = accumulation_dtype(x.dtype)
  zero = jnp.zeros((), acc)
  hits = tuple((x == jnp.expand_dims(v, axes)).astype(acc) for v in (top, bottom))
  return jax.lax.reduce(hits, (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), axes)


def _tie_counts_plain(x: Array, top: Array, bottom: Array,
                      axes: tuple[int, ...]) -> tuple[Array, Array]:
  acc = accumulation_dtype(x.dtype)
  return tuple(jnp.sum(x == jnp.expand_dims(v, axes), axis=axes, dtype=acc)
               for v in (top, bottom))


def _extrema_fwd(x, axes):
  top, bottom = extrema(x, axes)
  counts = route("fused_reductions", functools.partial(_tie_counts_fused, axes=axes),
                 functools.partial(_tie_counts_plain, axes=axes), x, top, bottom)
  return (top, bottom), (x, top, bottom, *counts)


def _extrema_bwd(axes, residuals, cotangents):
  x, top, bottom, top_count, bottom_count = residuals
  zero = jnp.zeros((), x.dtype)
  grad = zero
  for value, count, d in ((top, top_count, cotangents[0]),
                          (bottom, bottom_count, cotangents[1])):
    share = jnp.expand_dims((d.astype(count.dtype) / count).astype(x.dtype), axes)
    grad = grad + jnp.where(x == jnp.expand_dims(value, axes), share, zero)
  return (grad,)


extrema.defvjp(_extrema_fwd, _extrema_bwd)


@jax.custom_jvp
def affine_max(mul: Array, top: Array, bottom: Array, mean: Array) -> Array:
  """``max(x * mul)`` over a pooled axis from ``top = max(x)``, ``bottom = min(x)`` and
  ``mean = mean(x)`` over it, for a per-channel ``mul`` (C,) and (N, C) statistics.

  The value is ``mul * top`` where ``mul > 0``, ``mul * bottom`` where ``mul < 0`` and 0
  where ``mul == 0``. So are the derivatives, with one exception that matters: where
  ``mul == 0`` every entry of ``x * mul`` ties, and the maximum's derivative, shared
  equally among tied entries (JAX's and PyTorch's ``amax``), is ``mean`` with respect to
  ``mul``. A block whose last batch norm starts at zero scale (``zero_init_last``) has
  exactly that at initialisation.
  """
  return jnp.where(mul > 0, mul * top, jnp.where(mul < 0, mul * bottom, 0.0))


@affine_max.defjvp
def _affine_max_jvp(primals, tangents):
  mul, top, bottom, mean = primals
  d_mul, d_top, d_bottom, _ = tangents  # the mean only enters the derivative
  positive, negative = mul > 0, mul < 0
  slope = jnp.where(positive, top, jnp.where(negative, bottom, mean))
  tangent = (slope * d_mul + jnp.where(positive, mul, 0.0) * d_top
             + jnp.where(negative, mul, 0.0) * d_bottom)
  return affine_max(mul, top, bottom, mean), tangent
