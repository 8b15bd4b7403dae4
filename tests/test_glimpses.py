"""The glimpse sensor: explicit numpy crops, zero fill, the affine_grid convention,
jit / vmap, and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax import extract_glimpses
from attention_flax.glimpses import glimpse_starts
from attention_flax.sampling import affine_grid, grid_sample


def _images(shape, seed=0):
  return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def _location(row0: int, col0: int, side: int, h: int, w: int) -> tuple[float, float]:
  """The (x, y) whose side x side patch starts exactly at pixel (row0, col0)."""
  return ((2 * col0 + side) / w - 1.0, (2 * row0 + side) / h - 1.0)


def _numpy_glimpse(image, row0, col0, side, factor):
  """A side x side crop starting at (row0, col0), zeros outside the image, then the mean of
  every factor x factor block, written out with loops."""
  h, w, c = image.shape
  crop = np.zeros((side, side, c), np.float64)
  for i in range(side):
    for j in range(side):
      r, q = row0 + i, col0 + j
      if 0 <= r < h and 0 <= q < w:
        crop[i, j] = image[r, q]
  out_side = side // factor
  out = np.zeros((out_side, out_side, c), np.float64)
  for i in range(out_side):
    for j in range(out_side):
      out[i, j] = crop[i * factor:(i + 1) * factor, j * factor:(j + 1) * factor].mean((0, 1))
  return out


def test_centre_glimpse_is_the_middle_crop():
  x = _images((1, 10, 12, 1))
  out = extract_glimpses(jnp.asarray(x), jnp.zeros((1, 2), jnp.float32), 4)
  assert out.shape == (1, 1, 4, 4, 1)
  # H = 10, W = 12, side 4: rows 3..6, columns 4..7.
  np.testing.assert_array_equal(np.asarray(out[0, 0]), x[0, 3:7, 4:8])


@pytest.mark.parametrize("size, scale", [(4, 2), (3, 3)])
def test_every_scale_against_numpy_crops(size, scale):
  # size * (scale**k - 1) is even: every scale's start is a whole pixel, no rounding tie.
  num_scales, h, w, c = 3, 26, 23, 2
  x = _images((4, h, w, c), seed=scale)
  # Starts of the finest patch; the coarser ones share its centre (side * scale**k).
  starts = [(5, 4), (0, 0), (8, 9), (2, 11)]
  locations = np.asarray([_location(r, q, size, h, w) for r, q in starts], np.float32)
  out = np.asarray(extract_glimpses(jnp.asarray(x), jnp.asarray(locations), size,
                                    num_scales, scale))
  assert out.shape == (4, num_scales, size, size, c)
  for n, (r, q) in enumerate(starts):
    for k in range(num_scales):
      side = size * scale ** k
      # Same centre: the start moves up-left by (side - size) / 2 pixels.
      shift = (side - size) // 2
      r0, q0 = r - shift, q - shift
      want = _numpy_glimpse(x[n], r0, q0, side, scale ** k)
      np.testing.assert_allclose(out[n, k], want, rtol=1e-6, atol=1e-6,
                                 err_msg=f"image {n}, scale {k}")


def test_outside_the_image_reads_zero():
  h = w = 8
  x = np.ones((3, h, w, 1), np.float32)
  # Top-left corner: the 4 x 4 patch centred on the corner point (-1, -1) holds 2 x 2 of
  # the image; its 8 x 8 scale, average-pooled by 2, holds one full block of ones.
  locs = jnp.asarray([[-1.0, -1.0], [5.0, 5.0], [1.0, -1.0]], jnp.float32)
  out = np.asarray(extract_glimpses(jnp.asarray(x), locs, 4, num_scales=2))
  want0 = np.zeros((4, 4)); want0[2:, 2:] = 1.0
  np.testing.assert_array_equal(out[0, 0, ..., 0], want0)
  want1 = np.zeros((4, 4)); want1[2:, 2:] = 1.0  # blocks of 2 x 2: the image is 4 x 4 of 8
  np.testing.assert_array_equal(out[0, 1, ..., 0], want1)
  np.testing.assert_array_equal(out[1], 0.0)  # far outside: all zeros
  want2 = np.zeros((4, 4)); want2[2:, :2] = 1.0  # top-right corner
  np.testing.assert_array_equal(out[2, 0, ..., 0], want2)


def test_partial_block_averages_with_zeros():
  x = np.ones((1, 6, 6, 1), np.float32)
  # Side 2 at scale 1 (4 pixels, pooled by 2) starting one pixel left of the image.
  loc = jnp.asarray([_location(0, -1, 4, 6, 6)], jnp.float32)
  out = np.asarray(extract_glimpses(jnp.asarray(x), loc, 2, num_scales=2))
  np.testing.assert_allclose(out[0, 1, ..., 0], [[0.5, 1.0], [0.5, 1.0]])


@pytest.mark.parametrize("start", [(3, 5), (0, 9), (7, 2)])
def test_convention_agrees_with_affine_grid(start):
  # theta = [[S/W, 0, tx], [0, S/H, ty]] maps the S x S output onto the input pixels of the
  # patch centred at (tx, ty): with the crop on the pixel grid, bilinear sampling reads
  # exactly the patch.
  h, w, side = 16, 20, 6
  x = _images((1, h, w, 3), seed=7)
  tx, ty = _location(start[0], start[1], side, h, w)
  theta = jnp.asarray([[[side / w, 0.0, tx], [0.0, side / h, ty]]], jnp.float32)
  sampled = grid_sample(jnp.asarray(x), affine_grid(theta, (1, side, side)))
  out = extract_glimpses(jnp.asarray(x), jnp.asarray([[tx, ty]], jnp.float32), side)
  np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(sampled[0]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(glimpse_starts(jnp.asarray([[tx, ty]]), side, h, w)),
                                [start])


def test_jit_and_vmap_agree_with_eager():
  x = jnp.asarray(_images((3, 12, 12, 1), seed=3))
  locs = jnp.asarray([[0.1, -0.3], [-0.7, 0.9], [0.5, 0.5]], jnp.float32)
  eager = extract_glimpses(x, locs, 4, 2, 2)
  jitted = jax.jit(extract_glimpses, static_argnums=(2, 3, 4))(x, locs, 4, 2, 2)
  # Under jit the pooling's sums may be ordered differently: float rounding apart.
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)
  # vmap over a leading axis of batches: each batch as by itself.
  stacked = jax.vmap(lambda a, b: extract_glimpses(a, b, 4, 2, 2))(
      jnp.stack([x, x[::-1]]), jnp.stack([locs, locs[::-1]]))
  np.testing.assert_allclose(np.asarray(stacked[0]), np.asarray(eager), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stacked[1]), np.asarray(eager)[::-1], rtol=1e-6)
  # The pixels carry gradients: d sum / d x counts how often each pixel is read.
  grad = jax.grad(lambda a: extract_glimpses(a, locs[:1], 4).sum())(x[:1])
  assert float(grad.sum()) == 16.0


@pytest.mark.parametrize("images, locations, kwargs, match", [
    (np.zeros((2, 8, 8), np.float32), np.zeros((2, 2), np.float32), {}, "rank-4"),
    (np.zeros((2, 8, 8, 1), np.float32), np.zeros((2, 3), np.float32), {}, r"\(N, 2\)"),
    (np.zeros((2, 8, 8, 1), np.float32), np.zeros((3, 2), np.float32), {}, r"\(N, 2\)"),
    (np.zeros((2, 8, 8, 1), np.float32), np.zeros((2, 2), np.int32), {}, "floating"),
    (np.zeros((2, 8, 8, 1), np.float32), np.zeros((2, 2), np.float32), {"size": 0},
     "size must be >= 1"),
    (np.zeros((2, 8, 8, 1), np.float32), np.zeros((2, 2), np.float32),
     {"num_scales": 2.0}, "num_scales must be an int"),
])
def test_bad_input_errors(images, locations, kwargs, match):
  kw = {"size": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    extract_glimpses(jnp.asarray(images), jnp.asarray(locations), **kw)


def test_integer_images_are_refused():
  with pytest.raises(TypeError, match="floating"):
    extract_glimpses(jnp.zeros((1, 8, 8, 1), jnp.uint8), jnp.zeros((1, 2), jnp.float32), 4)
