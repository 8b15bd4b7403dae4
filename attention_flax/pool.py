"""Max pooling whose derivative is fast on XLA's CPU backend.

``flax.linen.max_pool`` is ``lax.reduce_window`` with ``lax.max``. Its forward pass is fast
everywhere, but JAX differentiates it through a select-and-gather on the window (a
variadic reduce-window over the values and their positions) and transposes that into a
select-and-scatter, which XLA:CPU runs as generic windowed loops: fused forward and
backward of ResNet-50's stem pool (3 x 3, stride 2, batch 16 at 112 x 112, 64 channels)
took 80-100 ms on a 2-core AVX-512 machine, about 6% of the whole training step.

:func:`max_pool` has the same arguments and values, and writes the derivative out. With
t_k the strided slice of the (padded) input under window tap k, the tap that wins window
o is the first k in row-major window order with t_k[o] = y[o], the first maximum, which
is the element JAX's and PyTorch's max pools pass the gradient to. The tangent is then
the sum over taps of where(k wins, tangent's t_k, 0), a ``jax.custom_jvp`` that is linear
in the tangent, so JAX transposes it into strided pads for reverse mode. Both modes work
(``grad``, ``vjp``, ``jvp``, ``jacfwd``, ``vmap``), and the gradients equal JAX's own,
ties included. Only on CPU, chosen at lowering time by ``lax.platform_dependent``; other
backends keep ``flax.linen.max_pool`` and XLA's own select-and-scatter.

Measured on that machine: forward + backward of the pool alone 1.8-2.5x faster for 3 x 3
windows with stride 2 and 5-7x for 2 x 2 ones; the ResNet family's stem uses it
(ResNet-50 and CBAM-ResNet-50 steps 1.03-1.10x faster). Inside the Residual Attention
Network's mask branches it made the whole step 4-5% slower (Attention-56 at 32 x 32 and at
112 x 112), so those, and the spatial transformers' small pools, where it made no
measurable difference, keep ``flax.linen.max_pool``.

One difference from ``flax.linen.max_pool``'s derivative: in a window whose maximum is
NaN, the gradient goes to the window's first NaN (PyTorch's and JAX's own rules pick by
comparisons that NaN fails, and do not agree with each other there).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from attention_flax.conv import window_taps

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
  return lax.platform_dependent(inputs, cpu=taps, default=plain)


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
  """x padded with ``fill``, under each window tap (:func:`attention_flax.conv.window_taps`)."""
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=fill)
  return window_taps(xp, window, strides, out_hw)
