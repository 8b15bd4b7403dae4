"""affine_grid / grid_sample against hand computations; SpatialTransformer invariants."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.test_util import check_grads

from attention_flax.layers.transformer import (SpatialTransformer, affine_grid, grid_sample,
                                               localization_min_size)

# Jitted once per shape and configuration: far fewer compilations than op-by-op dispatch.
sample = jax.jit(grid_sample, static_argnames=("mode", "padding_mode", "align_corners"))
make_grid = jax.jit(affine_grid, static_argnums=(1, 2))

IDENTITY = jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], jnp.float32)

# The 1 x 3 x 4 x 1 test image: pixel (row r, column c) holds 4 r + c + 1, a linear function,
# so a bilinear sample whose four taps are all inside equals 4 iy + ix + 1.
IMAGE = jnp.arange(1.0, 13.0, dtype=jnp.float32).reshape(1, 3, 4, 1)

# Grid points (x, y), normalised. Pixel coordinates, W = 4, H = 3:
#   align_corners=False: ix = ((gx + 1) * 4 - 1) / 2,   iy = ((gy + 1) * 3 - 1) / 2
#   align_corners=True:  ix = (gx + 1) / 2 * 3,         iy = (gy + 1) / 2 * 2
#        g              False: (ix, iy)     True: (ix, iy)
#   A (-1.2,  0.0)      (-0.9,  1.0)        (-0.3,  1.0)
#   B ( 0.1, -0.5)      ( 1.7,  0.25)       ( 1.65, 0.5)
#   C ( 1.2,  0.9)      ( 3.9,  2.35)       ( 3.3,  1.9)
#   D (-1.4, -1.6)      (-1.3, -1.4)        (-0.6, -0.6)
#   E ( 1.5,  1.6)      ( 4.5,  3.4)        ( 3.75, 2.6)
POINTS = jnp.array([[[[-1.2, 0.0], [0.1, -0.5], [1.2, 0.9], [-1.4, -1.6], [1.5, 1.6]]]],
                   jnp.float32)  # (1, 1, 5, 2)

# Expected samples at A..E. Derivations (v(r, c) = 4 r + c + 1; "out" = tap outside):
EXPECTED = {
    # zeros: A: x-taps -1 (out), 0 (w 0.1), row 1 -> 0.1 * 5. B: inside -> 4*0.25+1.7+1.
    #   C: only tap (r2, c3) inside, w (4 - 3.9) * (3 - 2.35) = 0.065 -> 0.065 * 12.
    #   D: x-taps -2, -1 both out. E: x-taps 4, 5 both out.
    ("zeros", False): [0.5, 3.7, 0.78, 0.0, 0.0],
    # border clips to [0, 3] x [0, 2]: A (0, 1) -> 5; C (3, 2) -> 12; D (0, 0) -> 1;
    #   E (3, 2) -> 12.
    ("border", False): [5.0, 3.7, 12.0, 1.0, 12.0],
    # reflection about the edges -0.5 and 3.5 (x), -0.5 and 2.5 (y), then clipped:
    #   A: ix -0.9 -> -0.1 -> 0, iy 1 -> 5. C: ix 3.9 -> 3.1 -> 3, iy 2.35 -> 2 (clip) -> 12.
    #   D: ix -1.3 -> 0.3, iy -1.4 -> 0.4 -> 4*0.4+0.3+1 = 2.9.
    #   E: ix 4.5 -> 2.5, iy 3.4 -> 1.6 -> 4*1.6+2.5+1 = 9.9.
    ("reflection", False): [5.0, 3.7, 12.0, 2.9, 9.9],
    # zeros, corners aligned: A: tap c0 w 0.7, row 1 -> 3.5. B: 4*0.5+1.65+1 = 4.65.
    #   C: c3 (w 0.7) x rows 1 (w 0.1), 2 (w 0.9) -> 0.7 * (0.8 + 10.8) = 8.12.
    #   D: only (r0, c0), w 0.4 * 0.4 -> 0.16. E: only (r2, c3), w 0.25 * 0.4 -> 1.2.
    ("zeros", True): [3.5, 4.65, 8.12, 0.16, 1.2],
    # border: A (0, 1) -> 5; C (3, 1.9) -> 7.6+3+1 = 11.6; D (0, 0) -> 1; E (3, 2) -> 12.
    ("border", True): [5.0, 4.65, 11.6, 1.0, 12.0],
    # reflection about the centres 0 and 3 (x), 0 and 2 (y):
    #   A: ix 0.3, iy 1 -> 5.3. C: ix 3.3 -> 2.7, iy 1.9 -> 7.6+2.7+1 = 11.3.
    #   D: (0.6, 0.6) -> 2.4+0.6+1 = 4.0. E: ix 3.75 -> 2.25, iy 2.6 -> 1.4 -> 5.6+2.25+1 = 8.85.
    ("reflection", True): [5.3, 4.65, 11.3, 4.0, 8.85],
}


def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
  """Test data from numpy: no PRNG kernels to compile."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _uniform(seed: int, shape, low=0.0, high=1.0, dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape), dtype)


def _identity(n: int) -> jax.Array:
  return jnp.tile(IDENTITY, (n, 1, 1))


@pytest.mark.parametrize("align_corners, expected", [
    (False, [-0.75, -0.25, 0.25, 0.75]),  # (2 i + 1) / 4 - 1: edges of the corner pixels
    (True, [-1.0, -1.0 / 3.0, 1.0 / 3.0, 1.0]),  # corner pixel centres at -1 and 1
])
def test_affine_grid_identity_is_pixel_centres(align_corners, expected):
  grid = affine_grid(IDENTITY, (1, 3, 4), align_corners=align_corners)
  assert grid.shape == (1, 3, 4, 2)
  rows = [-2.0 / 3.0, 0.0, 2.0 / 3.0] if not align_corners else [-1.0, 0.0, 1.0]
  np.testing.assert_allclose(grid[0, :, :, 0], np.tile(expected, (3, 1)), atol=1e-7)
  np.testing.assert_allclose(grid[0, :, :, 1], np.tile(np.array(rows)[:, None], (1, 4)),
                             atol=1e-7)


def test_affine_grid_applies_theta_and_accepts_nhwc_size():
  # x' = 2x + 0.5y + 0.1, y' = -x + 3y - 0.2 at the align_corners=True points x, y in {-1, 1}.
  theta = jnp.array([[[2.0, 0.5, 0.1], [-1.0, 3.0, -0.2]]])
  grid = affine_grid(theta, (1, 2, 2, 7), align_corners=True)
  expected = [[[-2.0 - 0.5 + 0.1, 1.0 - 3.0 - 0.2], [2.0 - 0.5 + 0.1, -1.0 - 3.0 - 0.2]],
              [[-2.0 + 0.5 + 0.1, 1.0 + 3.0 - 0.2], [2.0 + 0.5 + 0.1, -1.0 + 3.0 - 0.2]]]
  np.testing.assert_allclose(grid[0], expected, atol=1e-6)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_identity_sampling_returns_input_exactly(align_corners, padding_mode):
  x = _normal(0, (2, 5, 7, 3))
  grid = make_grid(_identity(2), x.shape, align_corners)
  for mode in ("bilinear", "nearest"):
    out = sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("padding_mode, align_corners", sorted(EXPECTED))
def test_bilinear_hand_values(padding_mode, align_corners):
  out = sample(IMAGE, POINTS, mode="bilinear", padding_mode=padding_mode,
               align_corners=align_corners)
  assert out.shape == (1, 1, 5, 1)
  np.testing.assert_allclose(out[0, 0, :, 0], EXPECTED[(padding_mode, align_corners)],
                             atol=2e-5)


def _reference_sample(image, points, mode, padding_mode, align_corners):
  """A per-point loop over one (H, W) image, written from the sampler's definition."""
  h, w = image.shape

  def source(coord, size):
    c = (coord + 1) / 2 * (size - 1) if align_corners else ((coord + 1) * size - 1) / 2
    if padding_mode == "border":
      c = min(max(c, 0.0), size - 1.0)
    elif padding_mode == "reflection":
      low, high = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
      while not low <= c <= high:  # mirror at whichever border was crossed
        c = 2 * low - c if c < low else 2 * high - c
      c = min(max(c, 0.0), size - 1.0)
    return c

  def read(r, c):
    return image[r, c] if 0 <= r < h and 0 <= c < w else 0.0

  out = []
  for gx, gy in points:
    ix, iy = source(float(gx), w), source(float(gy), h)
    if mode == "nearest":
      out.append(read(int(np.rint(iy)), int(np.rint(ix))))  # np.rint: half to even
      continue
    x0, y0 = int(np.floor(ix)), int(np.floor(iy))
    fx, fy = ix - x0, iy - y0
    out.append((1 - fx) * (1 - fy) * read(y0, x0) + fx * (1 - fy) * read(y0, x0 + 1)
               + (1 - fx) * fy * read(y0 + 1, x0) + fx * fy * read(y0 + 1, x0 + 1))
  return np.array(out)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_matches_a_per_point_loop_on_random_points(mode):
  # Points near the image (|g| <= 1.2) and far outside (|g| up to 4, where reflection
  # folds several times).
  points = jnp.concatenate([_uniform(11, (1, 1, 4, 2), -1.2, 1.2),
                            _uniform(12, (1, 1, 4, 2), -4.0, 4.0)], axis=2)
  image = np.asarray(IMAGE[0, :, :, 0], np.float64)
  for padding_mode in ("zeros", "border", "reflection"):
    for align_corners in (False, True):
      out = sample(IMAGE, points, mode=mode, padding_mode=padding_mode,
                   align_corners=align_corners)
      ref = _reference_sample(image, np.asarray(points[0, 0], np.float64), mode,
                              padding_mode, align_corners)
      np.testing.assert_allclose(out[0, 0, :, 0], ref, atol=1e-4,
                                 err_msg=f"{mode} {padding_mode} {align_corners}")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_nan_points_read_zero_and_leave_the_rest(channels, padding_mode):
  # A NaN coordinate reads 0 (PyTorch returns NaN with zeros padding) and gives the image
  # no gradient; the other points are untouched.
  x = _normal(31, (1, 4, 5, channels))
  grid = _uniform(32, (1, 1, 6, 2), -0.9, 0.9)
  bad = grid.at[0, 0, 1, 0].set(jnp.nan).at[0, 0, 4, 1].set(jnp.nan)
  for mode in ("bilinear", "nearest"):
    out = sample(x, bad, mode=mode, padding_mode=padding_mode)
    clean = sample(x, grid, mode=mode, padding_mode=padding_mode)
    np.testing.assert_array_equal(out[0, 0, [1, 4]], 0.0)
    np.testing.assert_array_equal(out[0, 0, [0, 2, 3, 5]], clean[0, 0, [0, 2, 3, 5]])
  loss = lambda a, b: jnp.sum(grid_sample(a, b, padding_mode=padding_mode) ** 2)
  dx, dgrid = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, bad)
  dx_clean = jax.jit(jax.grad(loss))(x, grid.at[0, 0, [1, 4]].set(10.0))  # reads nothing
  if padding_mode == "zeros":
    np.testing.assert_allclose(dx, dx_clean, rtol=1e-6, atol=1e-7)
  assert np.all(np.isfinite(dx))
  assert np.all(np.isfinite(dgrid[0, 0, [0, 2, 3, 5]]))
  assert np.abs(dgrid[0, 0, [0, 2, 3, 5]]).max() > 0


def test_nearest_rounds_half_to_even():
  # align_corners=False, row iy = 1 (gy = 0), columns ix = -0.5, 0.5, 1.5, 2.5, 3.5, -0.6:
  # gx = (2 ix + 1) / 4 - 1 = -1, -0.5, 0, 0.5, 1, -1.05.
  grid = jnp.array([[[[-1.0, 0.0], [-0.5, 0.0], [0.0, 0.0], [0.5, 0.0], [1.0, 0.0],
                      [-1.05, 0.0]]]])
  # Half to even: -0.5 -> -0 (inside, v(1, 0) = 5), 0.5 -> 0 (5), 1.5 -> 2 (7), 2.5 -> 2 (7),
  # 3.5 -> 4 (outside: 0), -0.6 -> -1 (outside: 0). Rounding half up would give 6 and 8.
  out = sample(IMAGE, grid, mode="nearest", padding_mode="zeros", align_corners=False)
  np.testing.assert_array_equal(out[0, 0, :, 0], [5.0, 5.0, 7.0, 7.0, 0.0, 0.0])
  # border clips first: 3.5 -> 3 (8), -0.6 -> 0 (5).
  out = sample(IMAGE, grid, mode="nearest", padding_mode="border", align_corners=False)
  np.testing.assert_array_equal(out[0, 0, :, 0], [5.0, 5.0, 7.0, 7.0, 8.0, 5.0])


def test_translation_by_one_pixel_shifts_and_fills_zeros():
  x = _uniform(1, (1, 3, 4, 2), 1.0, 2.0)
  # One pixel is 2 / W = 0.5 in normalised x; output(i) reads input(i + 1).
  theta = jnp.array([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])
  # Eager on purpose: the one place grid_sample runs op by op.
  out = grid_sample(x, affine_grid(theta, x.shape), "bilinear", "zeros", False)
  np.testing.assert_array_equal(sample(x, make_grid(theta, x.shape, False)), out)
  np.testing.assert_allclose(out[:, :, :3], x[:, :, 1:], atol=1e-6)
  np.testing.assert_array_equal(out[:, :, 3], jnp.zeros((1, 3, 2)))


@pytest.mark.parametrize("align_corners", [False, True])
def test_half_turn_flips_both_axes(align_corners):
  x = _normal(2, (2, 3, 5, 2))
  theta = jnp.tile(jnp.array([[[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]]), (2, 1, 1))
  out = sample(x, make_grid(theta, x.shape, align_corners), align_corners=align_corners)
  np.testing.assert_allclose(out, x[:, ::-1, ::-1], atol=1e-6)


def test_output_size_and_dtype_follow_grid_and_input():
  x = jnp.ones((2, 6, 6, 3), jnp.bfloat16)
  # Corners aligned: every point lies inside the image, so no tap reads padding.
  grid = make_grid(_identity(2), (2, 4, 9), True)
  out = sample(x, grid, align_corners=True)
  assert out.shape == (2, 4, 9, 3) and out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out.astype(jnp.float32), 1.0)  # a constant stays constant


@pytest.mark.parametrize("padding_mode, align_corners",
                         [("zeros", False), ("border", True), ("reflection", False)])
def test_gradients_match_finite_differences(padding_mode, align_corners):
  with jax.enable_x64(True):
    x = _normal(3, (1, 3, 4, 2), jnp.float64)
    # Points in and out of range, away from pixel centres where bilinear has kinks.
    grid = _uniform(4, (1, 2, 3, 2), -1.3, 1.3, jnp.float64)
    f = jax.jit(functools.partial(grid_sample, mode="bilinear", padding_mode=padding_mode,
                                  align_corners=align_corners))
    check_grads(f, (x, grid), order=1, modes=("rev",), eps=1e-5, atol=1e-4, rtol=1e-4)
    gx, gg = jax.grad(lambda a, b: jnp.sum(f(a, b) ** 2), argnums=(0, 1))(x, grid)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gg))
    assert np.abs(gg).max() > 0  # the grid receives gradient


def test_grid_gradient_at_the_identity_warp():
  # An STN starts at the identity, where every point sits on a pixel centre: the grid must
  # still get the bilinear gradient there, or theta never moves. On IMAGE (4 r + c + 1) the
  # forward difference along x is 1 and along y is 4; d ix / d gx = W / 2 = 2 and
  # d iy / d gy = H / 2 = 1.5 (align_corners=False), so d out / d g = (2, 6) wherever the
  # right / lower neighbour is inside.
  grid = make_grid(IDENTITY, (1, 3, 4), False)
  grad = jax.jit(jax.grad(lambda g: jnp.sum(grid_sample(IMAGE, g))))(grid)
  np.testing.assert_allclose(grad[0, :, :3, 0], 2.0, rtol=1e-5)
  np.testing.assert_allclose(grad[0, :2, :, 1], 6.0, rtol=1e-5)


def test_grid_sample_gradient_float32_finite():
  x = _normal(5, (2, 5, 5, 3))
  grid = make_grid(jnp.tile(jnp.array([[[0.9, 0.2, 0.1], [-0.1, 1.1, 0.0]]]), (2, 1, 1)),
                   (2, 5, 5), False)
  loss = lambda a, b: jnp.sum(grid_sample(a, b) ** 2)
  gx, gg = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, grid)
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gg)) and np.abs(gg).max() > 0


@pytest.mark.parametrize("call, error, match", [
    (lambda: affine_grid(jnp.zeros((1, 3, 3)), (1, 4, 4)), ValueError, r"\(N, 2, 3\)"),
    (lambda: affine_grid(jnp.zeros((6,)), (1, 4, 4)), ValueError, r"\(N, 2, 3\)"),
    (lambda: affine_grid(IDENTITY, (2, 4, 4)), ValueError, "transforms"),
    (lambda: affine_grid(IDENTITY, (1, 4)), ValueError, "size"),
    (lambda: affine_grid(jnp.zeros((1, 2, 3), jnp.int32), (1, 4, 4)), TypeError, "floating"),
    (lambda: grid_sample(IMAGE, jnp.zeros((1, 2, 2, 3))), ValueError, r"\(N, H_out, W_out, 2\)"),
    (lambda: grid_sample(IMAGE, jnp.zeros((2, 2, 2, 2))), ValueError, "batch"),
    (lambda: grid_sample(IMAGE, jnp.zeros((1, 2, 2, 2), jnp.int32)), TypeError, "floating"),
    (lambda: grid_sample(IMAGE.astype(jnp.int32), jnp.zeros((1, 2, 2, 2))), TypeError,
     "floating"),
    (lambda: grid_sample(IMAGE[0], jnp.zeros((1, 2, 2, 2))), ValueError, "NHWC"),
    (lambda: grid_sample(IMAGE, jnp.zeros((1, 2, 2, 2)), mode="bicubic"), ValueError,
     "bilinear, nearest"),
    (lambda: grid_sample(IMAGE, jnp.zeros((1, 2, 2, 2)), padding_mode="wrap"), ValueError,
     "zeros, border, reflection"),
])
def test_bad_input_raises_clear_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


# --- SpatialTransformer -------------------------------------------------------------------

STN_INPUT = (2, 20, 20, 2)
# Random initialisers compile about ten times faster from an "rbg" key than from the
# default threefry key on this CPU; the tests need values, not a particular stream.
INIT_KEY = jax.random.key(0, impl="rbg")


@pytest.fixture(scope="module")
def stn_setup():
  """One default SpatialTransformer initialised once (random init compiles slowly on CPU)."""
  module = SpatialTransformer()
  x = _uniform(6, STN_INPUT)
  variables = jax.jit(module.init)(INIT_KEY, x)
  return module, variables, x


def _with_theta_head(variables, kernel=None, bias=None):
  params = jax.tree.map(lambda a: a, variables["params"])  # a fresh tree to edit
  if kernel is not None:
    params["fc_theta"]["kernel"] = kernel
  if bias is not None:
    params["fc_theta"]["bias"] = bias
  return {"params": params}


def test_localization_minimum_size():
  assert localization_min_size((7, 5)) == 18  # 18 -conv7-> 12 -pool-> 6 -conv5-> 2 -pool-> 1
  assert localization_min_size((3,)) == 4
  init = lambda shape: jax.eval_shape(SpatialTransformer().init, jax.random.PRNGKey(0),
                                      jax.ShapeDtypeStruct(shape, jnp.float32))
  with pytest.raises(ValueError, match="at least 18 x 18"):
    init((1, 17, 30, 1))
  init((1, 18, 18, 1))


def test_parameter_count_of_the_classic_localization_net():
  # At 28 x 28 the conv stack ends at 3 x 3: conv 7x7x1x8, conv 5x5x8x10, FC 90 -> 32,
  # fc_theta 32 -> 6. The adaptive pool keeps the same count at any other size.
  expected = (7 * 7 * 8 + 8) + (5 * 5 * 8 * 10 + 10) + (90 * 32 + 32) + (32 * 6 + 6)
  for side in (28, 60, 18):
    shapes = jax.eval_shape(SpatialTransformer().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, side, side, 1), jnp.float32))
    assert sum(a.size for a in jax.tree.leaves(shapes["params"])) == expected == 5_520


def test_starts_as_identity_and_sows_theta(stn_setup):
  module, variables, x = stn_setup
  out, state = jax.jit(lambda v, a: module.apply(v, a, mutable=["intermediates"]))(variables, x)
  np.testing.assert_array_equal(out, x)
  theta = state["intermediates"]["stn_theta"][0]
  assert theta.shape == (2, 2, 3) and theta.dtype == jnp.float32
  np.testing.assert_array_equal(theta, _identity(2))
  np.testing.assert_array_equal(state["intermediates"]["stn_output"][0], out)
  head = variables["params"]["fc_theta"]
  np.testing.assert_array_equal(head["kernel"], 0.0)
  np.testing.assert_array_equal(head["bias"], [1, 0, 0, 0, 1, 0])


def test_theta_drives_the_sampler(stn_setup):
  # A half-turn bias makes the output the input flipped along both axes.
  module, variables, x = stn_setup
  half_turn = _with_theta_head(variables, bias=jnp.array([-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]))
  out = jax.jit(module.apply)(half_turn, x)
  np.testing.assert_allclose(out, x[:, ::-1, ::-1], atol=1e-6)


def test_jit_matches_eager_on_a_real_warp(stn_setup):
  module, variables, x = stn_setup
  warped = _with_theta_head(variables,
                            kernel=0.05 * _normal(7, (32, 6)))
  eager = module.apply(warped, x)
  jitted = jax.jit(module.apply)(warped, x)
  chex.assert_trees_all_close(eager, jitted, atol=1e-5)
  assert np.abs(np.asarray(eager) - np.asarray(x)).max() > 1e-3  # really warped


def test_out_size_is_respected(stn_setup):
  # The same parameters serve any output size; identity with align_corners=True on a
  # 7 x 5 grid over 20 x 20 reads the corner pixels exactly.
  _, variables, x = stn_setup
  module = SpatialTransformer(out_size=(7, 5), align_corners=True)
  out = jax.jit(module.apply)(variables, x)
  assert out.shape == (2, 7, 5, 2)
  ref = sample(x, make_grid(_identity(2), (2, 7, 5), True), align_corners=True)
  np.testing.assert_array_equal(out, ref)
  for r, c in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
    np.testing.assert_array_equal(out[:, r, c], x[:, r, c])


def test_bfloat16(stn_setup):
  _, variables, x = stn_setup
  xb = x.astype(jnp.bfloat16)
  module = SpatialTransformer(dtype=jnp.bfloat16)
  out, state = jax.jit(lambda v, a: module.apply(v, a, mutable=["intermediates"]))(variables, xb)
  assert out.dtype == jnp.bfloat16 and state["intermediates"]["stn_theta"][0].dtype == jnp.float32
  np.testing.assert_array_equal(out, xb)  # the identity warp is exact in any dtype
  # dtype=None promotes bfloat16 input with float32 params to float32, as flax does.
  out32 = jax.eval_shape(SpatialTransformer().apply, variables, xb)
  assert out32.dtype == jnp.float32


def test_custom_localization_body():
  class Body(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))

  x = _uniform(8, (3, 8, 10, 2))  # below 18: fine with a body
  module = SpatialTransformer(localization=Body)
  variables = jax.jit(module.init)(INIT_KEY, x)
  assert set(variables["params"]) == {"localization", "fc_theta"}
  assert variables["params"]["localization"]["Dense_0"]["kernel"].shape == (2, 5)
  assert variables["params"]["fc_theta"]["kernel"].shape == (5, 6)
  np.testing.assert_array_equal(jax.jit(module.apply)(variables, x), x)


def test_body_with_batch_norm_gets_the_train_flag():
  class NormBody(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
      return jnp.mean(y, axis=(1, 2))

  x = _uniform(9, (2, 4, 4, 1), 1.0, 3.0)
  module = SpatialTransformer(localization=NormBody)
  variables = jax.jit(module.init)(INIT_KEY, x)
  out, state = jax.jit(lambda v, a: module.apply(v, a, train=True, mutable=["batch_stats"]))(
      variables, x)
  np.testing.assert_array_equal(out, x)
  # One training step moves the running mean 10% of the way to the batch mean.
  np.testing.assert_allclose(state["batch_stats"]["localization"]["BatchNorm_0"]["mean"],
                             0.1 * np.mean(np.asarray(x)), rtol=1e-5)


def test_rejects_bad_config():
  init = lambda module, shape, dtype=jnp.float32: jax.eval_shape(
      module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, dtype))
  with pytest.raises(ValueError, match="bilinear, nearest"):
    init(SpatialTransformer(mode="cubic"), (1, 20, 20, 1))
  with pytest.raises(ValueError, match="zeros, border, reflection"):
    init(SpatialTransformer(padding_mode="edge"), (1, 20, 20, 1))
  with pytest.raises(ValueError, match="out_size"):
    init(SpatialTransformer(out_size=(0, 4)), (1, 20, 20, 1))
  with pytest.raises(ValueError, match="NHWC"):
    init(SpatialTransformer(), (20, 20, 1))
  with pytest.raises(TypeError, match="floating"):
    init(SpatialTransformer(), (1, 20, 20, 1), jnp.uint8)
