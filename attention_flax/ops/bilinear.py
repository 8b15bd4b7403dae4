"""The bilinear sampler's taps and their gradient: the inner part of
:func:`attention_flax.ops.grid_sample`.

Each output point reads four taps (the pixels around its source position) with weights
that sum to one. :func:`bilinear_index` turns pixel coordinates into the taps' indices
and weights; :func:`bilinear_taps` sums the weighted taps and carries a
``jax.custom_vjp`` whose CPU rule, :func:`taps_vjp_cpu`, is written for XLA:CPU (other
backends differentiate the same formula with JAX's autodiff, :func:`taps_vjp_autodiff`).

Two index layouts (:func:`tap_rows`): one clipped index per tap into the image's pixels,
or, ``padded``, one index per point, its top-left tap in the image surrounded by a ring of
zero pixels, the other three at fixed offsets. ``grid_sample`` uses the padded one for
one channel on CPU (one scatter for the input gradient) and the per-tap one elsewhere
(``docs/benchmarks.md``, "grid_sample's gradient on CPU").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from attention_flax.ops.backends import route

Array = jax.Array
# The taps' weights, one array per corner, and their indices: one array (each point's
# top-left tap in the zero-padded image) or one per corner (see tap_rows).
Taps = tuple[Array, ...]
TapIndex = Array | Taps


def flat_index(cx: Array, cy: Array, height: int, width: int) -> tuple[Array, Array]:
  """Integer-valued pixel coordinates -> (index into the flattened H*W axis, in-bounds)."""
  valid = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
  # Clipping before the cast keeps huge coordinates from overflowing int32; the taps they
  # give are masked out by `valid` (False for NaN too, whose index XLA's gather clamps).
  xi = jnp.clip(cx, 0, width - 1).astype(jnp.int32)
  yi = jnp.clip(cy, 0, height - 1).astype(jnp.int32)
  return yi * width + xi, valid


def take_rows(flat: Array, index: Array) -> Array:
  """Pixel rows at in-bounds indices: (N, H*W, C) at (N, P) -> (N, P, C), or, indices into
  the whole batch, (N*H*W, C) at (Q,) -> (Q, C)."""
  # promise_in_bounds skips the clamping `clip` mode would add: the indices are in range.
  kw = dict(mode="promise_in_bounds", wrap_negative_indices=False)
  if flat.ndim == 2:
    if flat.shape[1] == 1:
      # One channel: XLA:CPU loops over a 1-D gather faster than over rows of one value.
      return flat[:, 0].at[index].get(**kw)[:, None]
    return flat.at[index].get(**kw)
  return jnp.take_along_axis(flat, index[..., None], axis=1, mode="promise_in_bounds")


def add_rows(flat: Array, index: Array, rows: Array) -> Array:
  """flat with rows added at index (repeats accumulate): the transpose of :func:`take_rows`."""
  kw = dict(mode="promise_in_bounds", wrap_negative_indices=False)
  if flat.ndim == 2:
    return flat.at[index].add(rows, **kw)
  return jax.vmap(lambda f, i, r: f.at[i].add(r, **kw))(flat, index, rows)


def tap_rows(x: Array, index: TapIndex, padded: bool) -> tuple[Array, list[Array]]:
  """x as rows of C values and the four taps' indices into them.

  ``padded=False``: index is four (Q,) arrays (indices into the whole batch) or four
  (N, P) (per image), one clipped index per tap, and the rows are x's: (N*H*W, C) or
  (N, H*W, C).
  ``padded=True``: index is (Q,) or (N, P), each point's top-left tap in x padded with a
  ring of zeros ((N*(H+2)*(W+2), C) or (N, (H+2)*(W+2), C)); the taps are at offsets 0,
  1, W + 2 and W + 3 from it, and those outside the image read zeros.
  """
  n, h, w, c = x.shape
  batch_index = (index if padded else index[0]).ndim == 1
  if padded:
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = h + 2, w + 2
  flat = x.reshape(n * h * w, c) if batch_index else x.reshape(n, h * w, c)
  taps = [index + offset for offset in (0, 1, w, w + 1)] if padded else list(index)
  return flat, taps


def weighted_taps(x: Array, index: TapIndex, weight: Taps, padded: bool) -> Array:
  """sum_k weight[k] * the rows of x at tap k (:func:`tap_rows`): (Q, C) for four (Q,)
  weights, or (N, P, C) for four (N, P).

  Indices and weights are four separate arrays: XLA:CPU evaluates a stacked (4, ...)
  array's concatenation element by element, and the weights' gradient would then have to
  come back stacked too (docs/benchmarks.md, "One and three channels on CPU").
  """
  flat, taps = tap_rows(x, index, padded)
  out = None
  # One row gather per corner: each output pixel reads its four taps and nothing else,
  # where one gather of a stacked (N, 4 P) index needs a concatenation XLA fuses poorly.
  for tap, wt in zip(taps, weight):
    term = wt[..., None] * take_rows(flat, tap).astype(wt.dtype)
    out = term if out is None else out + term
  return out


@jax.custom_jvp
def row_dots(rows: tuple[Array, ...], g: Array) -> tuple[Array, ...]:
  """(sum_c rows[k][..., c] * g[..., c] for each k), as one variadic reduction.

  XLA:CPU fuses a variadic reduction with the gathers that produce ``rows`` and reads g
  once. Separate sums go to a reduction library that needs every (N, P, C) operand written
  out first (docs/benchmarks.md, "grid_sample's gradient on CPU").
  """
  zero = jnp.zeros((), g.dtype)
  return tuple(jax.lax.reduce([r * g for r in rows], [zero] * len(rows),
                              lambda a, b: tuple(u + v for u, v in zip(a, b)), (g.ndim - 1,)))


@row_dots.defjvp
def _row_dots_jvp(primals, tangents):
  # A reduction with a custom computation has no derivative of its own; derivatives of the
  # gradient (second order) use plain sums.
  rows, g = primals
  rows_dot, g_dot = tangents
  out_dot = tuple(jnp.sum(r_dot * g + r * g_dot, axis=-1) for r, r_dot in zip(rows, rows_dot))
  return row_dots(rows, g), out_dot


def taps_vjp_cpu(x: Array, index: TapIndex, weight: Taps, g: Array,
                  padded: bool) -> tuple[Array, Taps]:
  """d/d(x, weight) of :func:`weighted_taps` given its output gradient g, for XLA:CPU."""
  n, h, w, c = x.shape
  flat, taps = tap_rows(x, index, padded)
  if not padded:
    # The barrier keeps XLA from sharing the forward pass's gathers with these (it is
    # removed only after common subexpressions are merged), which would write all four
    # gathered (N, P, C) arrays out; gathering again inside the reduction is cheaper than
    # reading them back. With one channel (padded) the shared gathers are four (Q,)
    # arrays, and reading them back is what is cheaper: otherwise the grid's gradient,
    # two elements per point, gathers every tap again for each.
    (flat,) = jax.lax.optimization_barrier((flat,))
  rows = tuple(take_rows(flat, tap).astype(g.dtype) for tap in taps)
  dweight = row_dots(rows, g)
  if padded:
    # One scatter of each point's four weighted gradients side by side, at its top-left
    # tap, into a (..., 4 C) buffer, instead of four scatters (XLA:CPU's scatter costs per
    # index more than per value). Each pixel then sums the slot that each of its four
    # neighbours' anchors kept for it. The four weights are interleaved by selects, which
    # XLA:CPU runs faster than the concatenation that stacking them would be.
    corner = jnp.arange(4)
    w4 = weight[3][..., None]
    for k in (2, 1, 0):
      w4 = jnp.where(corner == k, weight[k][..., None], w4)
    quad = (w4[..., None] * g[..., None, :]).reshape(g.shape[:-1] + (4 * c,))
    dquad = add_rows(jnp.zeros(flat.shape[:-1] + (4 * c,), g.dtype), index, quad)
    dquad = dquad.reshape(n, h + 2, w + 2, 4, c)
    dx = (dquad[:, 1:h + 1, 1:w + 1, 0] + dquad[:, 1:h + 1, :w, 1]
          + dquad[:, :h, 1:w + 1, 2] + dquad[:, :h, :w, 3])
  else:
    # The four corners scatter into one buffer in turn (in place), not into four zero
    # buffers that are then summed. Three channels (RGB) scatter rows of four, the last
    # zero: XLA:CPU scatters rows of three slowly. Other widths stay as they are
    # (docs/benchmarks.md, "One and three channels on CPU").
    wide = 4 if c == 3 else c
    if wide != c:
      g = jnp.pad(g, [(0, 0)] * (g.ndim - 1) + [(0, wide - c)])
    dflat = jnp.zeros(flat.shape[:-1] + (wide,), g.dtype)
    for tap, wt in zip(taps, weight):
      dflat = add_rows(dflat, tap, wt[..., None] * g)
    dflat = dflat[..., :c]
    dx = dflat.reshape(x.shape)
  return dx.astype(x.dtype), dweight


def taps_vjp_autodiff(x: Array, index: TapIndex, weight: Taps, g: Array,
                       padded: bool) -> tuple[Array, Taps]:
  """The same gradient as JAX's autodiff derives it (used off CPU)."""
  _, pullback = jax.vjp(lambda a, b: weighted_taps(a, index, b, padded), x, weight)
  return pullback(g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def bilinear_taps(x: Array, index: TapIndex, weight: Taps, padded: bool) -> Array:
  """:func:`weighted_taps` with :func:`taps_vjp_cpu` as its gradient on CPU."""
  return weighted_taps(x, index, weight, padded)


def _bilinear_taps_fwd(x, index, weight, padded):
  return weighted_taps(x, index, weight, padded), (x, index, weight)


def _bilinear_taps_bwd(padded, residuals, g):
  dx, dweight = route("sampler_vjp", functools.partial(taps_vjp_cpu, padded=padded),
                      functools.partial(taps_vjp_autodiff, padded=padded), *residuals, g)
  return dx, None, dweight


bilinear_taps.defvjp(_bilinear_taps_fwd, _bilinear_taps_bwd)


def bilinear_index(ix: Array, iy: Array, height: int, width: int,
                    padded: bool) -> tuple[TapIndex, Taps]:
  """Pixel coordinates (N, P) -> the taps' index ((N, P) if padded, else four (N, P)) and
  four (N, P) weights, for :func:`tap_rows`."""
  x0 = jnp.floor(ix)
  y0 = jnp.floor(iy)
  x1 = x0 + 1.0
  y1 = y0 + 1.0
  # Each corner's weight is the area of the opposite sub-rectangle.
  wx0, wx1 = x1 - ix, ix - x0
  wy0, wy1 = y1 - iy, iy - y0
  zero = jnp.zeros((), ix.dtype)
  areas = (wx0 * wy0, wx1 * wy0, wx0 * wy1, wx1 * wy1)
  # `where`, not a product, so that a NaN weight of an invalid tap reads 0 as PyTorch does.
  if padded:
    # Taps outside the image read the padding's zeros (their weights' gradients are then
    # zero, as PyTorch's), as long as the top-left one lies in [-1, H - 1] x [-1, W - 1];
    # points further out read nothing.
    inside = (x0 >= -1) & (x0 <= width - 1) & (y0 >= -1) & (y0 <= height - 1)
    weight = tuple(jnp.where(inside, a, zero) for a in areas)
    index = (jnp.where(inside, y1, zero).astype(jnp.int32) * (width + 2)
             + jnp.where(inside, x1, zero).astype(jnp.int32))
    return index, weight
  index, weight = [], []
  for cx, cy, area in zip((x0, x1, x0, x1), (y0, y0, y1, y1), areas):
    i, valid = flat_index(cx, cy, height, width)
    index.append(i)
    weight.append(jnp.where(valid, area, zero))
  return tuple(index), tuple(weight)
