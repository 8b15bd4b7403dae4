"""The bilinear and nearest samplers of ``grid_sample`` with a gradient written for CPU.

:func:`grid_sample` has the values of :func:`attention_flax.sampling.grid_sample`. Its
bilinear gradient is a ``jax.custom_vjp`` (reverse mode, second order and ``vmap`` work;
forward mode does not: use the plain sampler for ``jax.jvp``), computed on CPU by
:func:`attention_flax.ops.bilinear.taps_vjp_cpu` and elsewhere by autodiff; gathers index
the whole batch at once, one channel reads a zero-padded copy, RGB rows of four.
Measurements: docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from attention_flax.checks import accumulation_dtype
from attention_flax.ops.bilinear import bilinear_index, bilinear_taps, flat_index, take_rows
from attention_flax.ops.fusion import materialize
from attention_flax.sampling import check_sample_args, source_index
from attention_flax.ops.backends import route

Array = jax.Array

# Gathers use one int32 index into the whole batch while the batch holds fewer pixels
# than this (int32's range), and (image, pixel) indices from there on.
BATCH_INDEX_PIXELS = 2**31


def grid_sample(x: Array, grid: Array, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False) -> Array:
  """:func:`attention_flax.sampling.grid_sample`, with the same arguments and values, and
  a faster gradient (module docstring); no forward-mode differentiation."""
  check_sample_args(x, grid, mode, padding_mode)
  n, h, w, c = x.shape
  _, h_out, w_out, _ = grid.shape
  acc = accumulation_dtype(x.dtype, grid.dtype)
  g = grid.astype(acc).reshape(n, h_out * w_out, 2)
  # Computed once and read back on CPU (fusion.py): left to fusion, XLA:CPU evaluates
  # this arithmetic again inside every index, weight and gradient expression below.
  # XLA:CPU drops optimization barriers before it fuses; other backends keep the one
  # below (docs/benchmarks.md, "One and three channels on CPU").
  ix = materialize(source_index(g[..., 0], w, padding_mode, align_corners))
  iy = materialize(source_index(g[..., 1], h, padding_mode, align_corners))
  ix, iy = jax.lax.optimization_barrier((ix, iy))

  if mode == "nearest":
    index, valid = flat_index(jnp.round(ix), jnp.round(iy), h, w)
    if n * h * w < BATCH_INDEX_PIXELS:
      # Indices into the whole batch, as the bilinear taps below: the gradient's scatter
      # then needs no (image, pixel) pair per point (docs/benchmarks.md, "Nearest
      # sampling on CPU").
      index = (index + (jnp.arange(n, dtype=jnp.int32) * (h * w))[:, None]).reshape(-1)
      flat = x.reshape(n * h * w, c)
      if c == 3:
        # RGB on CPU reads rows of four, the fourth zero, so that the gradient scatters
        # rows of four too (XLA:CPU scatters rows of three slowly; bilinear.taps_vjp_cpu).
        rows = route("sampler_rgb_rows",
                     lambda f, i: take_rows(jnp.pad(f, ((0, 0), (0, 1))), i)[:, :3],
                     take_rows, flat, index)
      else:
        rows = take_rows(flat, index)
      rows = rows.reshape(n, h_out * w_out, c)
    else:
      rows = take_rows(x.reshape(n, h * w, c), index)
    out = jnp.where(valid[..., None], rows, jnp.zeros((), x.dtype))
    return out.reshape(n, h_out, w_out, c)

  def bilinear(padded: bool) -> Callable[[Array, Array, Array], Array]:
    def taps(x, ix, iy):
      index, weight = bilinear_index(ix, iy, h, w, padded)
      pixels = (h + 2) * (w + 2) if padded else h * w
      if n * pixels < BATCH_INDEX_PIXELS:
        # Indices into the whole batch: one int32 per tap, where a per-image gather or
        # scatter builds an (image, row) pair for each (a pass over the indices each time
        # on CPU). Batches of 2^31 pixels or more keep per-image indices.
        start = (jnp.arange(n, dtype=jnp.int32) * pixels)[:, None]
        index = jax.tree.map(lambda i: (i + start).reshape(-1), index)
        weight = tuple(wt.reshape(-1) for wt in weight)
      return bilinear_taps(x, index, weight, padded)
    return taps

  if c == 1:
    # One channel, on CPU: each point's only index is its top-left tap in the zero-padded
    # image, and the input gradient is one scatter (bilinear.taps_vjp_cpu). With more
    # channels the padded copies cost more than they save; other backends keep the
    # per-tap indices (docs/benchmarks.md, "One and three channels on CPU").
    out = route("sampler_padded_taps", bilinear(True), bilinear(False), x, ix, iy)
  else:
    out = bilinear(False)(x, ix, iy)
  return out.reshape(n, h_out, w_out, c).astype(x.dtype)
