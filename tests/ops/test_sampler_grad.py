"""attention_flax.ops.sampler.grid_sample's gradient equals autodiff of sampling.grid_sample."""

# The fast sampler's bilinear gradient is a ``jax.custom_vjp`` whose CPU rule is written by
# hand (attention_flax.ops.bilinear.taps_vjp_cpu); attention_flax.sampling.grid_sample is
# the plain formula differentiated by JAX. The two must give the same gradients, second
# derivatives and batched gradients.

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax import sampling
from attention_flax.layers.transformer import SpatialTransformer
from attention_flax.ops import bilinear
from attention_flax.ops import sampler as fast_sampler
from attention_flax.ops.sampler import grid_sample
from attention_flax.sampling import affine_grid

PLAIN = sampling.grid_sample


def _data(shape, out_hw, seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  n = shape[0]
  x = jnp.asarray(rng.standard_normal(shape), dtype)
  # Points inside, across the border and far outside, away from pixel centres.
  grid = jnp.asarray(rng.uniform(-1.4, 1.4, (n, *out_hw, 2)), dtype)
  cot = jnp.asarray(rng.standard_normal((n, *out_hw, shape[-1])), dtype)
  return x, grid, cot


@functools.partial(jax.jit, static_argnums=0, static_argnames=("padding_mode", "align_corners"))
def _vjp(sample, x, grid, cot, **kw):
  """(output, input gradient, grid gradient) of ``sample``: the fast or the plain sampler."""
  f = functools.partial(sample, **kw)
  out, pullback = jax.vjp(f, x, grid)
  return (out, *pullback(cot))


@pytest.mark.parametrize("channels", [1, 3, 64])
@pytest.mark.parametrize("padding_mode, align_corners",
                         [("zeros", False), ("zeros", True), ("border", False),
                          ("reflection", True)])
def test_gradients_equal_autodiff(channels, padding_mode, align_corners):
  x, grid, cot = _data((2, 5, 6, channels), (4, 7), seed=channels)
  ours = _vjp(grid_sample, x, grid, cot, padding_mode=padding_mode, align_corners=align_corners)
  ref = _vjp(PLAIN, x, grid, cot, padding_mode=padding_mode, align_corners=align_corners)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  assert np.abs(ours[2]).max() > 1.0  # the grid gradient is not trivially zero


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_per_image_indices_equal_batch_indices(monkeypatch, mode, channels):
  # Batches of BATCH_INDEX_PIXELS or more gather with (image, pixel) indices; lowering the
  # limit sends this small batch down that path, which must agree exactly.
  x, grid, cot = _data((3, 6, 7, channels), (5, 4), 11)

  def run():
    f = functools.partial(grid_sample, mode=mode, padding_mode="zeros")
    out, pullback = jax.vjp(f, x, grid)
    return (out, *pullback(cot))

  batch = run()
  monkeypatch.setattr(fast_sampler, "BATCH_INDEX_PIXELS", 3 * 6 * 7)
  per_image = run()
  monkeypatch.setattr(fast_sampler, "BATCH_INDEX_PIXELS", 3 * 6 * 7 + 1)
  assert all(np.array_equal(a, b) for a, b in zip(run(), batch))
  for a, b in zip(per_image, batch):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Each image reads its own pixels: the third image's samples move with its own input.
  assert np.abs(np.asarray(batch[0])[2]).max() > 0.1
  assert np.abs(np.asarray(batch[1])).max() > 0.1


def test_scatter_accumulates_colliding_taps():
  # Every output point of a 4x zoom into one pixel's neighbourhood lands on the same four
  # input pixels: the input gradient sums many contributions per pixel.
  x, _, cot = _data((1, 4, 4, 3), (8, 8), seed=7)
  theta = jnp.array([[[0.1, 0.0, 0.05], [0.0, 0.1, -0.05]]], jnp.float32)
  grid = affine_grid(theta, (1, 8, 8))
  ours = _vjp(grid_sample, x, grid, cot)
  ref = _vjp(PLAIN, x, grid, cot)
  np.testing.assert_allclose(ours[1], ref[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[2], ref[2], rtol=1e-5, atol=1e-5)
  # The input gradient's total is the cotangent's total: the weights of each point sum to 1.
  np.testing.assert_allclose(ours[1].sum(axis=(1, 2)), cot.sum(axis=(1, 2)), rtol=1e-5)


@pytest.mark.parametrize("padded, c", [(False, 5), (False, 3), (True, 1), (True, 2)])
@pytest.mark.parametrize("batch_indices", [True, False])
def test_cpu_rule_equals_the_autodiff_rule(batch_indices, padded, c):
  # Both rules of the custom VJP on the same inputs: the one other backends run is checked
  # here too, on CPU. Indices repeat (collisions) and weights include zeros. grid_sample
  # indexes the whole batch; per-image indices serve batches of 2**31 pixels and more.
  # padded: one index per point, its top-left tap in the zero-padded image (grid_sample's
  # layout for one channel on CPU); else one clipped index per tap.
  rng = np.random.default_rng(0)
  n, h, w, p = 2, 3, 4, 30
  x = rng.standard_normal((n, h, w, c)).astype(np.float32)
  if padded:
    rows_per_image = (h + 2) * (w + 2)
    # Top-left taps anywhere in [-1, H - 1] x [-1, W - 1], i.e. rows 0..H, columns 0..W of
    # the padded image: some taps fall on the ring.
    index = rng.integers(0, h + 1, (n, p)) * (w + 2) + rng.integers(0, w + 1, (n, p))
    taps = [index + offset for offset in (0, 1, w + 2, w + 3)]
    source = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(n, rows_per_image, c)
  else:
    rows_per_image = h * w
    taps = [rng.integers(0, h * w, (n, p)) for _ in range(4)]
    index = tuple(taps)
    source = x.reshape(n, h * w, c)
  weight = tuple((rng.uniform(0, 1, (n, p)) * (rng.uniform(size=(n, p)) > 0.2))
                 .astype(np.float32) for _ in range(4))
  g = rng.standard_normal((n, p, c)).astype(np.float32)
  # dweight by hand: sum_c source[n, tap] * g; dx by hand: a loop over the taps.
  hand_dweight = [np.einsum("npc,npc->np", source[np.arange(n)[:, None], tap], g)
                  for tap in taps]
  hand = np.zeros_like(source)
  for tap, wt in zip(taps, weight):
    for b in range(n):
      for j in range(p):
        hand[b, tap[b, j]] += wt[b, j] * g[b, j]
  if padded:
    hand_dx = hand.reshape(n, h + 2, w + 2, c)[:, 1:-1, 1:-1]
  else:
    hand_dx = hand.reshape(n, h, w, c)
  index = jax.tree.map(lambda i: jnp.asarray(i, jnp.int32), index)
  weight = tuple(jnp.asarray(wt) for wt in weight)
  g = jnp.asarray(g)
  if batch_indices:
    start = rows_per_image * jnp.arange(n, dtype=jnp.int32)[:, None]
    index = jax.tree.map(lambda i: (i + start).reshape(-1), index)
    weight = tuple(wt.reshape(-1) for wt in weight)
    g = g.reshape(n * p, c)
  args = (jnp.asarray(x), index, weight, g)
  cpu = jax.jit(functools.partial(bilinear.taps_vjp_cpu, padded=padded))(*args)
  auto = jax.jit(functools.partial(bilinear.taps_vjp_autodiff, padded=padded))(*args)
  for a, b in zip(jax.tree.leaves(cpu), jax.tree.leaves(auto)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cpu[0], hand_dx, rtol=1e-5, atol=1e-5)
  for ours, ref in zip(cpu[1], hand_dweight):
    np.testing.assert_allclose(ours.reshape(n, p), ref, rtol=1e-5, atol=1e-5)
  if padded:
    assert np.abs(hand[:, : w + 2]).max() > 0  # some taps did land on the ring


@pytest.mark.parametrize("platform, channels, scatters", [
    ("cpu", 1, 1), ("cpu", 3, 4), ("cuda", 1, 4), ("tpu", 1, 4)])
def test_one_scatter_for_one_channel_on_cpu_only(platform, channels, scatters):
  # One channel on CPU: the taps come from the zero-padded image and the input gradient is
  # one scatter of four values per point. Elsewhere (and with more channels) each tap has
  # its own index and scatter, as measured on GPUs. Lowering needs no such device.
  x, grid, cot = _data((2, 5, 6, channels), (4, 7), seed=17)
  vjp = lambda x, grid, cot: jax.vjp(grid_sample, x, grid)[1](cot)
  text = jax.jit(vjp).trace(x, grid, cot).lower(lowering_platforms=(platform,)).as_text()
  assert text.count('"stablehlo.scatter"') == scatters


@pytest.mark.parametrize("platform, channels, rows", [
    ("cpu", 3, "60x4"), ("cuda", 3, "60x3"), ("cpu", 2, "60x2"), ("cpu", 1, "60")])
def test_nearest_rgb_scatters_rows_of_four_on_cpu(platform, channels, rows):
  # Nearest sampling's input gradient is autodiff's scatter of the gathered rows; RGB on
  # CPU gathers (and so scatters) rows of four, the fourth zero. 2 x 5 x 6 = 60 pixels.
  x, grid, cot = _data((2, 5, 6, channels), (4, 7), seed=19)
  vjp = lambda x, cot: jax.vjp(lambda x: grid_sample(x, grid, mode="nearest"), x)[1](cot)
  text = jax.jit(vjp).trace(x, cot).lower(lowering_platforms=(platform,)).as_text()
  assert re.findall(r"stablehlo.scatter.*?\}\) : \((tensor<[^>]*>)", text, re.S) == [
      f"tensor<{rows}xf32>"]
  # And the gradient is the same: each sampled pixel gets the sum of its points' cotangents.
  dx = jax.jit(vjp)(x, cot)[0]
  hand = np.zeros(x.shape, np.float32)
  for i in range(2):
    ix = np.round(((np.asarray(grid[i, ..., 0]) + 1) * 6 - 1) / 2)
    iy = np.round(((np.asarray(grid[i, ..., 1]) + 1) * 5 - 1) / 2)
    points = np.stack([iy, ix], -1).reshape(-1, 2)
    for (yy, xx), value in zip(points, np.asarray(cot[i]).reshape(-1, channels)):
      if 0 <= xx <= 5 and 0 <= yy <= 4:
        hand[i, int(yy), int(xx)] += value
  np.testing.assert_allclose(dx, hand, rtol=1e-6, atol=1e-6)
  assert np.abs(hand).max() > 0.1


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_nearest_forward_mode_and_vmap(channels):
  # Nearest sampling is linear in x: its forward-mode derivative along t is the sampling
  # of t, and a vmap over images equals the batched call (RGB reads rows of four on CPU).
  x, grid, _ = _data((2, 6, 7, channels), (4, 5), seed=23)
  t = jnp.asarray(np.random.default_rng(29).standard_normal(x.shape), jnp.float32)
  sample = lambda x: grid_sample(x, grid, mode="nearest")
  y, y_dot = jax.jvp(sample, (x,), (t,))
  np.testing.assert_array_equal(y_dot, sample(t))
  one = lambda xi, gi: grid_sample(xi[None], gi[None], mode="nearest")[0]
  np.testing.assert_array_equal(jax.vmap(one)(x, grid), y)
  assert np.abs(np.asarray(y)).max() > 0.1


@pytest.mark.parametrize("channels", [1, 3])
def test_second_order_equals_autodiff(channels):
  x, grid, cot = _data((1, 4, 5, channels), (3, 4), seed=3)

  def penalty(sample, x, grid):
    # A gradient penalty: the gradients, differentiated again. The loss is not linear in
    # the samples, so the output gradient g itself depends on x and the grid.
    loss = lambda a, b: jnp.sum(jnp.sin(sample(a, b)) * cot)
    gx, gg = jax.grad(loss, argnums=(0, 1))(x, grid)
    return jnp.sum(gx ** 2) + jnp.sum(jnp.sin(gg))

  ours = jax.jit(jax.grad(functools.partial(penalty, grid_sample), argnums=(0, 1)))(x, grid)
  ref = jax.jit(jax.grad(functools.partial(penalty, PLAIN), argnums=(0, 1)))(x, grid)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert np.abs(ours[1]).max() > 0


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_vmap_of_the_gradient_equals_a_loop(channels):
  x, grid, cot = _data((3, 5, 5, channels), (4, 4), seed=5)
  grad = jax.grad(lambda a, b, c: jnp.sum(grid_sample(a[None], b[None]) * c[None]),
                  argnums=(0, 1))
  batched = jax.jit(jax.vmap(grad))(x, grid, cot)
  grad = jax.jit(grad)
  for i in range(3):
    one = grad(x[i], grid[i], cot[i])
    np.testing.assert_allclose(batched[0][i], one[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1][i], one[1], rtol=1e-5, atol=1e-6)


def test_forward_mode_needs_the_plain_sampler():
  x, grid, _ = _data((1, 4, 4, 2), (3, 3), seed=9)
  tangent = jnp.asarray(np.random.default_rng(1).standard_normal(grid.shape), jnp.float32)
  with pytest.raises(TypeError, match="forward|jvp"):
    jax.jvp(lambda g: grid_sample(x, g), (grid,), (tangent,))
  _, jvp = jax.jit(lambda g, t: jax.jvp(lambda u: PLAIN(x, u), (g,), (t,)))(grid, tangent)
  # J v from reverse mode (the fast sampler's custom gradient): the full Jacobian times v.
  jac = jax.jit(jax.jacrev(lambda g: grid_sample(x, g)))(grid)
  np.testing.assert_allclose(jvp, jnp.tensordot(jac, tangent, axes=4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3, 8])  # the three CPU paths
def test_bfloat16_gradient_follows_float32(channels):
  x, grid, cot = _data((2, 6, 6, channels), (5, 5), seed=11)
  ours = _vjp(grid_sample, x.astype(jnp.bfloat16), grid, cot.astype(jnp.bfloat16))
  ref = _vjp(PLAIN, x, grid, cot)
  assert ours[1].dtype == jnp.bfloat16 and ours[2].dtype == jnp.float32
  np.testing.assert_allclose(ours[1].astype(jnp.float32), ref[1], rtol=0.05, atol=0.05)
  np.testing.assert_allclose(ours[2], ref[2], rtol=0.05, atol=0.1)


def test_spatial_transformer_forward_mode():
  # jacfwd of the output with respect to the theta layer's bias (the affine transform): the
  # tangent runs through affine_grid and the sampler only.
  x, _, _ = _data((2, 18, 18, 1), (1, 1), seed=13)
  stn = SpatialTransformer(sampler=PLAIN)
  params = jax.jit(stn.init)(jax.random.PRNGKey(0), x)

  def out(module, bias):
    p = jax.tree_util.tree_map(lambda a: a, params)
    p["params"]["fc_theta"]["bias"] = bias
    return module.apply(p, x)

  bias = params["params"]["fc_theta"]["bias"]
  fwd = jax.jit(jax.jacfwd(functools.partial(out, stn)))(bias)
  assert SpatialTransformer().sampler is grid_sample  # the fast one, reverse mode only
  rev = jax.jit(jax.jacrev(functools.partial(out, SpatialTransformer())))(bias)
  assert fwd.shape == (2, 18, 18, 1, 6)
  np.testing.assert_allclose(fwd, rev, rtol=1e-5, atol=1e-5)
  assert np.abs(fwd).max() > 0.1
