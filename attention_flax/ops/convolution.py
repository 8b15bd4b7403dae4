"""2-D convolution whose kernel gradient is a matrix product on CPU.

:func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` (the
``conv_general_dilated`` field of ``flax.linen.Conv``). On CPU the gradient with respect to
the kernel is ``P^T G`` (P the patch matrix of the input, G the output gradient),
computed a few images at a time in a ``lax.scan``; an unpadded 1 x 1 kernel needs no
patches, and a strided one runs forward as one product of the strided pixels. Other
backends keep XLA's gradient. The rule is a ``jax.custom_vjp``: reverse mode and ``vmap``
work, forward mode does not (use a plain ``nn.Conv`` for ``jax.jvp``).
Measurements: docs/benchmarks.md.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from attention_flax.ops.backends import route

Array = jax.Array

_NHWC = ("NHWC", "HWIO", "NHWC")
# Bytes of patch matrix per scan step: large enough for an efficient matrix product, small
# enough to stay in a core's cache (docs/benchmarks.md, "Facts moved from code comments").
CHUNK_BYTES = 2 << 20
# XLA's own kernel gradient is only slow for long contractions: small layers keep it,
# which also compiles faster (docs/benchmarks.md, "Facts moved from code comments").
MIN_PATCH_ROWS = 2048
MIN_PATCH_FLOPS = 1e8


def _is_nhwc_2d(lhs: Array, rhs: Array, dimension_numbers: Any) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  wanted = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  if dimension_numbers is None:
    return False  # lax's default is NCHW / OIHW
  given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return given == wanted


def _pairs(padding: Any, lhs: Array, rhs: Array, strides: Sequence[int]):
  if isinstance(padding, str):
    return tuple(tuple(p) for p in lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2],
                                                       strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> Array:
  """``lax.conv_general_dilated`` with the CPU-friendly kernel gradient (module docstring).

  Same arguments and result as ``lax.conv_general_dilated``. The fast path takes a 2-D
  convolution of an (N, H, W, C_in) input with an (kh, kw, C_in, C_out) kernel, any
  strides and explicit or named padding, no dilation, one group; everything else is passed
  through to lax.
  """
  plain = (
      not _is_nhwc_2d(lhs, rhs, dimension_numbers)
      or feature_group_count != 1 or batch_group_count != 1
      or any(d != 1 for d in (lhs_dilation or (1, 1)))
      or any(d != 1 for d in (rhs_dilation or (1, 1)))
      or preferred_element_type is not None
      or lhs.dtype != rhs.dtype)
  if plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  pads = _pairs(padding, lhs, rhs, strides)
  if _is_pointwise(rhs.shape, pads) and strides != (1, 1):
    return route("strided_1x1", functools.partial(strided_1x1, strides=strides,
                                                  precision=precision),
                 lambda x, k: _conv(x, k, strides, pads, precision), lhs, rhs)
  return _conv(lhs, rhs, strides, pads, precision)


def _lax_conv(x: Array, k: Array, strides, pads, precision) -> Array:
  return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, k: Array, strides, pads, precision) -> Array:
  return _lax_conv(x, k, strides, pads, precision)


def _conv_fwd(x, k, strides, pads, precision):
  return _lax_conv(x, k, strides, pads, precision), (x, k)


def uses_patches(output_shape: Sequence[int], kernel_shape: Sequence[int]) -> bool:
  """Whether the kernel gradient of a convolution with this (N, H_out, W_out, C_out)
  output and (kh, kw, C_in, C_out) kernel is computed from patches on CPU (unless it is
  an unpadded 1 x 1 kernel: :func:`kernel_grad_route`)."""
  rows = int(np.prod(output_shape[:3]))
  flops = 2.0 * rows * float(np.prod(kernel_shape))
  return rows >= MIN_PATCH_ROWS and flops >= MIN_PATCH_FLOPS


def _is_pointwise(kernel_shape: Sequence[int], pads: Sequence[tuple[int, int]]) -> bool:
  return tuple(kernel_shape[:2]) == (1, 1) and all(tuple(p) == (0, 0) for p in pads)


def kernel_grad_route(output_shape: Sequence[int], kernel_shape: Sequence[int],
                      pads: Sequence[tuple[int, int]]) -> str:
  """How :func:`conv_general_dilated` computes a kernel gradient on CPU: ``"1x1"`` (an
  unpadded 1 x 1 kernel, any size: :func:`kernel_grad_1x1`, or with strides the
  derivative of :func:`strided_1x1`, the same product), ``"patches"``
  (:func:`uses_patches`: :func:`kernel_grad_by_patches`) or ``"xla"`` (XLA's own)."""
  if _is_pointwise(kernel_shape, pads):
    return "1x1"
  return "patches" if uses_patches(output_shape, kernel_shape) else "xla"


def _conv_bwd(strides, pads, precision, residuals, g):
  x, k = residuals
  _, input_vjp = jax.vjp(lambda x: _lax_conv(x, k, strides, pads, precision), x)
  (dx,) = input_vjp(g)

  def xla_kernel_grad(x, k, g):
    _, kernel_vjp = jax.vjp(lambda k: _lax_conv(x, k, strides, pads, precision), k)
    return kernel_vjp(g)[0]

  def patch_kernel_grad(x, k, g):
    return kernel_grad_by_patches(x, g, k.shape, strides, pads, precision)

  def pointwise_kernel_grad(x, k, g):
    return kernel_grad_1x1(x, g, strides, precision)

  how = kernel_grad_route(g.shape, k.shape, pads)
  if how == "xla":
    return dx, xla_kernel_grad(x, k, g)
  cpu_kernel_grad = pointwise_kernel_grad if how == "1x1" else patch_kernel_grad
  dk = route("conv_kernel_grad", cpu_kernel_grad, xla_kernel_grad, x, k, g)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def window_taps(xp: Array, window: Sequence[int], strides: Sequence[int],
                out_hw: Sequence[int]) -> list[Array]:
  """For each window tap (dy, dx) in row-major order, the (N, H_out, W_out, C) strided
  slice of the (already padded) NHWC ``xp`` that the tap sees in every window."""
  (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
  n, _, _, c = xp.shape
  return [lax.slice(xp, (0, dy, dx, 0), (n, dy + sh * (ho - 1) + 1, dx + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1))
          for dy in range(kh) for dx in range(kw)]


def kernel_grad_1x1(x: Array, g: Array, strides: Sequence[int],
                    precision: Any = None) -> Array:
  """dL/dK of an unpadded 1 x 1 NHWC convolution: one matrix product over every pixel.

  dK[0, 0, c, o] = sum over (n, p, q) of x[n, p * sh, q * sw, c] * g[n, p, q, o], with
  x (N, H, W, C_in), g (N, H_out, W_out, C_out); accumulated in float32, returned in x's
  dtype as (1, 1, C_in, C_out).
  """
  _, ho, wo, cout = g.shape
  cin = x.shape[3]
  (taken,) = window_taps(x, (1, 1), strides, (ho, wo))
  # (C_out, pixels) x (pixels, C_in), as the patch route multiplies.
  dk = lax.dot_general(g.reshape(-1, cout), taken.reshape(-1, cin), (((0,), (0,)), ((), ())),
                       precision=precision, preferred_element_type=jnp.float32)
  return dk.T.reshape(1, 1, cin, cout).astype(x.dtype)


def strided_1x1(x: Array, k: Array, strides: Sequence[int], precision: Any = None) -> Array:
  """An unpadded 1 x 1 NHWC convolution as the strided pixels times the kernel matrix.

  out[n, p, q, o] = sum over c of x[n, p * sh, q * sw, c] * k[0, 0, c, o]: the pixels the
  windows see, (N * H_out * W_out, C_in), times the (C_in, C_out) kernel, one matrix
  product. Plain JAX, so its derivatives are JAX's own and every transformation works:
  the input gradient is the output gradient times the transposed kernel, written into a
  zero map at the strided positions, and the kernel gradient one product over the pixels
  (why on CPU: module docstring and docs/benchmarks.md).
  """
  n, h, w, cin = x.shape
  cout = k.shape[3]
  ho, wo = -(-h // strides[0]), -(-w // strides[1])
  (taken,) = window_taps(x, (1, 1), strides, (ho, wo))
  out = lax.dot_general(taken.reshape(n * ho * wo, cin), k.reshape(cin, cout),
                        (((1,), (0,)), ((), ())), precision=precision)
  return out.reshape(n, ho, wo, cout)


def chunk_images(batch: int, rows_per_image: int, patch_width: int, itemsize: int,
                 budget: int = CHUNK_BYTES) -> int:
  """Images per scan step: the largest divisor of ``batch`` whose patch matrix
  (images * rows_per_image, patch_width) fits in ``budget`` bytes, at least 1."""
  per_image = rows_per_image * patch_width * itemsize
  best = 1
  for b in range(1, batch + 1):
    if batch % b == 0 and b * per_image <= budget:
      best = b
  return best


def kernel_grad_by_patches(x: Array, g: Array, kernel_shape: Sequence[int],
                           strides: Sequence[int], pads: Sequence[tuple[int, int]],
                           precision: Any = None) -> Array:
  """dL/dK of a 2-D NHWC convolution as a sum of patch-matrix products.

  Args:
    x: the input, (N, H, W, C_in).
    g: the gradient of the output, (N, H_out, W_out, C_out).
    kernel_shape: (kh, kw, C_in, C_out).
    strides, pads: the convolution's (sh, sw) and ((top, bottom), (left, right)).
  Returns:
    (kh, kw, C_in, C_out), in the kernel's layout, accumulated in float32 and cast to
    x's dtype.
  """
  kh, kw, cin, cout = kernel_shape
  n, ho, wo, _ = g.shape
  (top, bottom), (left, right) = pads
  # Negative padding crops, as lax's convolution does.
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  b = chunk_images(n, ho * wo, kh * kw * cin, jnp.dtype(x.dtype).itemsize, CHUNK_BYTES)
  xs = xp.reshape(n // b, b, *xp.shape[1:])
  gs = g.reshape(n // b, b * ho * wo, cout)

  def step(acc, chunk):
    xc, gc = chunk
    taps = window_taps(xc, (kh, kw), strides, (ho, wo))
    patches = jnp.concatenate(taps, axis=-1).reshape(b * ho * wo, kh * kw * cin)
    # (C_out, rows) x (rows, taps): the orientation XLA:CPU multiplies fastest here.
    return acc + lax.dot_general(gc, patches, (((0,), (0,)), ((), ())),
                                 precision=precision,
                                 preferred_element_type=jnp.float32), None

  acc = jnp.zeros((cout, kh * kw * cin), jnp.float32)
  acc, _ = lax.scan(step, acc, (xs, gs))
  return acc.T.reshape(kh, kw, cin, cout).astype(x.dtype)
