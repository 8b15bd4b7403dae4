"""Split attention (the "Splat" unit of ResNeSt).

Zhang et al., "ResNeSt: Split-Attention Networks", https://arxiv.org/abs/2004.08955
(Section 3, Fig. 2 right: the cardinal-major split-attention block).

A split-attention unit replaces a 3x3 convolution: one grouped convolution produces
``radix`` feature-map splits per cardinal group, their sum is pooled globally, a two-layer
grouped MLP gives ``radix`` logits per output channel, a softmax across the splits (a
sigmoid when ``radix == 1``) turns them into weights, and the output is the weighted sum of
the splits. Layout, parameters and names follow timm's ``SplitAttn``
(``timm/layers/split_attn.py``): children ``conv``, ``bn0``, ``fc1``, ``bn1``, ``fc2``, all
convolutions (``fc1``/``fc2`` are grouped 1x1 convolutions with bias), so timm weights
(O, I / groups, kh, kw) map to Flax kernels (kh, kw, I / groups, O) by the generic rule of
:mod:`attention_flax.convert`.

Batch norms come from the ``norm`` field (default
:class:`~attention_flax.layers.norm.TorchBatchNorm`: PyTorch's momentum, epsilon and
unbiased running variance) and compute in float32 whatever ``dtype`` is.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.common import (check_images, check_layout, get_act,
                                          he_normal, make_divisible)
from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.layers.spatial import norm_in_float32

Array = jax.Array
ModuleDef = Callable[..., nn.Module]


def radix_softmax(logits: Array, radix: int, groups: int) -> Array:
  """timm's ``RadixSoftmax`` on (N, groups * radix * C') logits laid out group-major.

  Softmax over the ``radix`` axis of each group's (radix, C') block when ``radix > 1``;
  a sigmoid when ``radix == 1``. Returns (N, radix * groups * C'), radix-major: the weight
  of split r for output channel c (c = g * C' + j) sits at index ``r * groups * C' + c``,
  the layout of the splits the grouped convolution produces.
  """
  if radix == 1:
    return jax.nn.sigmoid(logits)
  n = logits.shape[0]
  x = logits.reshape(n, groups, radix, -1).transpose(0, 2, 1, 3)
  return jax.nn.softmax(x, axis=1).reshape(n, -1)


def split_attention_width(channels: int, radix: int, rd_ratio: float, rd_divisor: int,
                          rd_channels: int | None = None, min_channels: int = 32) -> int:
  """The hidden width of the split-attention MLP, as timm's ``SplitAttn``.

  ``rd_channels * radix`` when given, else timm's ``make_divisible(channels * radix *
  rd_ratio, rd_divisor, min_value=min_channels)`` (round limit 0.9): 32 for a 64-channel
  input with radix 2, 64 for 128, 128 for 256.
  """
  if rd_channels is not None:
    if rd_channels < 1:
      raise ValueError(f"rd_channels must be >= 1, got {rd_channels}.")
    return int(rd_channels) * radix
  if rd_ratio <= 0.0:
    raise ValueError(f"rd_ratio must be positive, got {rd_ratio}.")
  return make_divisible(channels * radix * rd_ratio, rd_divisor, min_value=min_channels,
                        round_limit=0.9)


class SplitAttention(nn.Module):
  """Split attention (Zhang et al. 2020, ResNeSt, arXiv 2004.08955, Fig. 2 right).

  Replaces a ``kernel_size`` convolution. Input (N, H, W, C) -> output
  (N, H / strides, W / strides, features), computed as:

  1. ``conv``: C -> features * radix channels, ``groups * radix`` groups, ``strides``,
     padding ``dilation * (kernel_size - 1) // 2`` on every side (PyTorch's), no bias;
     then ``bn0`` and ``act``. Channel ``r * features + c`` is split r of channel c.
  2. The splits are summed, averaged over H and W (N, features), passed through ``fc1``
     (1x1, ``groups`` groups, with bias, -> hidden), ``bn1``, ``act`` and ``fc2`` (1x1,
     ``groups`` groups, with bias, -> features * radix).
  3. :func:`radix_softmax` gives per-channel weights over the splits (a sigmoid gate when
     ``radix == 1``); the output is ``sum_r weight_r * split_r``.

  The weights are sown as ``"radix_weights"`` of shape (N, radix, features) (kind
  ``"branch_weights"``, the layout of Selective Kernel's path weights): entry [n, r, c]
  weighs split r of channel c; for ``radix > 1`` they sum to 1 over r.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    features: output channels; None = the input's C.
    radix: splits per cardinal group (the paper's R).
    groups: cardinal groups (the paper's K, timm's ``cardinality``); C and ``features``
      must be divisible by ``groups * radix`` and ``groups``.
    kernel_size, strides, dilation: of the main convolution.
    rd_ratio, rd_divisor, rd_channels, min_channels: the hidden width (see
      :func:`split_attention_width`).
    use_bias: bias on the main convolution (timm: False).
    act: activation after ``bn0`` and ``bn1``.
    norm: factory of ``bn0`` and ``bn1`` (called with ``use_running_average``, ``dtype``,
      ``param_dtype``, ``name``).
    conv: factory with ``flax.linen.Conv``'s signature for the three convolutions.
    dtype: compute dtype (None: the input's); param_dtype: parameter dtype.
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"radix_weights": "branch_weights"}

  features: int | None = None
  radix: int = 2
  groups: int = 1
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  rd_ratio: float = 0.25
  rd_divisor: int = 8
  rd_channels: int | None = None
  min_channels: int = 32
  use_bias: bool = False
  act: str | Callable = "relu"
  norm: ModuleDef = TorchBatchNorm
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _check(self, channels: int) -> int:
    """Validates the fields against C; returns the output width."""
    features = self.features or channels
    if self.radix < 1 or self.groups < 1:
      raise ValueError(f"radix and groups must be >= 1, got radix={self.radix}, "
                       f"groups={self.groups}.")
    if channels % (self.groups * self.radix) or features % self.groups:
      raise ValueError(
          f"SplitAttention needs C ({channels}) divisible by groups * radix "
          f"({self.groups} * {self.radix}) and features ({features}) divisible by groups.")
    return features

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "conv", "kernel", groups=self.groups * self.radix)
    n, channels = x.shape[0], x.shape[-1]
    features = self._check(channels)
    radix, groups = self.radix, self.groups
    hidden = split_attention_width(channels, radix, self.rd_ratio, self.rd_divisor,
                                   self.rd_channels, self.min_channels)
    if hidden % groups:
      raise ValueError(f"The hidden width {hidden} must be divisible by groups={groups}.")
    dtype = self.dtype or x.dtype
    act = get_act(self.act)
    pad = self.dilation * (self.kernel_size - 1) // 2

    y = self.conv(features * radix, (self.kernel_size, self.kernel_size),
                  strides=self.strides, padding=((pad, pad), (pad, pad)),
                  kernel_dilation=self.dilation, feature_group_count=groups * radix,
                  use_bias=self.use_bias, kernel_init=he_normal, dtype=dtype,
                  param_dtype=self.param_dtype, name="conv")(x)
    y = act(norm_in_float32(self.norm, y, train, self.param_dtype, "bn0"))
    h, w = y.shape[1:3]
    splits = y.reshape(n, h, w, radix, features)

    pooled = jnp.mean(jnp.sum(splits, axis=3), axis=(1, 2), keepdims=True)  # (N, 1, 1, F)
    z = self.conv(hidden, (1, 1), feature_group_count=groups, dtype=dtype,
                  param_dtype=self.param_dtype, name="fc1")(pooled)
    z = act(norm_in_float32(self.norm, z, train, self.param_dtype, "bn1"))
    logits = self.conv(features * radix, (1, 1), feature_group_count=groups, dtype=dtype,
                       param_dtype=self.param_dtype, name="fc2")(z)
    weights = radix_softmax(logits.reshape(n, -1), radix, groups)
    weights = weights.reshape(n, radix, features)
    self.sow("intermediates", "radix_weights", weights)
    out = jnp.sum(splits * weights[:, None, None].astype(splits.dtype), axis=3)
    return out.astype(dtype)
