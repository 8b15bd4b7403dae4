"""Coordinate-attention variants: gates from row and column strips, as timm 1.0 defines them.

* Simple coordinate attention (timm's ``SimpleCoordAttn``, ``"scoord"``): Coordinate
  Attention (Hou et al., "Coordinate Attention for Efficient Mobile Network Design",
  https://arxiv.org/abs/2103.02907) with linear layers, no norm and one additive gate.
* Efficient Local Attention (timm's ``EfficientLocalAttn``, ``"ela"``): Xu & Wan, "ELA:
  Efficient Local Attention for Deep Convolutional Neural Networks",
  https://arxiv.org/abs/2403.01123.
* Strip attention (timm's ``StripAttn``, ``"strip"``): strip pooling with optional depthwise
  refinement and one additive gate.

Each averages the input over W to a row strip (N, H, 1, C) and over H to a column strip
(N, 1, W, C). Flax module names follow timm's, so
:func:`attention_flax.convert.convert_variables` maps timm weights directly (pass the
``fc*`` modules of :class:`SimpleCoordAttn` as ``linear``: they are ``nn.Linear`` there).
Gates are computed in ``dtype`` and applied in the input's dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.common import check_images, check_layout, get_act, make_divisible
from attention_flax.layers.norm import at_least_float32

Array = jax.Array
ModuleDef = Callable[..., nn.Module]

# timm's GroupNorm1: one group over (C, H, W), epsilon 1e-5 (PyTorch's).
group_norm_1 = functools.partial(nn.GroupNorm, num_groups=1, epsilon=1e-5)


def _strips(x: Array) -> tuple[Array, Array]:
  """The row strip (N, H, 1, C), mean over W, and the column strip (N, 1, W, C)."""
  return jnp.mean(x, axis=2, keepdims=True), jnp.mean(x, axis=1, keepdims=True)


def _check_kernel(kernel_size: Any, module: str) -> int:
  if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"{module} needs an odd positive kernel_size so that the strips keep "
                     f"their length; got {kernel_size!r}.")
  return kernel_size


def _depthwise(conv: ModuleDef, channels: int, kernel: tuple[int, int], use_bias: bool,
               dtype: Any, param_dtype: Any, name: str) -> nn.Module:
  """A depthwise convolution along one axis with PyTorch's ``k // 2`` zero padding; kernel
  (kh, kw, 1, C), a timm weight (C, 1, kh, kw) transposed (2, 3, 1, 0)."""
  pads = [(k // 2, k // 2) for k in kernel]
  return conv(channels, kernel_size=kernel, padding=pads, feature_group_count=channels,
              use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class SimpleCoordAttn(nn.Module):
  """Simplified coordinate attention: ``x * gate(fc_h(a(fc1(rows))) + fc_w(a(fc1(cols))))``.

  timm's ``SimpleCoordAttn``, after Hou et al., "Coordinate Attention for Efficient Mobile
  Network Design", https://arxiv.org/abs/2103.02907.

  The row strip (mean over W) and the column strip (mean over H) each pass one shared
  linear layer C -> rd with bias (child ``fc1``) and ``act`` (SiLU); ``fc_h`` and ``fc_w``
  (rd -> C, bias) give per-row and per-column logits, which are added (broadcast to
  (N, H, W, C)) before one ``gate``. No norm. rd is ``rd_channels`` or
  ``make_divisible(C * rd_ratio * se_factor, rd_divisor)`` (timm: 1/4 * 2/3, divisor 8).
  ``has_skip`` adds the input to the gated map. Input and output (N, H, W, C); sows
  ``"coord_mask"`` (N, H, W, C), the gate applied.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"coord_mask": "gather_gate"}

  rd_ratio: float = 0.25
  rd_channels: int | None = None
  rd_divisor: int = 8
  se_factor: float = 2.0 / 3
  use_bias: bool = True
  act: str | Callable = "silu"
  gate: str | Callable = "sigmoid"
  has_skip: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "fc1", "kernel")
    channels = x.shape[-1]
    if self.rd_channels:
      hidden = int(self.rd_channels)
    else:
      if self.rd_ratio <= 0.0 or self.se_factor <= 0.0:
        raise ValueError(f"rd_ratio and se_factor must be positive; got {self.rd_ratio}, "
                         f"{self.se_factor}.")
      hidden = make_divisible(channels * self.rd_ratio * self.se_factor, self.rd_divisor,
                              round_limit=0.0)

    def dense(features: int, name: str) -> nn.Dense:
      return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)

    rows, cols = _strips(x)
    fc1, act = dense(hidden, "fc1"), get_act(self.act)
    logits_h = dense(channels, "fc_h")(act(fc1(rows)))  # (N, H, 1, C)
    logits_w = dense(channels, "fc_w")(act(fc1(cols)))  # (N, 1, W, C)
    mask = get_act(self.gate)(logits_h + logits_w)
    self.sow("intermediates", "coord_mask", mask)
    out = x * mask.astype(x.dtype)
    return out + x if self.has_skip else out


class EfficientLocalAttn(nn.Module):
  """Efficient Local Attention: ``x * gate(a(gn(dw_h(rows)))) * gate(a(gn(dw_w(cols))))``.

  Xu & Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural Networks",
  https://arxiv.org/abs/2403.01123; timm's ``EfficientLocalAttn``.

  Without any channel reduction, the row strip (N, H, 1, C) passes a depthwise
  ``kernel_size`` x 1 convolution along H (child ``conv_h``, zero padding ``k // 2``, no
  bias by default), a norm (``norm_h``) and ``act`` (SiLU), and the column strip a 1 x k
  one along W (``conv_w``, ``norm_w``). timm's norm is a GroupNorm with one group (over
  all of C and the strip, epsilon 1e-5, :data:`group_norm_1`); the paper uses 16 groups
  (``norm=functools.partial(flax.linen.GroupNorm, num_groups=16, epsilon=1e-5)``);
  ``norm=None`` drops it. ``has_skip`` adds the input to the gated map. Input and output
  (N, H, W, C); sows ``"coord_gate_h"`` (N, H, 1, C) and ``"coord_gate_w"`` (N, 1, W, C).

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    kernel_size: odd length of the 1-D depthwise kernels (timm: 7).
    norm: factory of ``norm_h`` and ``norm_w`` (called with ``dtype``, ``param_dtype``,
      ``name``; it computes in float32 whatever ``dtype`` is), or None.
    conv: factory of the convolutions (``flax.linen.Conv``'s signature).
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"coord_gate_h": "coord_gate", "coord_gate_w": "coord_gate"}

  kernel_size: int = 7
  use_bias: bool = False
  act: str | Callable = "silu"
  gate: str | Callable = "sigmoid"
  norm: ModuleDef | None = group_norm_1
  has_skip: bool = False
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "conv_h", "kernel", axis=-1)
    k = _check_kernel(self.kernel_size, type(self).__name__)
    channels = x.shape[-1]
    act, gate = get_act(self.act), get_act(self.gate)

    def branch(strip: Array, kernel: tuple[int, int], axis: str) -> Array:
      y = _depthwise(self.conv, channels, kernel, self.use_bias, self.dtype,
                     self.param_dtype, f"conv_{axis}")(strip)
      if self.norm is not None:  # in float32 at least, whatever dtype is
        y = self.norm(dtype=jnp.float32, param_dtype=self.param_dtype,
                      name=f"norm_{axis}")(at_least_float32(y)).astype(y.dtype)
      return gate(act(y))

    rows, cols = _strips(x)
    gate_h = branch(rows, (k, 1), "h")
    gate_w = branch(cols, (1, k), "w")
    self.sow("intermediates", "coord_gate_h", gate_h)
    self.sow("intermediates", "coord_gate_w", gate_w)
    out = x * gate_h.astype(x.dtype) * gate_w.astype(x.dtype)
    return out + x if self.has_skip else out


class StripAttn(nn.Module):
  """Strip attention: ``x * gate(dw_h(rows) + dw_w(cols))``.

  timm's ``StripAttn``: strip pooling (Hou et al., "Strip Pooling: Rethinking Spatial
  Pooling for Scene Parsing", https://arxiv.org/abs/2003.13328) as a light gate.

  The row strip (N, H, 1, C) passes a depthwise ``kernel_size`` x 1 convolution along H
  (child ``conv_h``, zero padding ``k // 2``, no bias by default) and the column strip a
  1 x k one along W (``conv_w``); ``use_conv=False`` skips both. Their sum, broadcast to
  (N, H, W, C), passes one ``gate``. ``has_skip`` adds the input to the gated map. Input
  and output (N, H, W, C); sows ``"coord_mask"`` (N, H, W, C), the gate applied.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    use_conv: refine the strips with the depthwise convolutions.
    kernel_size: odd length of the 1-D depthwise kernels (timm: 3).
    conv: factory of the convolutions (``flax.linen.Conv``'s signature).
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"coord_mask": "gather_gate"}

  use_conv: bool = True
  kernel_size: int = 3
  use_bias: bool = False
  gate: str | Callable = "sigmoid"
  has_skip: bool = False
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "conv_h", "kernel", axis=-1)
    rows, cols = _strips(x)
    if self.use_conv:
      k = _check_kernel(self.kernel_size, type(self).__name__)
      channels = x.shape[-1]
      rows = _depthwise(self.conv, channels, (k, 1), self.use_bias, self.dtype,
                        self.param_dtype, "conv_h")(rows)
      cols = _depthwise(self.conv, channels, (1, k), self.use_bias, self.dtype,
                        self.param_dtype, "conv_w")(cols)
    elif self.dtype is not None:
      rows, cols = rows.astype(self.dtype), cols.astype(self.dtype)
    mask = get_act(self.gate)(rows + cols)
    self.sow("intermediates", "coord_mask", mask)
    out = x * mask.astype(x.dtype)
    return out + x if self.has_skip else out
