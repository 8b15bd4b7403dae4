"""grid_sample's custom gradient against JAX's own autodiff of the same sampler.

The default bilinear sampler carries a ``jax.custom_vjp`` whose CPU rule is hand-written
(``_taps_vjp_cpu``); ``forward_mode=True`` is the plain formula differentiated by JAX. The
two must give the same gradients, second derivatives and batched gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax.layers import transformer
from attention_flax.layers.transformer import SpatialTransformer, affine_grid, grid_sample


def _data(shape, out_hw, seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  n = shape[0]
  x = jnp.asarray(rng.standard_normal(shape), dtype)
  # Points inside, across the border and far outside, away from pixel centres.
  grid = jnp.asarray(rng.uniform(-1.4, 1.4, (n, *out_hw, 2)), dtype)
  cot = jnp.asarray(rng.standard_normal((n, *out_hw, shape[-1])), dtype)
  return x, grid, cot


@functools.partial(jax.jit, static_argnums=0, static_argnames=("padding_mode", "align_corners"))
def _vjp(forward_mode, x, grid, cot, **kw):
  f = functools.partial(grid_sample, forward_mode=forward_mode, **kw)
  out, pullback = jax.vjp(f, x, grid)
  return (out, *pullback(cot))


@pytest.mark.parametrize("channels", [1, 3, 64])
@pytest.mark.parametrize("padding_mode, align_corners",
                         [("zeros", False), ("zeros", True), ("border", False),
                          ("reflection", True)])
def test_gradients_equal_autodiff(channels, padding_mode, align_corners):
  x, grid, cot = _data((2, 5, 6, channels), (4, 7), seed=channels)
  ours = _vjp(False, x, grid, cot, padding_mode=padding_mode, align_corners=align_corners)
  ref = _vjp(True, x, grid, cot, padding_mode=padding_mode, align_corners=align_corners)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  assert np.abs(ours[2]).max() > 1.0  # the grid gradient is not trivially zero


def test_scatter_accumulates_colliding_taps():
  # Every output point of a 4x zoom into one pixel's neighbourhood lands on the same four
  # input pixels: the input gradient sums many contributions per pixel.
  x, _, cot = _data((1, 4, 4, 3), (8, 8), seed=7)
  theta = jnp.array([[[0.1, 0.0, 0.05], [0.0, 0.1, -0.05]]], jnp.float32)
  grid = affine_grid(theta, (1, 8, 8))
  ours = _vjp(False, x, grid, cot)
  ref = _vjp(True, x, grid, cot)
  np.testing.assert_allclose(ours[1], ref[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[2], ref[2], rtol=1e-5, atol=1e-5)
  # The input gradient's total is the cotangent's total: the weights of each point sum to 1.
  np.testing.assert_allclose(ours[1].sum(axis=(1, 2)), cot.sum(axis=(1, 2)), rtol=1e-5)


@pytest.mark.parametrize("batch_indices", [True, False])
def test_cpu_rule_equals_the_autodiff_rule(batch_indices):
  # Both rules of the custom VJP on the same inputs: the one other backends run is checked
  # here too, on CPU. Indices repeat (collisions) and weights include zeros. grid_sample
  # indexes the whole batch; per-image indices serve batches of 2**31 pixels and more.
  rng = np.random.default_rng(0)
  n, hw, p, c = 2, 12, 30, 5
  flat = jnp.asarray(rng.standard_normal((n, hw, c)), jnp.float32)
  index = jnp.asarray(rng.integers(0, hw, (4, n, p)), jnp.int32)
  weight = jnp.asarray(rng.uniform(0, 1, (4, n, p)) * (rng.uniform(size=(4, n, p)) > 0.2),
                       jnp.float32)
  g = jnp.asarray(rng.standard_normal((n, p, c)), jnp.float32)
  # dweight by hand: sum_c flat[n, index] * g; dflat by hand: a loop over the taps.
  hand_dweight = np.einsum("knpc,npc->knp",
                           np.asarray(flat)[np.arange(n)[None, :, None], index], g)
  hand_dflat = np.zeros((n, hw, c), np.float32)
  for k in range(4):
    for b in range(n):
      for j in range(p):
        hand_dflat[b, index[k, b, j]] += weight[k, b, j] * g[b, j]
  args = (flat, index, weight, g)
  if batch_indices:
    args = (flat.reshape(n * hw, c), (index + hw * jnp.arange(n)[:, None]).reshape(4, -1),
            weight.reshape(4, -1), g.reshape(n * p, c))
  cpu = jax.jit(transformer._taps_vjp_cpu)(*args)
  auto = jax.jit(transformer._taps_vjp_autodiff)(*args)
  for a, b in zip(cpu, auto):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cpu[0].reshape(n, hw, c), hand_dflat, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cpu[1].reshape(4, n, p), hand_dweight, rtol=1e-5, atol=1e-5)


def test_second_order_equals_autodiff():
  x, grid, cot = _data((1, 4, 5, 3), (3, 4), seed=3)

  def penalty(forward_mode, x, grid):
    # A gradient penalty: the gradients, differentiated again. The loss is not linear in
    # the samples, so the output gradient g itself depends on x and the grid.
    loss = lambda a, b: jnp.sum(jnp.sin(grid_sample(a, b, forward_mode=forward_mode)) * cot)
    gx, gg = jax.grad(loss, argnums=(0, 1))(x, grid)
    return jnp.sum(gx ** 2) + jnp.sum(jnp.sin(gg))

  ours = jax.jit(jax.grad(functools.partial(penalty, False), argnums=(0, 1)))(x, grid)
  ref = jax.jit(jax.grad(functools.partial(penalty, True), argnums=(0, 1)))(x, grid)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert np.abs(ours[1]).max() > 0


def test_vmap_of_the_gradient_equals_a_loop():
  x, grid, cot = _data((3, 5, 5, 4), (4, 4), seed=5)
  grad = jax.grad(lambda a, b, c: jnp.sum(grid_sample(a[None], b[None]) * c[None]),
                  argnums=(0, 1))
  batched = jax.jit(jax.vmap(grad))(x, grid, cot)
  grad = jax.jit(grad)
  for i in range(3):
    one = grad(x[i], grid[i], cot[i])
    np.testing.assert_allclose(batched[0][i], one[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1][i], one[1], rtol=1e-5, atol=1e-6)


def test_forward_mode_needs_the_flag():
  x, grid, _ = _data((1, 4, 4, 2), (3, 3), seed=9)
  tangent = jnp.asarray(np.random.default_rng(1).standard_normal(grid.shape), jnp.float32)
  with pytest.raises(TypeError, match="forward|jvp"):
    jax.jvp(lambda g: grid_sample(x, g), (grid,), (tangent,))
  _, jvp = jax.jit(lambda g, t: jax.jvp(lambda u: grid_sample(x, u, forward_mode=True),
                                        (g,), (t,)))(grid, tangent)
  # J v from reverse mode (the default, custom gradient): the full Jacobian times v.
  jac = jax.jit(jax.jacrev(lambda g: grid_sample(x, g)))(grid)
  np.testing.assert_allclose(jvp, jnp.tensordot(jac, tangent, axes=4), rtol=1e-5, atol=1e-5)


def test_bfloat16_gradient_follows_float32():
  x, grid, cot = _data((2, 6, 6, 8), (5, 5), seed=11)
  ours = _vjp(False, x.astype(jnp.bfloat16), grid, cot.astype(jnp.bfloat16))
  ref = _vjp(True, x, grid, cot)
  assert ours[1].dtype == jnp.bfloat16 and ours[2].dtype == jnp.float32
  np.testing.assert_allclose(ours[1].astype(jnp.float32), ref[1], rtol=0.05, atol=0.05)
  np.testing.assert_allclose(ours[2], ref[2], rtol=0.05, atol=0.1)


def test_spatial_transformer_forward_mode():
  # jacfwd of the output with respect to the theta layer's bias (the affine transform): the
  # tangent runs through affine_grid and the sampler only.
  x, _, _ = _data((2, 18, 18, 1), (1, 1), seed=13)
  stn = SpatialTransformer(forward_mode=True)
  params = jax.jit(stn.init)(jax.random.PRNGKey(0), x)

  def out(module, bias):
    p = jax.tree_util.tree_map(lambda a: a, params)
    p["params"]["fc_theta"]["bias"] = bias
    return module.apply(p, x)

  bias = params["params"]["fc_theta"]["bias"]
  fwd = jax.jit(jax.jacfwd(functools.partial(out, stn)))(bias)
  rev = jax.jit(jax.jacrev(functools.partial(out, SpatialTransformer())))(bias)
  assert fwd.shape == (2, 18, 18, 1, 6)
  np.testing.assert_allclose(fwd, rev, rtol=1e-5, atol=1e-5)
  assert np.abs(fwd).max() > 0.1
