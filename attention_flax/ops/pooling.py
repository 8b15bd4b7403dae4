"""Max pooling whose derivative is a sum of strided slices on CPU.

:func:`max_pool` has ``flax.linen.max_pool``'s arguments and values. On CPU its
derivative is written out as a ``jax.custom_jvp``: the tangent of each window is the
tangent of its first maximal tap (JAX's and PyTorch's choice), a sum over taps that JAX
transposes into strided pads, instead of the select-and-scatter XLA:CPU runs as generic
loops. Every mode of differentiation works; other backends keep ``flax.linen.max_pool``.
In a window whose maximum is NaN the derivative goes to the first NaN.
Measurements: docs/benchmarks.md.
"""


from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from attention_flax.ops.convolution import window_taps
from attention_flax.ops.backends import route

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]


def max_pool(inputs: Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID") -> Array:
  """``flax.linen.max_pool`` with a derivative that is fast on CPU (module docstring).

  Same arguments and result. A 2-D window over (N, H, W, C) images takes the fast
  derivative on CPU; anything else (other ranks, negative padding, other backends) is
  ``flax.linen.max_pool`` unchanged.
  """
  window = tuple(int(k) for k in window_shape)
  steps = tuple(int(s) for s in strides) if strides is not None else (1,) * len(window)

  def plain(x):
    return nn.max_pool(x, window, strides=steps, padding=padding)

  if inputs.ndim != 4 or len(window) != 2 or len(steps) != 2:
    return plain(inputs)
  if isinstance(padding, str):
    pads = tuple(lax.padtype_to_pads(inputs.shape[1:3], window, steps, padding))
  else:
    pads = tuple(padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
    return plain(inputs)
  taps = functools.partial(_max_pool_by_taps, window=window, strides=steps, pads=pads)
  return route("max_pool_jvp", taps, plain, inputs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool_by_taps(x: Array, window: tuple[int, int], strides: tuple[int, int],
                      pads: Pads) -> Array:
  return nn.max_pool(x, window, strides=strides, padding=pads)


@_max_pool_by_taps.defjvp
def _max_pool_jvp(window, strides, pads, primals, tangents):
  (x,), (x_dot,) = primals, tangents
  y = _max_pool_by_taps(x, window, strides, pads)
  out_hw = y.shape[1:3]
  taken = jnp.zeros(y.shape, bool)
  y_dot = jnp.zeros(y.shape, x_dot.dtype)
  for tap, tap_dot in zip(_padded_taps(x, window, strides, pads, out_hw, -jnp.inf),
                          _padded_taps(x_dot, window, strides, pads, out_hw, 0)):
    # The first tap equal to the max wins; NaN equals nothing, so a NaN max takes the
    # window's first NaN.
    wins = ((tap == y) | (tap != tap)) & ~taken
    y_dot = y_dot + jnp.where(wins, tap_dot, jnp.zeros((), x_dot.dtype))
    taken = taken | wins
  return y, y_dot


def _padded_taps(x: Array, window: tuple[int, int], strides: tuple[int, int], pads: Pads,
                 out_hw: tuple[int, int], fill: float) -> list[Array]:
  """x padded with ``fill``, under each window tap (:func:`attention_flax.ops.convolution.window_taps`)."""
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=fill)
  return window_taps(xp, window, strides, out_hw)
