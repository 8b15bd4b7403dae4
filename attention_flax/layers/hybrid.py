"""Hybrid attention: channel and spatial context combined.

* CBAM: Woo et al., "CBAM: Convolutional Block Attention Module",
  https://arxiv.org/abs/1807.06521 -- a channel gate, then a spatial gate.
* Global Context (GC) block: Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation
  Networks and Beyond", https://arxiv.org/abs/1904.11492 -- attention-pooled context, a
  LayerNorm bottleneck transform, fused by scaling and/or addition.

Defaults reproduce timm's ``CbamModule`` and ``GlobalContext`` (timm 1.0); fields give its
``LightCbamModule`` (``CBAM(light=True)``) and add-fused ``GlobalContext`` (``fuse="add"``,
timm's ``"gca"``). MLPs act on pooled (N, C) vectors with ``nn.Dense``; a timm 1x1 conv
weight (O, I, 1, 1) is the Dense kernel ``w[:, :, 0, 0].T`` (I, O). Gates are computed in
``dtype`` and applied in the input's dtype.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.channel import ChannelMlp
from attention_flax.layers.common import check_images, check_layout, get_act, reduced_width
from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.layers.spatial import SpatialAttention, norm_in_float32

Array = jax.Array
ModuleDef = Callable[..., nn.Module]


class CBAMChannel(nn.Module):
  """CBAM's channel gate: one shared MLP on the average- and the max-pooled descriptor.

  ``x * gate(mlp(mean_hw(x)) + mlp(max_hw(x)))`` with ``mlp = fc2(act(fc1(.)))``, children
  ``fc1`` (C -> rd) and ``fc2`` (rd -> C), no biases by default (timm's ``ChannelAttn``).
  ``light=True`` is timm's ``LightChannelAttn``: the two descriptors are averaged first and
  pass the MLP once, ``x * gate(mlp(0.5 * mean_hw(x) + 0.5 * max_hw(x)))``, same children.
  Input and output (N, H, W, C); sows ``"channel_gate"`` (N, 1, 1, C).
  :meth:`gate_from_pooled` computes the gate from the two (N, C) pools alone.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).
  """
  pools: ClassVar[tuple[str, ...]] = ("mean", "max")
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"channel_gate": "channel_gate"}

  rd_ratio: float = 1.0 / 16
  rd_divisor: int = 1
  rd_channels: int | None = None
  light: bool = False
  mlp_bias: bool = False
  act: str | Callable = "relu"
  gate: str | Callable = "sigmoid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "fc1", "kernel")
    return x * self.gate_from_pooled(*ops.mean_and_max(x, (1, 2))).astype(x.dtype)

  @nn.compact
  def gate_from_pooled(self, mean: Array, top: Array) -> Array:
    """The gate (N, 1, 1, C) from the spatial mean and maximum (N, C) of the input."""
    if any(getattr(p, "ndim", None) != 2 for p in (mean, top)) or mean.shape != top.shape:
      raise ValueError(
          f"{type(self).__name__}.gate_from_pooled expects the (N, C) spatial mean and max "
          f"of an (N, H, W, C) map; got shapes {getattr(mean, 'shape', None)} and "
          f"{getattr(top, 'shape', None)}.")
    channels = mean.shape[-1]
    hidden = reduced_width(channels, self.rd_ratio, self.rd_divisor, self.rd_channels)
    # Both descriptors go through the MLP in one batch, (2, N, C), or (1, N, C) averaged.
    pooled = (0.5 * mean + 0.5 * top)[None] if self.light else jnp.stack([mean, top])
    y = nn.Dense(hidden, use_bias=self.mlp_bias, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc1")(pooled)
    y = get_act(self.act)(y)
    y = nn.Dense(channels, use_bias=self.mlp_bias, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc2")(y)
    gate = get_act(self.gate)(y[0] if self.light else y[0] + y[1])[:, None, None, :]
    self.sow("intermediates", "channel_gate", gate)
    return gate


class CBAM(nn.Module):
  """Convolutional Block Attention Module: channel gate, then spatial gate.

  ``y = x * Mc(x)``, then ``y * Ms(y)`` (the paper's Eq. 1). Children ``channel``
  (:class:`CBAMChannel`: ``fc1``, ``fc2``) and ``spatial`` (:class:`SpatialAttention`:
  ``conv``, ``bn``), each sowing its own gate. The defaults are timm's ``CbamModule``:
  reduction 1/16 with divisor 1, bias-free MLP, spatial maps stacked as (mean, max), 7x7
  conv without bias followed by BatchNorm, sigmoid gates; for C = 256 that is
  2 * 256 * 16 + 2 * 7 * 7 + 2 = 8292 parameters. The CBAM authors' code stacks
  (max, mean) and, inside its ResNet, starts the spatial BatchNorm's scale at zero.
  ``norm`` is the factory of that BatchNorm and ``conv`` of the spatial convolution (see
  :class:`SpatialAttention`). Input and output (N, H, W, C).

  The channel gate can be computed from pooled statistics (:meth:`gate_from_pooled`);
  :meth:`after_gate` then applies the spatial gate to the channel-gated map.

  ``light=True`` is timm's ``LightCbamModule`` (registered as ``"lcbam"``; not in the
  paper): mean and max are averaged before the channel MLP (``CBAMChannel(light=True)``)
  and before the spatial convolution (``SpatialAttention(pool_order=("mean_max",))``,
  kernel (k, k, 1, 1)),
  with the same children and variable names, so timm's weights convert as CBAM's do;
  ``pool_order`` then plays no part.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).
  """
  pools: ClassVar[tuple[str, ...]] = ("mean", "max")
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"channel_gate": "channel_gate", "spatial_mask": "spatial_mask"}

  rd_ratio: float = 1.0 / 16
  rd_divisor: int = 1
  rd_channels: int | None = None
  kernel_size: int = 7
  pool_order: Sequence[str] = ("mean", "max")
  spatial_bn: bool = True
  light: bool = False
  norm: ModuleDef = TorchBatchNorm
  conv: ModuleDef = ops.spatial_conv
  mlp_bias: bool = False
  act: str | Callable = "relu"
  gate: str | Callable = "sigmoid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def setup(self):
    self.channel = CBAMChannel(rd_ratio=self.rd_ratio, rd_divisor=self.rd_divisor,
                               rd_channels=self.rd_channels, light=self.light,
                               mlp_bias=self.mlp_bias, act=self.act, gate=self.gate,
                               dtype=self.dtype, param_dtype=self.param_dtype)
    pool_order = ("mean_max",) if self.light else self.pool_order
    self.spatial = SpatialAttention(kernel_size=self.kernel_size, pool_order=pool_order,
                                    use_bn=self.spatial_bn, norm=self.norm, conv=self.conv,
                                    gate=self.gate, dtype=self.dtype,
                                    param_dtype=self.param_dtype)

  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "channel", "fc1", "kernel")
    return self.spatial(self.channel(x), train)

  def gate_from_pooled(self, mean: Array, top: Array) -> Array:
    """The channel gate (N, 1, 1, C) from the spatial mean and maximum (N, C) of the input."""
    return self.channel.gate_from_pooled(mean, top)

  def after_gate(self, y: Array, train: bool = False) -> Array:
    """The spatial gate applied to ``y``, the input already scaled by the channel gate."""
    return self.spatial(y, train)


_FUSIONS = ("scale", "add", "both")


class GlobalContext(nn.Module):
  """Global Context block: ``x * gate(T_s(c))`` and/or ``x + T_a(c)`` for a context c.

  Context modelling: a 1x1 layer C -> 1 with bias (child ``conv_attn``, kernel initialised
  He-normal as timm does) scores every position, a softmax over the H * W positions turns
  the scores into weights, and ``c`` (N, C) is the weighted sum of the features
  (``use_attn=False`` uses the plain mean instead). Transform ``T``: ``fc1`` C -> rd,
  LayerNorm over rd (epsilon 1e-6, timm's LayerNorm2d), ``act``, ``fc2`` rd -> C, in child
  ``mlp_scale`` for scale fusion and ``mlp_add`` for add fusion (timm's names). Add
  fusion's ``fc2`` starts at zero, so a fresh add-only block is the identity.

  timm's defaults: scale fusion only, ``rd_ratio=1/8`` with divisor 1. ``fuse="add"`` is
  timm's ``"gca"`` (``fuse_add=True, fuse_scale=False``; registered as ``"gca"``), the
  paper's choice. ``fuse="both"`` applies the scale, then adds. Input and output
  (N, H, W, C); sows ``"context_weights"`` (N, H, W, 1) and, with scale fusion,
  ``"channel_gate"`` (N, 1, 1, C).

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"context_weights": "context_weights",
                                            "channel_gate": "channel_gate"}

  fuse: str = "scale"
  use_attn: bool = True
  rd_ratio: float = 1.0 / 8
  rd_divisor: int = 1
  rd_channels: int | None = None
  norm_epsilon: float = 1e-6
  act: str | Callable = "relu"
  gate: str | Callable = "sigmoid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "conv_attn", "kernel")
    check_layout(self, x, f"mlp_{self.fuse}", "fc1", "kernel")
    if self.fuse not in _FUSIONS:
      raise ValueError(
          f"GlobalContext fuse must be one of {_FUSIONS}; got {self.fuse!r}. 'scale' is "
          "timm's default, 'add' the GCNet paper's best.")
    n, height, width, channels = x.shape
    if self.use_attn:
      scores = nn.Dense(1, kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="conv_attn")(x)
      # The softmax runs in float32 so that low-precision inputs still give weights
      # summing to one.
      weights = jax.nn.softmax(scores.reshape(n, height * width).astype(jnp.float32), axis=-1)
      weights = weights.reshape(n, height, width, 1)
      self.sow("intermediates", "context_weights", weights)
      context = jnp.einsum("nhwc,nhw->nc", x, weights[..., 0].astype(x.dtype))
    else:
      context = jnp.mean(x, axis=(1, 2))
    hidden = reduced_width(channels, self.rd_ratio, self.rd_divisor, self.rd_channels)

    def transform(name: str, zero_init_last: bool) -> ChannelMlp:
      return ChannelMlp(hidden, act=self.act, use_norm=True, norm_epsilon=self.norm_epsilon,
                        zero_init_last=zero_init_last, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

    out = x
    if self.fuse in ("scale", "both"):
      gate = get_act(self.gate)(transform("mlp_scale", False)(context))[:, None, None, :]
      self.sow("intermediates", "channel_gate", gate)
      out = out * gate.astype(x.dtype)
    if self.fuse in ("add", "both"):
      delta = transform("mlp_add", True)(context)[:, None, None, :]
      out = out + delta.astype(x.dtype)
    return out
