"""The sampler of Spatial Transformer Networks (Jaderberg et al., NIPS 2015), https://arxiv.org/abs/1506.02025

A sampling grid from affine transforms (:func:`affine_grid`) and the resampling of images
on it (:func:`grid_sample`). Both functions follow the semantics of
``torch.nn.functional.affine_grid`` / ``grid_sample`` exactly, in NHWC layout:

* grid points are (x, y) pairs normalised to [-1, 1]; (-1, -1) is the top-left corner;
* ``theta`` maps output coordinates to input coordinates;
* ``align_corners=False``: -1 and 1 are the outer edges of the corner pixels, so pixel i of
  n sits at (2i + 1) / n - 1; ``align_corners=True``: -1 and 1 are the corner pixel centres;
* padding ``zeros`` (taps outside the image read 0), ``border`` (coordinates clipped to the
  image) or ``reflection`` (coordinates reflected about the borders, then clipped);
* ``nearest`` rounds half to even, as C's ``nearbyint`` does.

One deliberate refinement: a source coordinate within a few float32 ulps of a pixel centre
is moved onto it (in value, not in gradient), so that the identity transform returns its
input bit for bit, where PyTorch's float32 arithmetic leaves errors of about 1e-7.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention_flax.checks import accumulation_dtype, check_choice, check_float, check_images

Array = jax.Array

MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border", "reflection")
# theta of the identity transform, row-major (2, 3).
IDENTITY_THETA = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def base_coords(n: int, align_corners: bool) -> np.ndarray:
  """The normalised centres of n pixels along one axis, in float64 (exact, rounded once)."""
  i = np.arange(n, dtype=np.float64)
  if align_corners:
    # PyTorch's linspace(-1, 1, 1) is [-1]; the sampler maps any coordinate to pixel 0 then.
    return (2.0 * i - (n - 1)) / (n - 1) if n > 1 else np.full((1,), -1.0)
  return (2.0 * i + 1.0 - n) / n


def affine_grid(theta: Array, size: Sequence[int], align_corners: bool = False) -> Array:
  """The sampling grid of a batch of affine transforms (``F.affine_grid`` in NHWC).

  Args:
    theta: (N, 2, 3) floating transforms, mapping output (x, y, 1) to input (x, y).
    size: the output size, (N, H_out, W_out) or (N, H_out, W_out, C) (C is ignored); NHWC
      order, unlike PyTorch's (N, C, H, W).
    align_corners: whether -1 and 1 are the centres (True) or the outer edges (False) of
      the corner pixels.

  Returns:
    (N, H_out, W_out, 2) grid of (x, y) input coordinates, in theta's dtype.
  """
  shape = getattr(theta, "shape", None)
  if shape is None or len(shape) != 3 or tuple(shape[1:]) != (2, 3):
    raise ValueError(f"affine_grid expects theta of shape (N, 2, 3); got {shape}. "
                     "Reshape six parameters per example with theta.reshape(-1, 2, 3).")
  check_float(theta, "affine_grid's theta")
  size = tuple(size)
  if len(size) not in (3, 4) or not all(isinstance(s, (int, np.integer)) for s in size):
    raise ValueError(f"affine_grid expects size (N, H_out, W_out) or (N, H_out, W_out, C) "
                     f"of ints; got {size}.")
  n, h, w = (int(s) for s in size[:3])
  if n != shape[0]:
    raise ValueError(f"affine_grid: size[0] = {n} but theta holds {shape[0]} transforms; "
                     "pass size=(theta.shape[0], H_out, W_out).")
  if h < 1 or w < 1:
    raise ValueError(f"affine_grid needs a positive output size; got H={h}, W={w}.")
  xs = jnp.asarray(base_coords(w, align_corners), theta.dtype)[None, None, :]
  ys = jnp.asarray(base_coords(h, align_corners), theta.dtype)[None, :, None]
  t = theta[:, :, :, None, None]  # (N, 2, 3, 1, 1): broadcast against (H, W)
  gx = t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2]
  gy = t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2]
  return jnp.stack([gx, gy], axis=-1)


def reflect(c: Array, twice_low: int, twice_high: int) -> Array:
  """Reflects c about low = twice_low / 2 and high = twice_high / 2 until it lies between.

  Bounds come doubled so that the half-pixel edges of align_corners=False stay integers.
  """
  if twice_low == twice_high:
    return jnp.zeros_like(c)
  low = twice_low / 2
  span = (twice_high - twice_low) / 2
  c = jnp.abs(c - low)
  extra = jnp.fmod(c, span)
  flips = jnp.floor(c / span)
  # An even number of flips leaves the direction unchanged, an odd one mirrors it.
  return jnp.where(jnp.fmod(flips, 2.0) == 0.0, extra + low, span - extra + low)


def source_index(coord: Array, size: int, padding_mode: str, align_corners: bool) -> Array:
  """Normalised coordinates -> pixel coordinates along one axis, padding applied."""
  if align_corners:
    c = (coord + 1.0) / 2.0 * (size - 1)
  else:
    c = ((coord + 1.0) * size - 1.0) / 2.0
  # Normalising a pixel centre and back lands within one ulp of size of the integer, not on
  # it, which would blend a 1e-7 share of the neighbour into every pixel of an identity
  # warp. Points that close are moved onto the centre; the move is below the coordinate's
  # own rounding error, and it is made in value only, so gradients stay those of the
  # bilinear formula.
  tol = 4.0 * float(np.finfo(c.dtype).eps) * max(size, 1)
  nearest = jnp.round(c)
  snap = jnp.where(jnp.abs(c - nearest) <= tol, nearest - c, jnp.zeros((), c.dtype))
  c = c + jax.lax.stop_gradient(snap)
  if padding_mode == "border":
    c = jnp.clip(c, 0.0, size - 1.0)
  elif padding_mode == "reflection":
    if align_corners:
      c = reflect(c, 0, 2 * (size - 1))
    else:
      c = reflect(c, -1, 2 * size - 1)
    c = jnp.clip(c, 0.0, size - 1.0)
  return c


def check_sample_args(x: Array, grid: Array, mode: str, padding_mode: str) -> None:
  """The argument checks of :func:`grid_sample` (and of any sampler with its signature)."""
  check_images(x, "grid_sample")
  gshape = getattr(grid, "shape", None)
  if gshape is None or len(gshape) != 4 or gshape[-1] != 2:
    raise ValueError(f"grid_sample expects grid of shape (N, H_out, W_out, 2) holding (x, y) "
                     f"pairs; got {gshape}.")
  if gshape[0] != x.shape[0]:
    raise ValueError(f"grid_sample: grid has batch {gshape[0]} but x has {x.shape[0]}; "
                     "build one grid per image.")
  check_float(grid, "grid_sample's grid")
  check_choice(mode, MODES, "mode")
  check_choice(padding_mode, PADDING_MODES, "padding_mode")


def grid_sample(x: Array, grid: Array, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False) -> Array:
  """Samples images at grid points (``F.grid_sample`` for 4-D input, in NHWC).

  Args:
    x: (N, H, W, C) floating images.
    grid: (N, H_out, W_out, 2) floating (x, y) coordinates normalised to [-1, 1].
    mode: "bilinear" (differentiable in x and grid) or "nearest" (round half to even).
    padding_mode: "zeros", "border" or "reflection": what out-of-range points read.
    align_corners: as in :func:`affine_grid`; use the same value for both.

  Returns:
    (N, H_out, W_out, C) samples in x's dtype (positions and weights in float32 or wider).

  Bilinear: each point reads the four pixels around its source position (x, y) with
  weights (1 - fx)(1 - fy), fx (1 - fy), (1 - fx) fy, fx fy, where fx, fy are the
  fractional parts; taps outside the image read 0. Plain JAX, so every transformation
  works (``grad``, ``jvp``, ``vmap``). :func:`attention_flax.ops.grid_sample` has the same
  values with a faster gradient; the spatial transformer uses that one by default.
  """
  check_sample_args(x, grid, mode, padding_mode)
  n, h, w, c = x.shape
  _, h_out, w_out, _ = grid.shape
  acc = accumulation_dtype(x.dtype, grid.dtype)
  g = grid.astype(acc).reshape(n, h_out * w_out, 2)
  ix = source_index(g[..., 0], w, padding_mode, align_corners)
  iy = source_index(g[..., 1], h, padding_mode, align_corners)
  flat = x.reshape(n, h * w, c)

  def tap(cx: Array, cy: Array, weight: Array) -> Array:
    """``weight`` times the pixels at integer-valued (cx, cy), (N, P, C); 0 outside the
    image and at NaN coordinates, which then pass no gradient to the image."""
    valid = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
    index = (jnp.clip(cy, 0, h - 1).astype(jnp.int32) * w
             + jnp.clip(cx, 0, w - 1).astype(jnp.int32))
    rows = jnp.take_along_axis(flat, index[..., None], axis=1, mode="clip")
    weight = jnp.where(valid, weight, jnp.zeros((), weight.dtype))
    return rows.astype(weight.dtype) * weight[..., None]

  if mode == "nearest":
    out = tap(jnp.round(ix), jnp.round(iy), jnp.ones_like(ix))
  else:
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    fx, fy = ix - x0, iy - y0
    out = (tap(x0, y0, (1 - fx) * (1 - fy)) + tap(x0 + 1, y0, fx * (1 - fy))
           + tap(x0, y0 + 1, (1 - fx) * fy) + tap(x0 + 1, y0 + 1, fx * fy))
  return out.reshape(n, h_out, w_out, c).astype(x.dtype)
