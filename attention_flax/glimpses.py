"""The glimpse sensor of the Recurrent Attention Model (Mnih et al. 2014, "Recurrent Models of
Visual Attention", https://arxiv.org/abs/1406.6247, sec. 3.1 and Fig. 1A).

:func:`extract_glimpses` reads a retina-like set of square patches around one location per
image: the k-th patch (k = 0 .. num_scales - 1) covers ``size * scale**k`` pixels and is
average-pooled by ``scale**k`` down to ``size x size`` pixels, so every scale has the same
number of values and the outer ones see more of the image at lower resolution.

Locations are (x, y) pairs normalised to [-1, 1] exactly as in
:func:`attention_flax.sampling.affine_grid` with ``align_corners=False``: (-1, -1) is the
outer top-left corner of the image, (1, 1) the outer bottom-right corner, and pixel i of n
has its centre at (2i + 1) / n - 1. A patch of side S centred at x starts at pixel
``((x + 1) * W - S) / 2`` (for x = 0 and even W - S, the patch sits exactly in the middle),
rounded to the nearest integer (halves up, so a start within float rounding of a half may
go either way): patches are cut on the pixel grid, with no interpolation, as the paper's
sensor does. The location therefore carries no gradient
(the model trains it by REINFORCE); the pixels do. Everything outside the image reads 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention_flax.checks import check_images

Array = jax.Array


def _check_int(value, name: str, low: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"extract_glimpses: {name} must be an int >= {low}; got {value!r}.")
  if value < low:
    raise ValueError(f"extract_glimpses: {name} must be >= {low}; got {value}.")
  return int(value)


def glimpse_starts(locations: Array, side: int, height: int, width: int) -> Array:
  """The integer (row, column) of the top-left pixel of a ``side`` x ``side`` patch centred
  at each (x, y) location; (N, 2) int32. May lie outside the image."""
  loc = jnp.asarray(locations, jnp.float32)
  col = jnp.floor(((loc[:, 0] + 1.0) * width - side) / 2.0 + 0.5)
  row = jnp.floor(((loc[:, 1] + 1.0) * height - side) / 2.0 + 0.5)
  return jnp.stack([row, col], axis=-1).astype(jnp.int32)


def extract_glimpses(images: Array, locations: Array, size: int, num_scales: int = 1,
                     scale: int = 2) -> Array:
  """Retina patches of every image around its location.

  Args:
    images: (N, H, W, C) floating images.
    locations: (N, 2) floating (x, y) centres in [-1, 1] (``affine_grid``'s convention,
      ``align_corners=False``); values outside [-1, 1] are allowed and read zeros.
    size: the side of every returned patch, in pixels.
    num_scales: patches per location; the k-th covers ``size * scale**k`` pixels.
    scale: the growth factor between consecutive patches (an int >= 1).

  Returns:
    (N, num_scales, size, size, C) in the images' dtype: patch k average-pooled over
    ``scale**k`` x ``scale**k`` blocks; pixels outside the image count as zeros (so a
    block half outside the image averages to half its inside). Jittable (``size``,
    ``num_scales`` and ``scale`` are static) and vmappable.
  """
  check_images(images, "extract_glimpses")
  size = _check_int(size, "size", 1)
  num_scales = _check_int(num_scales, "num_scales", 1)
  scale = _check_int(scale, "scale", 1)
  shape = getattr(locations, "shape", None)
  if shape is None or len(shape) != 2 or shape[1] != 2 or shape[0] != images.shape[0]:
    raise ValueError(
        f"extract_glimpses expects locations of shape (N, 2) = ({images.shape[0]}, 2), one "
        f"(x, y) pair per image; got {shape}.")
  if not jnp.issubdtype(jnp.asarray(locations).dtype, jnp.floating):
    raise ValueError("extract_glimpses expects floating locations in [-1, 1]; got dtype "
                     f"{jnp.asarray(locations).dtype}. Cast with .astype(jnp.float32).")
  n, h, w, c = images.shape
  largest = size * scale ** (num_scales - 1)
  # Padding by the largest side on every edge keeps every clipped slice inside the array;
  # a start clipped to -largest or to H (W) still reads zeros only.
  padded = jnp.pad(images, ((0, 0), (largest, largest), (largest, largest), (0, 0)))
  patches = []
  for k in range(num_scales):
    side, factor = size * scale ** k, scale ** k
    starts = glimpse_starts(locations, side, h, w)
    starts = jnp.clip(starts, -side, jnp.asarray([h, w])) + largest

    def crop(image, start, side=side):
      return jax.lax.dynamic_slice(image, (start[0], start[1], 0), (side, side, c))

    patch = jax.vmap(crop)(padded, starts)
    if factor > 1:
      acc = jnp.promote_types(patch.dtype, jnp.float32)
      patch = patch.astype(acc).reshape(n, size, factor, size, factor, c).mean(axis=(2, 4))
    patches.append(patch.astype(images.dtype))
  return jnp.stack(patches, axis=1)
