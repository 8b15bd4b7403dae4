"""Conventions shared by every attention module: input checks, reduced widths, activations.

Every module in ``attention_flax.layers`` takes images in NHWC layout, (N, H, W, C), the
layout of Flax convolutions, and validates them with :func:`check_images` before any
computation so that a wrong rank or an integer image fails with a message naming the fix
instead of an XLA shape error.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
ActFn = Callable[[Array], Array]


def check_images(x: Array, module: str) -> None:
  """Raises a clear error unless ``x`` is a floating (N, H, W, C) batch."""
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(
        f"{module} expects images in NHWC layout, a rank-4 array (N, H, W, C); "
        f"got shape {shape}. Add a batch axis with x[None] for a single image, "
        "or transpose NCHW input with x.transpose(0, 2, 3, 1).")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{module} expects floating-point images; got dtype {x.dtype}. "
        "Convert first, e.g. x.astype(jnp.float32) / 255.")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.0) -> int:
  """Rounds a channel count to a multiple of ``divisor`` (timm's convention).

  ``max(min_value, int(value + divisor / 2) // divisor * divisor)`` with ``min_value``
  defaulting to ``divisor``; if rounding lost more than ``1 - round_limit`` of the value,
  one more ``divisor`` is added (``round_limit=0`` never adds). ``divisor=1`` rounds to the
  nearest integer (at least 1), which gives the papers' ``C // r`` for exact multiples.
  """
  min_value = divisor if min_value is None else min_value
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < round_limit * value:
    new_value += divisor
  return int(new_value)


def reduced_width(channels: int, rd_ratio: float, rd_divisor: int,
                  rd_channels: int | None = None) -> int:
  """The hidden width of a gating MLP: explicit ``rd_channels`` or ``channels * rd_ratio``
  rounded with ``rd_divisor``; never below 1 however few channels there are."""
  if rd_channels is not None:
    if rd_channels < 1:
      raise ValueError(f"rd_channels must be >= 1, got {rd_channels}.")
    return int(rd_channels)
  if rd_ratio <= 0.0:
    raise ValueError(f"rd_ratio must be positive, got {rd_ratio}.")
  return max(1, make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0))


def accumulation_dtype(*dtypes) -> jnp.dtype:
  """float64 if any of ``dtypes`` is, else float32: the precision of sums, counts and
  sampling positions whatever the inputs' (a bfloat16 running sum stops growing at 256
  times its increment; bfloat16 coordinates are a quarter pixel off on a 64-pixel image)."""
  return jnp.dtype(jnp.float64 if any(d == jnp.float64 for d in dtypes) else jnp.float32)


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
  return jax.lax.platform_dependent(x, cpu=functools.partial(_variadic_stats, axes=axes),
                                    default=functools.partial(_plain_stats, axes=axes))


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


_ACTIVATIONS: dict[str, ActFn] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "sigmoid": nn.sigmoid,
    "hard_sigmoid": nn.hard_sigmoid,
    "hard_swish": nn.hard_swish,
    "swish": nn.swish,
    "silu": nn.silu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def get_act(act: str | ActFn | None) -> ActFn:
  """An activation given by name (``"relu"``, ``"hard_sigmoid"``, ...) or as a callable."""
  if act is None:
    return _ACTIVATIONS["identity"]
  if callable(act):
    return act
  try:
    return _ACTIVATIONS[act]
  except KeyError:
    raise ValueError(
        f"Unknown activation {act!r}; known names: {sorted(_ACTIVATIONS)}, "
        "or pass any callable.") from None
