"""attention_flax.ops.banded: few-channel convolutions as a banded product, equal to lax's."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from attention_flax import ops
from attention_flax.layers.hybrid import CBAM
from attention_flax.layers.spatial import SpatialAttention
from attention_flax.ops import backends
from attention_flax.ops.banded import (band_matrix, banded_conv, banded_conv_general_dilated,
                                       uses_band)
from tests.conv_helpers import NHWC, conv_loss, random_pair

_loss, _random = conv_loss, random_pair


def _primitives(fn, *args):
  return {str(eqn.primitive) for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


@pytest.mark.parametrize("x_shape, k_shape, padding", [
    # (N, H, W, C_in), (kh, kw, C_in, C_out), padding
    ((3, 10, 9, 2), (7, 7, 2, 1), ((3, 3), (3, 3))),  # CBAM's spatial gate
    ((2, 6, 7, 3), (5, 3, 3, 1), "SAME"),
    ((2, 8, 8, 2), (3, 3, 2, 1), "VALID"),
    ((2, 5, 6, 1), (3, 2, 1, 1), ((0, 2), (1, 0))),  # asymmetric, even kernel width
    ((1, 1, 5, 2), (3, 3, 2, 1), ((1, 1), (1, 1))),  # one row: two shifts are padding
    ((2, 7, 1, 2), (3, 3, 2, 1), ((1, 1), (1, 1))),  # one column: the band is all padding
    ((2, 12, 5, 2), (1, 5, 2, 1), ((0, 0), (2, 2))),  # one kernel row: no row shifts
])
def test_value_and_gradients_equal_lax(x_shape, k_shape, padding):
  x, k = _random(x_shape, k_shape)
  assert uses_band(x_shape, k_shape)
  ours = functools.partial(_loss, banded_conv_general_dilated, strides=(1, 1),
                           padding=padding)
  theirs = functools.partial(_loss, lax.conv_general_dilated, strides=(1, 1),
                             padding=padding)
  assert "platform_index" in _primitives(ours, x, k)  # the banded route was taken
  (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, k)
                        for f in (ours, theirs))
  np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-5)
  for ours_g, lax_g in zip(g1, g2):
    # Sums of up to 100 float32 products in another order: within a few ulps of the
    # largest entry (both are about 1e-6 of it from the float64 value).
    scale = float(np.abs(np.asarray(lax_g)).max())
    np.testing.assert_allclose(ours_g, lax_g, rtol=1e-5, atol=4e-6 * max(scale, 1.0))
  assert min(np.abs(np.asarray(g)).max() for g in g2) > 1e-2  # not a comparison of zeros


@pytest.mark.parametrize("x_shape, k_shape, pads", [
    ((2, 6, 7, 3), (5, 3, 3, 2), ((2, 2), (1, 1))),
    ((2, 5, 6, 1), (3, 2, 1, 3), ((0, 2), (1, 0))),
])
def test_several_output_channels_equal_lax(x_shape, k_shape, pads):
  # The dispatch keeps XLA's convolution for them (slower banded), but the product is
  # exact for any number of outputs.
  x, k = _random(x_shape, k_shape)
  assert not uses_band(x_shape, k_shape)
  ours = lambda x, k: jnp.sum(jnp.sin(banded_conv(x, k, pads)))
  theirs = lambda x, k: jnp.sum(jnp.sin(lax.conv_general_dilated(x, k, (1, 1), pads,
                                                                 dimension_numbers=NHWC)))
  chex.assert_trees_all_close(jax.value_and_grad(ours, argnums=(0, 1))(x, k),
                              jax.value_and_grad(theirs, argnums=(0, 1))(x, k),
                              rtol=1e-5, atol=1e-5)


def test_band_matrix_by_hand():
  # One kernel row (1, 2, 3) slid along a 4-column padded row to 2 outputs: column x of
  # T holds the kernel from row z = x on.
  kernel = jnp.asarray([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
  t = np.asarray(band_matrix(kernel, 2))[0, :, 0, :, 0]
  np.testing.assert_array_equal(t, [[1, 0], [2, 1], [3, 2], [0, 3]])
  # Kernel rows stay apart (T's first axis), input and output channels in place.
  kernel = jnp.arange(2 * 2 * 3 * 2, dtype=jnp.float32).reshape(2, 2, 3, 2)
  t = np.asarray(band_matrix(kernel, 3))
  assert t.shape == (2, 4, 3, 3, 2)
  for dy, z, c, x, o in np.ndindex(t.shape):
    want = kernel[dy, z - x, c, o] if 0 <= z - x < 2 else 0.0
    assert t[dy, z, c, x, o] == want


def test_forward_mode_and_second_order_equal_lax():
  x, k = _random((2, 6, 6, 2), (7, 7, 2, 1))
  pads = ((3, 3), (3, 3))
  f = lambda c: functools.partial(_loss, c, strides=(1, 1), padding=pads)
  tx, tk = _random(x.shape, k.shape, seed=1)
  ours = jax.jvp(f(banded_conv_general_dilated), (x, k), (tx, tk))
  theirs = jax.jvp(f(lax.conv_general_dilated), (x, k), (tx, tk))
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-5)
  gg = lambda c: jax.grad(lambda k: jnp.sum(jax.grad(f(c), argnums=0)(x, k) ** 2))(k)
  want = np.asarray(gg(lax.conv_general_dilated))  # entries up to about 300
  # Both float32 results are 5e-4 from the float64 value; in float64 they agree to 1e-12.
  np.testing.assert_allclose(gg(banded_conv_general_dilated), want, rtol=1e-4,
                             atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("x_shape, k_shape, strides, padding, kw", [
    ((2, 8, 8, 2), (7, 7, 2, 1), (2, 2), ((3, 3), (3, 3)), {}),  # strided
    ((2, 8, 8, 2), (3, 3, 2, 1), (1, 1), ((2, 2), (2, 2)), {"rhs_dilation": (2, 2)}),
    ((2, 8, 8, 16), (3, 3, 16, 1), (1, 1), "SAME", {}),  # 48 taps per row: wide input
    ((2, 8, 8, 2), (3, 3, 2, 16), (1, 1), "SAME", {}),  # many outputs
    ((2, 8, 8, 2), (7, 7, 2, 2), (1, 1), "SAME", {}),  # two outputs: XLA caught up
    ((2, 8, 8, 2), (1, 1, 2, 1), (1, 1), "VALID", {}),  # 1 x 1: nothing to band
    ((1, 3, 260, 2), (3, 3, 2, 1), (1, 1), "SAME", {}),  # wider than MAX_BANDED_WIDTH
    ((2, 8, 8, 2), (3, 1, 2, 1), (1, 1), "SAME", {}),  # one kernel column: nothing to band
    ((2, 8, 8, 2), (3, 3, 2, 1), (1, 1), ((-1, 1), (1, 1)), {}),  # negative padding crops
    ((2, 2, 8, 8), (1, 2, 3, 3), (1, 1), "SAME", {"dn": ("NCHW", "OIHW", "NCHW")}),
])
def test_other_convolutions_pass_through_to_lax(x_shape, k_shape, strides, padding, kw):
  x, k = _random(x_shape, k_shape)
  ours = functools.partial(_loss, banded_conv_general_dilated, strides=strides,
                           padding=padding, **dict(kw))
  theirs = functools.partial(_loss, lax.conv_general_dilated, strides=strides,
                             padding=padding, **dict(kw))
  assert "platform_index" not in _primitives(ours, x, k)
  chex.assert_trees_all_equal(jax.grad(ours, argnums=(0, 1))(x, k),
                              jax.grad(theirs, argnums=(0, 1))(x, k))


def test_bfloat16_keeps_its_dtype_and_is_close_to_float32():
  x, k = _random((2, 9, 9, 2), (7, 7, 2, 1))
  pads = ((3, 3), (3, 3))
  f32 = banded_conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=NHWC)
  b16 = banded_conv_general_dilated(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                         (1, 1), pads, dimension_numbers=NHWC)
  assert b16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(b16, np.float32) - np.asarray(f32)).max()
  assert err < 0.05 * np.abs(np.asarray(f32)).max()


def test_cbam_spatial_gate_takes_the_banded_route():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
  module = SpatialAttention()  # (max, mean) pooled maps, 7x7 convolution, no BN
  variables = module.init(jax.random.key(1), x)
  assert "platform_index" in str(jax.make_jaxpr(module.apply)(variables, x))
  # And its mask is the one a lax convolution gives.
  pooled = jnp.concatenate([jnp.max(x, -1, keepdims=True), jnp.mean(x, -1, keepdims=True)],
                           -1)
  logits = lax.conv_general_dilated(pooled, variables["params"]["conv"]["kernel"], (1, 1),
                                    ((3, 3), (3, 3)), dimension_numbers=NHWC)
  _, state = module.apply(variables, x, mutable=["intermediates"])
  mask = state["intermediates"]["spatial_mask"][0]
  np.testing.assert_allclose(mask, jax.nn.sigmoid(logits), rtol=1e-5, atol=1e-6)


def _lowered_ops(fn, platform, *args):
  """The StableHLO text of ``jit(fn)`` lowered for ``platform``; no such device needed."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform, banded", [
    ("cpu", True), ("cuda", True), ("rocm", False), ("tpu", False)])
def test_band_is_lowered_for_cpu_and_cuda_only(platform, banded):
  assert backends.FAST_PATHS["banded_conv"] == ("cpu", "cuda")
  # On an H200 the product made CBAM-ResNet-50's bf16 steps 1.05x faster than cuDNN's
  # convolution; ROCm and TPU are unmeasured and keep XLA's.
  x, k = _random((2, 8, 8, 2), (7, 7, 2, 1))
  loss = functools.partial(_loss, banded_conv_general_dilated, strides=(1, 1),
                           padding=((3, 3), (3, 3)))
  text = _lowered_ops(jax.grad(loss, argnums=(0, 1)), platform, x, k)
  assert ("stablehlo.convolution" in text) != banded
  assert ("stablehlo.dot_general" in text) == banded


def test_cbam_spatial_gate_on_cuda_has_no_convolution():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 6), jnp.bfloat16)
  module = SpatialAttention(dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(1), x)
  loss = lambda v, x: jnp.sum(module.apply(v, x).astype(jnp.float32) ** 2)
  text = _lowered_ops(jax.grad(loss, argnums=(0, 1)), "cuda", variables, x)
  assert "stablehlo.convolution" not in text
  assert "stablehlo.dot_general" in text


@pytest.mark.parametrize("fast_paths, platform, banded", [
    # None: everywhere=True, the band on every backend without consulting the table.
    (None, "tpu", True), (None, "cpu", True),
    # Otherwise the table's entry for the path, patched: () never bands.
    ((), "cpu", False), (("tpu",), "tpu", True), (("tpu",), "cpu", False)])
def test_fast_paths_and_everywhere_choose_the_backends(monkeypatch, fast_paths, platform,
                                                       banded):
  x, k = _random((2, 8, 8, 2), (7, 7, 2, 1))
  if fast_paths is None:
    conv_fn = functools.partial(banded_conv_general_dilated, everywhere=True)
  else:
    monkeypatch.setitem(backends.FAST_PATHS, "banded_conv", fast_paths)
    conv_fn = banded_conv_general_dilated
  loss = functools.partial(_loss, conv_fn, strides=(1, 1), padding=((3, 3), (3, 3)))
  assert ("platform_index" in _primitives(loss, x, k)) == bool(fast_paths)
  text = _lowered_ops(jax.grad(loss, argnums=(0, 1)), platform, x, k)
  assert ("stablehlo.convolution" in text) != banded
  want = jax.grad(functools.partial(_loss, lax.conv_general_dilated, strides=(1, 1),
                                    padding=((3, 3), (3, 3))), argnums=(0, 1))(x, k)
  got = jax.grad(loss, argnums=(0, 1))(x, k)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=4e-6 * float(np.abs(w).max()))


# The spatial gate's ``conv`` factories: the default (banded where FAST_PATHS says), the band
# on every backend, and Flax's own convolution.
CONVS = {
    "default": ops.spatial_conv,
    "band": functools.partial(nn.Conv, conv_general_dilated=functools.partial(
        banded_conv_general_dilated, everywhere=True)),
    "xla": nn.Conv,
}


@pytest.mark.parametrize("layer", ["spatial", "cbam"])
@pytest.mark.parametrize("impl, platform, banded", [
    ("default", "cuda", True), ("default", "tpu", False), ("band", "tpu", True),
    ("xla", "cpu", False), ("xla", "cuda", False)])
def test_conv_factory_of_the_spatial_gate(layer, impl, platform, banded):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  make = SpatialAttention if layer == "spatial" else CBAM
  module = make(conv=CONVS[impl])
  variables = module.init(jax.random.key(1), x)
  loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  text = _lowered_ops(jax.grad(loss, argnums=(0, 1)), platform, variables, x)
  assert ("stablehlo.convolution" in text) != banded
  # Every choice gives the mask and gradients of the default, up to float rounding.
  reference = make()
  chex.assert_trees_all_close(jax.grad(loss, argnums=(0, 1))(variables, x),
                              jax.grad(lambda v, x: jnp.sum(jnp.sin(reference.apply(v, x))),
                                       argnums=(0, 1))(variables, x), rtol=1e-5, atol=1e-6)
