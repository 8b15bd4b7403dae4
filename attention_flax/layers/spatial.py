"""Spatial attention: a gate per position (CBAM's spatial gate) or per row and column.

* Spatial attention of CBAM: Woo et al., "CBAM: Convolutional Block Attention Module",
  https://arxiv.org/abs/1807.06521.
* Coordinate Attention: Hou et al., "Coordinate Attention for Efficient Mobile Network
  Design", https://arxiv.org/abs/2103.02907.

1x1 convolutions on pooled strips are written as ``nn.Dense`` over the channel axis; a
timm/PyTorch weight (O, I, 1, 1) is the Dense kernel ``w[:, :, 0, 0].T`` (I, O). Batch norms
come from the ``norm`` field, by default :class:`~attention_flax.layers.norm.TorchBatchNorm`
(momentum 0.9 and epsilon 1e-5, PyTorch's 0.1 and 1e-5, and PyTorch's unbiased running
variance), so their parameters and running statistics map 1:1 onto timm's and evolve as
timm's do in training; they compute in float32 whatever ``dtype`` is. Gates are computed in
``dtype`` and applied in the input's dtype.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.common import check_images, check_layout, get_act, make_divisible
from attention_flax.layers.norm import TorchBatchNorm, batch_norm

Array = jax.Array
ModuleDef = Callable[..., nn.Module]


def norm_in_float32(norm: ModuleDef, y: Array, train: bool, param_dtype: Any,
                     name: str) -> Array:
  """The child ``norm`` on ``y`` in float32, returned in ``y``'s dtype. The factory is called
  with ``use_running_average``, ``dtype``, ``param_dtype`` and ``name`` only, so momentum
  and epsilon stay the factory's (``TorchBatchNorm``: 0.9 and 1e-5)."""
  return batch_norm(norm, y, name=name, use_running_average=not train, dtype=jnp.float32,
                    param_dtype=param_dtype).astype(y.dtype)


# The channel pools a spatial gate can convolve: the mean and the max over C, and their
# average (timm's light CBAM).
CHANNEL_POOLS = ("mean", "max", "mean_max")


def _check_pool_order(pool_order: Sequence[str], module: str) -> tuple[str, ...]:
  order = (pool_order,) if isinstance(pool_order, str) else tuple(pool_order)
  if not order or len(set(order)) != len(order) or not set(order) <= set(CHANNEL_POOLS):
    raise ValueError(
        f"{module} pool_order must name one or more of {CHANNEL_POOLS}, each once; got "
        f"{pool_order!r}. Use ('max', 'mean') (the CBAM authors' order), ('mean', 'max') "
        "(timm's) or ('mean_max',) (timm's light CBAM).")
  return order


class SpatialAttention(nn.Module):
  """CBAM's spatial gate: ``x * gate(bn(conv_kxk([pool_c(x) for pool in pool_order])))``.

  The channel axis is pooled to one map per entry of ``pool_order`` ("mean", "max", or
  "mean_max", their average ``0.5 * mean + 0.5 * max``, timm's light CBAM; a single pool
  gives a one-map gate such as the survey's SALayer), a k x k convolution without bias
  (child ``conv``, kernel (k, k, P, 1) for P pools, symmetric zero padding ``(k - 1) // 2``
  like PyTorch) mixes them into one map, an optional BatchNorm (child
  ``bn``) follows, and the gated map scales every channel alike. Input and output
  (N, H, W, C); sows ``"spatial_mask"`` (N, H, W, 1).

  A timm conv weight (1, 2, k, k) maps to ``w.transpose(2, 3, 1, 0)``; note that timm
  stacks the maps as (mean, max) while the CBAM authors stack (max, mean).

  The survey's SALayer convolves one pooled map with the CBAM authors' ``BasicConv(1, 1,
  7, padding=3, relu=False)``: no bias, ``BatchNorm2d(momentum=0.01)``, no ReLU, then a
  sigmoid. That is ``SpatialAttention(pool_order=("mean",), use_bn=True,
  norm=functools.partial(TorchBatchNorm, momentum=0.99))``, or ``("max",)``.

  Its parameters do not depend on C, so it cannot tell a channels-first (NCHW) batch
  from an NHWC one, at init or apply: transpose such input with x.transpose(0, 2, 3, 1).

  Attributes:
    kernel_size: odd size of the square convolution (CBAM uses 7).
    pool_order: the pooled maps fed to the convolution, in order.
    use_bn: BatchNorm after the convolution (timm's CBAM has it).
    norm: factory of ``bn``, called with ``use_running_average``, ``dtype``,
      ``param_dtype`` and ``name`` only (momentum and epsilon are the factory's). The
      default ``TorchBatchNorm`` stores PyTorch's unbiased running variance, as timm does;
      ``functools.partial(flax.linen.BatchNorm, momentum=0.9, epsilon=1e-5)`` stores Flax's
      biased one. Both have the variables ``scale``, ``bias``, ``mean``, ``var``.
    conv: factory of ``conv`` (``flax.linen.Conv``'s signature); the default
      :data:`attention_flax.ops.spatial_conv` gives ``nn.Conv``'s values, faster.
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"spatial_mask": "spatial_mask"}

  kernel_size: int = 7
  pool_order: Sequence[str] = ("max", "mean")
  use_bn: bool = False
  norm: ModuleDef = TorchBatchNorm
  gate: str | Callable = "sigmoid"
  conv: ModuleDef = ops.spatial_conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    order = _check_pool_order(self.pool_order, type(self).__name__)
    k = self.kernel_size
    if not isinstance(k, int) or k < 1 or k % 2 == 0:
      raise ValueError(
          f"{type(self).__name__} needs an odd positive kernel_size so that the padding is "
          f"symmetric; got {k!r}. Use e.g. 7 or 3.")
    pad = (k - 1) // 2
    mean, top = ops.mean_and_max(x, (-1,), keepdims=True)
    pools = {"mean": mean, "max": top, "mean_max": 0.5 * mean + 0.5 * top}
    pooled = jnp.concatenate([pools[name] for name in order], axis=-1)
    logits = self.conv(1, kernel_size=(k, k), padding=[(pad, pad), (pad, pad)],
                       use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="conv")(pooled)
    if self.use_bn:
      logits = norm_in_float32(self.norm, logits, train, self.param_dtype, "bn")
    mask = get_act(self.gate)(logits)
    self.sow("intermediates", "spatial_mask", mask)
    return x * mask.astype(x.dtype)


class CoordAttention(nn.Module):
  """Coordinate Attention: separate gates along H and along W, ``x * a_h * a_w``.

  Average over W gives an (N, H, 1, C) strip, average over H an (N, 1, W, C) strip; both
  are concatenated into an (N, H + W, C) sequence, mixed by a shared 1x1 layer C -> mip
  (child ``conv1``), BatchNorm (``bn1``, statistics over N and the H + W positions like
  PyTorch's BatchNorm2d on the concatenated map) and ``act``, split back, and each part
  mapped mip -> C (``conv_h``, ``conv_w``) and gated. Input and output (N, H, W, C); sows
  ``"coord_gate_h"`` (N, H, 1, C) and ``"coord_gate_w"`` (N, 1, W, C).

  The hidden width is ``rd_channels`` or ``max(min_channels, make_divisible(C * rd_ratio,
  rd_divisor))``: the paper's ``max(8, C // 32)`` up to rounding. timm's ``CoordAttn``
  scales its ratio by 2/3 (default 1/16 * 2/3): pass ``rd_ratio=1/24`` for its widths.
  Biases follow timm (none on any of the three layers, ``use_bias=False``); the authors'
  code keeps PyTorch's default biases (``use_bias=True``). ``norm`` is the factory of
  ``bn1``, as in :class:`SpatialAttention` (default ``TorchBatchNorm``: PyTorch's rule).

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"coord_gate_h": "coord_gate", "coord_gate_w": "coord_gate"}

  rd_ratio: float = 1.0 / 32
  rd_divisor: int = 8
  rd_channels: int | None = None
  min_channels: int = 8
  use_bias: bool = False
  norm: ModuleDef = TorchBatchNorm
  act: str | Callable = "hard_swish"
  gate: str | Callable = "sigmoid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "conv1", "kernel")
    _, height, _, channels = x.shape
    if self.rd_channels is not None:
      if self.rd_channels < 1:
        raise ValueError(f"rd_channels must be >= 1, got {self.rd_channels}.")
      mip = int(self.rd_channels)
    else:
      if self.rd_ratio <= 0.0:
        raise ValueError(f"rd_ratio must be positive, got {self.rd_ratio}.")
      mip = max(self.min_channels, make_divisible(channels * self.rd_ratio, self.rd_divisor))

    def dense(features: int, name: str) -> nn.Dense:
      return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)

    strips = jnp.concatenate([jnp.mean(x, axis=2), jnp.mean(x, axis=1)], axis=1)
    y = dense(mip, "conv1")(strips)
    y = norm_in_float32(self.norm, y, train, self.param_dtype, "bn1")
    y = get_act(self.act)(y)
    gate = get_act(self.gate)
    gate_h = gate(dense(channels, "conv_h")(y[:, :height]))[:, :, None, :]
    gate_w = gate(dense(channels, "conv_w")(y[:, height:]))[:, None, :, :]
    self.sow("intermediates", "coord_gate_h", gate_h)
    self.sow("intermediates", "coord_gate_w", gate_w)
    return x * gate_h.astype(x.dtype) * gate_w.astype(x.dtype)
