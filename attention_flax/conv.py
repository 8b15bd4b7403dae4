"""2-D convolution whose kernel gradient is fast on XLA's CPU backend.

Training a ResNet on XLA:CPU spends most of its step in one operation: the gradient of a
convolution with respect to its kernel. XLA writes it as a convolution whose window is the
whole feature map (batch and channels swapped), which its CPU backend emits as a plain
loop: 3-10 GFLOP/s on a CIFAR ResNet's 32x32x16 layers, where the forward convolution of
the same layer runs at 50-70 GFLOP/s (``python -m train.bench --convs`` measures both).

The kernel gradient is a matrix product: with P the patch matrix of the input (one row per
output pixel, one column per (kh, kw, C_in) tap) and G the output gradient (one row per
output pixel, C_out columns), dL/dK = P^T G. :func:`conv_general_dilated` computes it
that way on CPU, a few images at a time inside a ``lax.scan`` so that the patches of a
chunk stay in cache and never exist for the whole batch; every other backend (GPU, TPU)
keeps XLA's own gradient, chosen per platform at lowering time by
``lax.platform_dependent``; so do small layers (:func:`uses_patches`), where XLA's is as
fast and compiles sooner. An unpadded 1 x 1 layer of any size needs no patches: its
kernel gradient is one matrix product of the input and the output gradient over every
pixel (:func:`kernel_grad_1x1`), where XLA's convolution first copies the input into a
(C, H, W, N) layout (1.05-1.07x faster ResNet-50 training steps). With strides (ResNet-50's
downsampling shortcuts) such a layer is one matrix product of the strided pixels forward
too, and its input gradient one product written into a zero map (:func:`strided_1x1`),
where XLA:CPU ran a convolution and an input-dilated convolution: 1.4x and 1.7x faster
forward + gradients on the 14 x 14 and 7 x 7 inputs of a 112 x 112 ResNet-50. Every other
forward pass and input gradient is XLA's; :func:`kernel_grad_route` names the route of a
layer's kernel gradient.

Use it as the ``conv_general_dilated`` of ``flax.linen.Conv``::

  nn.Conv(64, (3, 3), conv_general_dilated=attention_flax.conv.conv_general_dilated)

Anything other than a 2-D NHWC x HWIO convolution without dilation or groups goes to
``lax.conv_general_dilated`` unchanged. The gradient rule is a ``jax.custom_vjp``: reverse
mode (``grad``, ``vjp``, gradients of gradients) and ``vmap`` work, forward mode
(``jax.jvp``, ``jax.jacfwd``) does not; for those, build the model with a plain
``nn.Conv`` (``ResNet`` takes a ``conv`` factory).

A second drop-in, :func:`banded_conv_general_dilated`, is for the opposite shape: a
stride-1 convolution with few input channels, one output channel and a wide window, such
as CBAM's 7 x 7 convolution of two pooled maps to one. XLA:CPU runs a convolution with
one output channel at well under 1 GFLOP/s; written as a matrix product along the image
width against a banded (Toeplitz) matrix built from the kernel, the same layer trains
1.8-7x faster (224 to 32 columns). It is plain JAX (every transformation works,
``jax.jvp`` included). It applies on CPU and on CUDA GPUs, where cuDNN runs that layer
through layout conversions and padding kernels and the product made CBAM-ResNet-50's
bfloat16 training step 1.04-1.05x faster on an H200; other backends keep XLA's.

Third, the compiler: :func:`cpu_compiler_options` are options for ``jax.jit`` on CPU that
keep XLA's convolutions out of the YNNPACK library (jaxlib 0.10 hands it convolutions,
dots and reductions by default) and run them with XLA's own kernels, about 2x faster
forward for a CIFAR ResNet's later 3 x 3 layers and 1.07-1.44x faster training steps on
2-core AVX-512 machines (``docs/benchmarks.md``); dots and reductions stay with the
library. With them XLA's own kernel gradient is faster than the patches for a layer
alone, but the patch route still made whole ResNet-20 and ResNet-50 steps 1.1x faster,
so it stays. ``python -m train`` and ``train.bench`` compile with them on CPU; in your
own loop::

  step = jax.jit(train_step, compiler_options=attention_flax.conv.cpu_compiler_options())
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_NHWC = ("NHWC", "HWIO", "NHWC")
# Bytes of patch matrix per scan step: large enough for an efficient matrix product, small
# enough to stay in a core's cache (measured best between 1 and 4 MiB on AVX-512 cores).
CHUNK_BYTES = 2 << 20
# XLA's own kernel gradient is only slow for long contractions: below about 2048 output
# pixels or 1e8 FLOPs it ran as fast as the patches here, and compiles in half the time
# (0.1-0.3 s against 0.3-1 s per layer), so small layers keep it.
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
    return lax.platform_dependent(
        lhs, rhs, cpu=functools.partial(strided_1x1, strides=strides, precision=precision),
        default=lambda x, k: _conv(x, k, strides, pads, precision))
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

  route = kernel_grad_route(g.shape, k.shape, pads)
  if route == "xla":
    return dx, xla_kernel_grad(x, k, g)
  cpu_kernel_grad = pointwise_kernel_grad if route == "1x1" else patch_kernel_grad
  dk = lax.platform_dependent(x, k, g, cpu=cpu_kernel_grad, default=xla_kernel_grad)
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


# The banded product multiplies (W_out, W_pad) x (W_pad, kh * C_in) per row, so it does
# W_pad / kw times the work of the direct convolution. With one output channel, where
# XLA:CPU's direct convolution is slowest, it pays off up to wide maps: forward + both
# gradients of CBAM's 7x7 2 -> 1 convolution measured 7.3x faster than XLA's at 32
# columns, 4.2x at 56, 3.0x at 112 and 1.8x at 224; a 3x3 one 4.9x at 32 and 1.2x at 256.
# With 4 or 8 outputs XLA's convolution caught up (0.2-1.0x at 32-128 columns), so those
# keep it. These limits come from CPU; on a GPU only CBAM's maps (7-56 columns) were timed.
MAX_BANDED_TAPS = 32
MAX_BANDED_OUTPUTS = 1
MAX_BANDED_WIDTH = 256
# The backends where the band replaces XLA's convolution by default (the module docstring
# gives the measurements); ROCm and TPU were not measured.
BAND_PLATFORMS = ("cpu", "cuda")


def uses_band(lhs_shape: Sequence[int], rhs_shape: Sequence[int]) -> bool:
  """Whether a stride-1 NHWC convolution of this (N, H, W, C_in) input and (kh, kw, C_in,
  C_out) kernel runs as a banded matrix product on CPU and CUDA
  (:func:`banded_conv_general_dilated`)."""
  kh, kw, cin, cout = rhs_shape
  return (kh * cin <= MAX_BANDED_TAPS and cout <= MAX_BANDED_OUTPUTS and kw > 1
          and lhs_shape[2] <= MAX_BANDED_WIDTH)


def band_matrix(kernel: Array, width_out: int) -> Array:
  """(kh, kw, C_in, C_out) kernel -> (kh, W_out + kw - 1, C_in, W_out, C_out) matrix T
  with T[dy, z, c, x, o] = kernel[dy, z - x, c, o] where 0 <= z - x < kw and 0 elsewhere."""
  kh, kw, cin, cout = kernel.shape
  offset = np.arange(width_out + kw - 1)[:, None] - np.arange(width_out)[None, :]  # (z, x)
  pick = (offset[..., None] == np.arange(kw)).astype(np.float32)  # (z, x, dx)
  return jnp.einsum("zxe,deco->dzcxo", jnp.asarray(pick, kernel.dtype), kernel)


def banded_conv(x: Array, kernel: Array, pads: Sequence[tuple[int, int]],
                precision: Any = None, preferred_element_type: Any = None) -> Array:
  """Stride-1 2-D NHWC convolution as a banded matrix product along W (module docstring).

  out[n, y, x, o] = sum over (dy, z, c) of xp[n, y + dy, z, c] * T[dy, z, c, x, o], with
  xp the padded input and T = :func:`band_matrix`. The kh row shifts of xp are stacked
  on a new axis after H, (N, H_out, kh, W_pad, C): each shift is a copy of whole image
  rows, and every output row's taps then lie contiguous in memory, so the product reads
  them as one (N * H_out, kh * W_pad * C) matrix and writes (N, H_out, W_out, C_out) in
  place, with no transposes. Equal to ``lax.conv_general_dilated`` with window strides 1
  and these (non-negative) pads, up to float rounding.
  """
  kh, kw, cin, cout = kernel.shape
  (top, bottom), (left, right) = pads
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  n, h_pad, w_pad, _ = xp.shape
  h_out, w_out = h_pad - kh + 1, w_pad - kw + 1
  shifted = jnp.stack([xp[:, dy:dy + h_out] for dy in range(kh)], axis=2)
  band = band_matrix(kernel, w_out).reshape(kh * w_pad * cin, w_out * cout)
  out = lax.dot_general(shifted.reshape(n * h_out, kh * w_pad * cin), band,
                        (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
  return out.reshape(n, h_out, w_out, cout)


def banded_conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                                padding: Any, lhs_dilation: Sequence[int] | None = None,
                                rhs_dilation: Sequence[int] | None = None,
                                dimension_numbers: Any = None, feature_group_count: int = 1,
                                batch_group_count: int = 1, precision: Any = None,
                                preferred_element_type: Any = None, *,
                                platforms: Sequence[str] | None = BAND_PLATFORMS) -> Array:
  """``lax.conv_general_dilated`` that runs few-channel, stride-1 convolutions as a banded
  matrix product on CPU and CUDA GPUs (:func:`banded_conv`; module docstring).

  Same arguments and result as ``lax.conv_general_dilated``. The banded path takes a 2-D
  NHWC x HWIO convolution with unit strides, no dilation, one group, non-negative padding
  and a kernel for which :func:`uses_band` holds, on the backends in ``platforms``
  (default :data:`BAND_PLATFORMS`, CPU and CUDA; ``None``: every backend, chosen without
  ``lax.platform_dependent``); everything else, and every other backend, is
  ``lax.conv_general_dilated``.
  """
  def plain(lhs, rhs):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)

  if (not _is_nhwc_2d(lhs, rhs, dimension_numbers)
      or feature_group_count != 1 or batch_group_count != 1
      or any(int(s) != 1 for s in window_strides)
      or any(d != 1 for d in (lhs_dilation or (1, 1)))
      or any(d != 1 for d in (rhs_dilation or (1, 1)))
      or not uses_band(lhs.shape, rhs.shape)):
    return plain(lhs, rhs)
  pads = _pairs(padding, lhs, rhs, (1, 1))
  if any(p < 0 for pair in pads for p in pair):
    return plain(lhs, rhs)

  def band(lhs, rhs):
    return banded_conv(lhs, rhs, pads, precision, preferred_element_type).astype(
        jax.eval_shape(plain, lhs, rhs).dtype)

  if platforms is None:
    return band(lhs, rhs)
  if not platforms:
    return plain(lhs, rhs)
  return lax.platform_dependent(lhs, rhs, default=plain, **dict.fromkeys(platforms, band))


# XLA:CPU's library fusions left to YNNPACK: dots and reductions. Its convolutions ran about
# 2x slower than XLA's own; without its reductions batch-norm statistics became slow
# reduce-windows.
_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
CPU_COMPILER_OPTIONS = {
    _YNN_FUSIONS: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_options_accepted() -> bool:
  try:
    cpu = jax.devices("cpu")[0]
    probe = jax.ShapeDtypeStruct((1,), jnp.float32,
                                 sharding=jax.sharding.SingleDeviceSharding(cpu))
    jax.jit(jnp.negative, compiler_options=CPU_COMPILER_OPTIONS).lower(probe).compile()
  except RuntimeError:  # No CPU backend, or a jaxlib without this option or these values.
    return False
  return True


def cpu_compiler_options() -> dict[str, str]:
  """``compiler_options`` for ``jax.jit`` of CPU computations (module docstring).

  ``CPU_COMPILER_OPTIONS`` when this jaxlib accepts them (checked once, by compiling a
  one-element negation), else ``{}``; also ``{}`` when the environment's ``XLA_FLAGS``
  already set the library fusions (``--xla_cpu_experimental_ynn_fusion_type``), which
  then decide. Only for computations placed on CPU: other backends ignore or reject them.
  """
  if _YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""):
    return {}
  return dict(CPU_COMPILER_OPTIONS) if _cpu_options_accepted() else {}
