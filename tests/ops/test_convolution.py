"""attention_flax.ops.convolution equals lax.conv_general_dilated; ops.compiler's CPU options."""

from __future__ import annotations

import functools
import re
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import linen as nn
from jax import lax

from attention_flax import ops
from attention_flax.ops import compiler, convolution as conv
from tests.conv_helpers import conv_loss, library_ops, random_pair

_loss, _random = conv_loss, random_pair


class ConvTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    # The test shapes are small: take the patch route for all of them (uses_patches).
    self.enter_context(mock.patch.object(conv, "MIN_PATCH_ROWS", 0))
    self.enter_context(mock.patch.object(conv, "MIN_PATCH_FLOPS", 0))

  @parameterized.parameters(
      # (N, H, W, C_in), (kh, kw, C_in, C_out), strides, padding
      ((4, 9, 9, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
      ((4, 9, 8, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1))),  # odd/even, stride 2
      ((3, 8, 8, 4), (1, 1, 4, 6), (1, 1), ((0, 0), (0, 0))),  # 1x1
      ((3, 8, 8, 4), (1, 1, 4, 6), (2, 2), ((0, 0), (0, 0))),  # strided 1x1 shortcut
      ((2, 7, 9, 3), (1, 1, 3, 5), (2, 3), "VALID"),  # strided 1x1, odd sizes
      ((2, 7, 9, 3), (1, 1, 3, 5), (3, 1), "SAME"),
      ((2, 15, 15, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),  # ResNet stem
      ((5, 7, 6, 2), (2, 3, 2, 3), (1, 2), ((0, 1), (2, 0))),  # asymmetric everything
      ((7, 6, 6, 2), (3, 3, 2, 2), (1, 1), "SAME"),  # prime batch: one image per chunk
      ((2, 6, 6, 2), (3, 3, 2, 2), (1, 1), "VALID"),
      ((2, 8, 8, 2), (3, 3, 2, 2), (1, 1), ((-1, 1), (1, -1))),  # negative padding crops
  )
  def test_value_and_gradients_equal_lax(self, x_shape, k_shape, strides, padding):
    x, k = _random(x_shape, k_shape)
    ours = jax.jit(jax.value_and_grad(
        functools.partial(_loss, conv.conv_general_dilated, strides=strides,
                          padding=padding), argnums=(0, 1)))
    theirs = jax.value_and_grad(
        functools.partial(_loss, lax.conv_general_dilated, strides=strides, padding=padding),
        argnums=(0, 1))
    (v1, (dx1, dk1)), (v2, (dx2, dk2)) = ours(x, k), theirs(x, k)
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-5)  # jit reorders the sum
    np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk1, dk2, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(dk2)).max() > 1e-2  # not a comparison of zeros

  def test_kernel_grad_by_patches_against_a_hand_sum(self):
    # dK[i, j, c, o] = sum over n, p, q of x_pad[n, p*s + i, q*s + j, c] * g[n, p, q, o].
    x, _ = _random((2, 5, 5, 2), (1,))
    g = jax.random.normal(jax.random.key(3), (2, 3, 3, 3))
    got = np.asarray(conv.kernel_grad_by_patches(x, g, (3, 3, 2, 3), (2, 2), ((1, 1), (1, 1))))
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((3, 3, 2, 3))
    for i in range(3):
      for j in range(3):
        window = xp[:, i:i + 5:2, j:j + 5:2, :]  # (2, 3, 3, 2)
        want[i, j] = np.einsum("npqc,npqo->co", window, np.asarray(g))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(
      # 2 MiB budget; a CIFAR 32x32 layer with 16 channels and a 3x3 kernel has a patch
      # matrix of 1024 x 144 floats (576 KiB) per image.
      (2, 1024, 144, 2),
      (128, 1024, 144, 2),  # 3 would fit, but does not divide 128
      (6, 1024, 144, 3),
      (7, 1024, 144, 1),  # prime batch: one image per step
      (128, 64, 576, 8),  # 8x8 maps, 64 channels: 144 KiB per image
      (4, 100000, 144, 1),  # one image alone is over budget: still one per step
  )
  def test_chunk_images(self, batch, rows, width, expected):
    assert conv.CHUNK_BYTES == 2 * 1024 * 1024
    assert conv.chunk_images(batch, rows, width, 4) == expected

  def test_bfloat16_gradients_close_to_float32(self):
    x, k = _random((4, 8, 8, 8), (3, 3, 8, 8))
    f32 = jax.grad(functools.partial(_loss, conv.conv_general_dilated, strides=(1, 1),
                                     padding="SAME"), argnums=1)(x, k)
    b16 = jax.grad(functools.partial(_loss, conv.conv_general_dilated, strides=(1, 1),
                                     padding="SAME"), argnums=1)(
        x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert b16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(b16, np.float32) - np.asarray(f32)).max()
    assert err < 0.05 * np.abs(np.asarray(f32)).max()

  @parameterized.named_parameters(
      ("dilated_kernel", dict(rhs_dilation=(2, 2))),
      ("dilated_input", dict(lhs_dilation=(2, 2))),
      ("grouped", dict(feature_group_count=2)),
  )
  def test_other_convolutions_pass_through_to_lax(self, kw):
    k_shape = (3, 3, 2, 4) if "feature_group_count" in kw else (3, 3, 4, 4)
    x, k = _random((2, 9, 9, 4), k_shape)
    pads = ((1, 1), (1, 1))  # lax refuses named padding with an input dilation
    ours = jax.grad(functools.partial(_loss, conv.conv_general_dilated, strides=(1, 1),
                                      padding=pads, **kw), argnums=(0, 1))(x, k)
    theirs = jax.grad(functools.partial(_loss, lax.conv_general_dilated, strides=(1, 1),
                                        padding=pads, **kw), argnums=(0, 1))(x, k)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-5)

  def test_nchw_passes_through(self):
    x, k = _random((2, 3, 8, 8), (4, 3, 3, 3))
    dn = ("NCHW", "OIHW", "NCHW")
    ours = jax.grad(functools.partial(_loss, conv.conv_general_dilated, strides=(1, 1),
                                      padding="SAME", dn=dn), argnums=(0, 1))(x, k)
    theirs = jax.grad(functools.partial(_loss, lax.conv_general_dilated, strides=(1, 1),
                                        padding="SAME", dn=dn), argnums=(0, 1))(x, k)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-5)

  def test_flax_conv_with_it_trains_like_flax_conv(self):
    x, _ = _random((3, 10, 10, 3), (1,))
    plain = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    fast = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                   conv_general_dilated=conv.conv_general_dilated)
    params = plain.init(jax.random.key(0), x)

    def loss(model, p):
      return jnp.sum(jnp.tanh(model.apply(p, x)) ** 2)

    g_plain = jax.grad(functools.partial(loss, plain))(params)
    g_fast = jax.jit(jax.grad(functools.partial(loss, fast)))(params)
    g_eager = jax.grad(functools.partial(loss, fast))(params)
    chex.assert_trees_all_close(g_plain, g_fast, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g_plain, g_eager, rtol=1e-5, atol=1e-6)
    # The bias gradient is flax's own; the kernel gradient went through the patches.
    assert np.abs(np.asarray(g_fast["params"]["kernel"])).max() > 1e-3

  @parameterized.parameters(
      ((3, 3, 2, 2), (1, 1), "SAME"),
      ((1, 1, 2, 3), (2, 2), "VALID"),  # strided 1x1: strided_1x1 on CPU
  )
  def test_vmap_and_second_order(self, k_shape, strides, padding):
    x, k = _random((2, 6, 6, 2), k_shape)
    f = lambda c: functools.partial(_loss, c, strides=strides, padding=padding)
    # Per-example kernel gradients under vmap.
    per_ours = jax.vmap(jax.grad(lambda x1, k: f(conv.conv_general_dilated)(x1[None], k),
                                 argnums=1), in_axes=(0, None))(x, k)
    per_lax = jax.vmap(jax.grad(lambda x1, k: f(lax.conv_general_dilated)(x1[None], k),
                                argnums=1), in_axes=(0, None))(x, k)
    np.testing.assert_allclose(per_ours, per_lax, rtol=1e-5, atol=1e-5)
    # Reverse-over-reverse: the gradient of a gradient norm.
    gg = lambda c: jax.grad(lambda k: jnp.sum(jax.grad(f(c), argnums=1)(x, k) ** 2))(k)
    np.testing.assert_allclose(gg(conv.conv_general_dilated), gg(lax.conv_general_dilated),
                               rtol=1e-4, atol=1e-5)


def _primitives(fn, *args):
  return {str(eqn.primitive) for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def _grad_primitives(x, k):
  grad = jax.grad(functools.partial(_loss, conv.conv_general_dilated, strides=(1, 1),
                                    padding="SAME"), argnums=1)
  return _primitives(grad, x, k)


def test_small_layers_keep_xla_kernel_gradient():
  # 2 x 8 x 8 = 128 output pixels: XLA's own gradient, no per-platform switch.
  assert not conv.uses_patches((2, 8, 8, 4), (3, 3, 4, 4))
  x, k = _random((2, 8, 8, 4), (3, 3, 4, 4))
  assert "platform_index" not in _grad_primitives(x, k)


def test_large_layers_take_the_patch_route():
  # CIFAR ResNet-20's first stage at batch 128: 131072 pixels, 604 MFLOP.
  assert conv.uses_patches((128, 32, 32, 16), (3, 3, 16, 16))
  # Long but cheap (1x1, 2 -> 2 channels), or expensive but short (7x7 maps): XLA's.
  assert not conv.uses_patches((128, 32, 32, 2), (1, 1, 2, 2))
  assert not conv.uses_patches((16, 7, 7, 512), (3, 3, 512, 512))
  x, k = _random((8, 32, 32, 32), (3, 3, 32, 32))  # 8192 pixels, 151 MFLOP
  assert conv.uses_patches((8, 32, 32, 32), k.shape)
  assert "platform_index" in _grad_primitives(x, k)


def test_kernel_grad_1x1_against_a_hand_sum():
  x, _ = _random((2, 5, 4, 3), (1,))
  g = jax.random.normal(jax.random.key(4), (2, 3, 2, 6))
  got = np.asarray(conv.kernel_grad_1x1(x, g, (2, 2)))
  want = np.einsum("npqc,npqo->co", np.asarray(x)[:, ::2, ::2, :], np.asarray(g))
  assert got.shape == (1, 1, 3, 6)
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-5, atol=1e-5)


def _opcodes(fn, *args):
  return set(re.findall(r"= \S+ ([\w-]+)\(", jax.jit(fn).lower(*args).compile().as_text()))


def test_1x1_kernel_gradient_is_one_product_at_any_size():
  # Even below the patch route's thresholds: XLA's own gradient transposes the input to
  # (C, H, W, N) for a convolution; the product reads it as it is.
  x, k = _random((2, 8, 8, 4), (1, 1, 4, 6))
  assert not conv.uses_patches((2, 4, 4, 6), k.shape)

  def kernel_grad(conv_fn):
    return jax.grad(functools.partial(_loss, conv_fn, strides=(2, 2), padding="VALID"),
                    argnums=1)

  ours, theirs = (_opcodes(kernel_grad(f), x, k)
                  for f in (conv.conv_general_dilated, lax.conv_general_dilated))
  assert "dot" in ours and "transpose" not in ours
  assert "transpose" in theirs  # the route it replaces, so that this can fail
  np.testing.assert_allclose(jax.jit(kernel_grad(conv.conv_general_dilated))(x, k),
                             kernel_grad(lax.conv_general_dilated)(x, k), rtol=1e-5, atol=1e-5)


def test_strided_1x1_against_a_hand_sum():
  x, k = _random((2, 7, 6, 3), (1, 1, 3, 4))
  want = np.einsum("npqc,co->npqo", np.asarray(x)[:, ::2, ::3, :], np.asarray(k)[0, 0])
  got = conv.strided_1x1(x, k, (2, 3))
  assert got.shape == (2, 4, 2, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  half = conv.strided_1x1(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), (2, 3))
  assert half.dtype == jnp.bfloat16  # as lax's convolution returns
  np.testing.assert_allclose(np.asarray(half, np.float32), want, rtol=0.05, atol=0.05)


def test_strided_1x1_layer_trains_without_convolutions():
  # ResNet-50's downsampling shortcut: forward and both gradients are matrix products on
  # CPU; lax's route is a strided convolution and an input-dilated one.
  x, k = _random((2, 14, 14, 8), (1, 1, 8, 16))

  def grads(conv_fn):
    return jax.value_and_grad(functools.partial(_loss, conv_fn, strides=(2, 2),
                                                padding="VALID"), argnums=(0, 1))

  ours, theirs = (_opcodes(grads(f), x, k)
                  for f in (conv.conv_general_dilated, lax.conv_general_dilated))
  assert "dot" in ours and "convolution" not in ours
  assert "convolution" in theirs  # the route it replaces, so that this can fail
  chex.assert_trees_all_close(jax.jit(grads(conv.conv_general_dilated))(x, k),
                              grads(lax.conv_general_dilated)(x, k), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- CPU compiler options


def _conv_and_grads(x, k):
  return jax.value_and_grad(
      functools.partial(_loss, lax.conv_general_dilated, strides=(1, 1), padding="SAME"),
      argnums=(0, 1))(x, k)


def test_cpu_compiler_options_move_convolutions_out_of_the_library():
  # jaxlib 0.10's XLA:CPU gives convolutions with 32 channels to YNNPACK by default; with
  # the options XLA's own kernels run them, and the library keeps the reductions.
  options = compiler.cpu_compiler_options()
  assert options == compiler.CPU_COMPILER_OPTIONS
  x, k = _random((4, 8, 8, 32), (3, 3, 32, 32))
  default = jax.jit(_conv_and_grads).lower(x, k).compile()
  ours = jax.jit(_conv_and_grads, compiler_options=options).lower(x, k).compile()
  assert "convolution" in library_ops(default.as_text())
  assert "convolution" not in library_ops(ours.as_text())
  assert "reduce" in library_ops(ours.as_text())
  (v1, g1), (v2, g2) = default(x, k), ours(x, k)
  np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-5)
  # Sums of 2,048 terms of size ~1 in another order: gradients up to ~40 agree to ~2e-4.
  chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-3)
  assert np.abs(np.asarray(g2[1])).max() > 1


def test_cpu_compiler_options_yield_to_xla_flags_and_to_old_jaxlibs(monkeypatch):
  options = compiler.cpu_compiler_options()
  options.clear()  # A copy: the module's options are untouched.
  assert compiler.cpu_compiler_options() == compiler.CPU_COMPILER_OPTIONS
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=reduce")
  assert compiler.cpu_compiler_options() == {}
  monkeypatch.delenv("XLA_FLAGS")
  # A jaxlib that rejects the values (here: one that does not exist) gets no options.
  monkeypatch.setattr(compiler, "CPU_COMPILER_OPTIONS",
                      {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NONE"})
  compiler._cpu_options_accepted.cache_clear()
  try:
    assert compiler.cpu_compiler_options() == {}
  finally:
    compiler._cpu_options_accepted.cache_clear()


def test_compiler_options_are_the_cpu_options_on_cpu_only():
  assert ops.compiler_options("cpu") == compiler.cpu_compiler_options()
  assert ops.compiler_options() == compiler.cpu_compiler_options()  # the tests run on CPU
  assert ops.compiler_options("cuda") == {} and ops.compiler_options("tpu") == {}
