"""Few-channel, stride-1 convolutions as a banded (Toeplitz) matrix product along W.

:func:`banded_conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` that
runs a convolution with at most :data:`MAX_BANDED_TAPS` rows of input taps and one output
channel (CBAM's k x k convolution of two pooled maps) as one matrix product against a
band built from the kernel, on the backends `backends.FAST_PATHS` lists. Plain JAX: every
transformation works. Measurements: docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_flax.ops.convolution import _is_nhwc_2d, _pairs
from attention_flax.ops.backends import route

Array = jax.Array


# The banded product multiplies (W_out, W_pad) x (W_pad, kh * C_in) per row, so it does
# W_pad / kw times the work of the direct convolution. With one output channel, where
# XLA:CPU's direct convolution is slowest, it pays off up to wide maps; with more outputs
# XLA's convolution catches up. The limits below are where the band stopped paying off on
# CPU (docs/benchmarks.md, "CBAM's spatial convolution banded along the width").
MAX_BANDED_TAPS = 32
MAX_BANDED_OUTPUTS = 1
MAX_BANDED_WIDTH = 256


def uses_band(lhs_shape: Sequence[int], rhs_shape: Sequence[int]) -> bool:
  """Whether a stride-1 NHWC convolution of this (N, H, W, C_in) input and (kh, kw, C_in,
  C_out) kernel runs as a banded matrix product (:func:`banded_conv_general_dilated`)."""
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
                                everywhere: bool = False) -> Array:
  """``lax.conv_general_dilated`` that runs few-channel, stride-1 convolutions as a banded
  matrix product (:func:`banded_conv`; module docstring).

  Same arguments and result as ``lax.conv_general_dilated``. The banded path takes a 2-D
  NHWC x HWIO convolution with unit strides, no dilation, one group, non-negative padding
  and a kernel for which :func:`uses_band` holds, on the backends that
  ``ops.backends.FAST_PATHS["banded_conv"]`` lists (``everywhere=True``: on every
  backend); everything else is ``lax.conv_general_dilated``.
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

  if everywhere:
    return band(lhs, rhs)
  return route("banded_conv", band, plain, lhs, rhs)
