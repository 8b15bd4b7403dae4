"""Bottleneck Attention Module (BAM): a channel and a spatial branch, summed, as one 3D mask.

Park, Woo, Lee, Kweon, "BAM: Bottleneck Attention Module", BMVC 2018,
https://arxiv.org/abs/1807.06514 (Section 3, Eqs. 1-4, Fig. 2). The authors' PyTorch code:
https://github.com/Jongchan/attention-module (``MODELS/bam.py``).

timm has no BAM. The paper and the authors' released code differ in two places, and both
are fields here:

* Batch norms. The paper puts one BN at the end of each branch ("to adjust the scale"
  of the two outputs before they are added, Eqs. 2 and 3); the released code has none
  there, but a BN + ReLU after every hidden layer, the channel MLP's included.
  ``branch_norm`` switches the paper's end-of-branch BNs, ``mlp_norm`` the code's BN in
  the MLP; the BN + ReLU after the spatial branch's hidden convolutions are always there.
* Combination. The paper sums the branches before the sigmoid (its best in Table 2(b));
  the released code multiplies them (``combine="product"``).

``BAM(branch_norm=False, combine="product")`` is the released code's module, layer for
layer; the defaults are the paper's equations with the code's hidden BNs. Children are
named after the code's modules (``gate_c_fc_0``, ``gate_c_bn_1``, ``gate_c_fc_final``,
``gate_s_conv_reduce0``, ``gate_s_bn_reduce0``, ``gate_s_conv_di_{i}``, ``gate_s_bn_di_{i}``,
``gate_s_conv_final``), so a converted checkpoint maps name for name; the paper's extra
BNs are ``gate_c_bn_final`` and ``gate_s_bn_final``. The channel MLP acts on the pooled
(N, C) vector with ``nn.Dense`` (a PyTorch Linear weight (O, I) is the kernel ``w.T``).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.common import (check_images, check_layout, get_act,
                                          he_normal, reduced_width)
from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.layers.spatial import norm_in_float32

Array = jax.Array
ModuleDef = Callable[..., nn.Module]

# How the two branch outputs meet before the gate (the paper's Table 2(b) compares all
# three; "sum" is its choice, "product" the released code's).
COMBINES = ("sum", "product", "max")

# PyTorch's nn.Linear default: uniform on +-1/sqrt(fan_in).
_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BAM(nn.Module):
  """Bottleneck Attention Module: ``y = x * (1 + gate(Mc(x) + Ms(x)))``.

  Park et al., "BAM: Bottleneck Attention Module", BMVC 2018, arXiv 1807.06514 (Eq. 1:
  ``F' = F + F * M(F)``, Eq. 4: ``M(F) = sigmoid(Mc(F) + Ms(F))``).

  Channel branch (Eq. 2), on the spatial mean ``p`` (N, C) of the input, with ``rd`` =
  ``C * rd_ratio`` (C / 16) hidden units::

      Mc = bn_final(fc_final(act(bn_1(fc_0(p)))))          -> (N, 1, 1, C)

  ``fc_0`` C -> rd and ``fc_final`` rd -> C are Linear layers with bias; ``bn_1`` is there
  with ``mlp_norm`` (the released code), ``bn_final`` with ``branch_norm`` (the paper).

  Spatial branch (Eq. 3)::

      Ms = bn_final(conv_final(h)),  h = act(bn(conv_di_i(...act(bn(conv_reduce0(x))))))

  a 1x1 convolution C -> rd, ``num_dilated`` 3x3 convolutions rd -> rd with dilation
  ``dilation`` (4) and zero padding ``dilation`` (the size is kept), each followed by BN
  and ``act``, and a 1x1 convolution rd -> 1; all with bias; -> (N, H, W, 1).
  ``bn_final`` is there with ``branch_norm``.

  The two are broadcast to (N, H, W, C), combined (``combine``: "sum", the paper's, or
  "product", the released code's, or "max"), gated, and the input is scaled by
  ``1 + M``. Input and output (N, H, W, C). Sows ``"bam_mask"`` (N, H, W, C), the
  mask M applied per channel and position, and the branch outputs before the gate,
  ``"bam_channel"`` Mc (N, 1, 1, C) and ``"bam_spatial"`` Ms (N, H, W, 1) (logits,
  not in [0, 1]).

  Parameters for C channels, rd hidden (defaults): channel ``2 * C * rd + rd + C`` weights
  and biases, ``2 * rd`` (``mlp_norm``) and ``2 * C`` (``branch_norm``) BN parameters;
  spatial ``C * rd + rd + num_dilated * (9 * rd * rd + rd) + rd + 1`` plus
  ``2 * rd * (1 + num_dilated)`` BN parameters and 2 more with ``branch_norm``. For
  C = 256 (rd = 16): 17,361 as released, 17,875 with the paper's two BNs.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    rd_ratio, rd_divisor, rd_channels: the hidden width ``rd`` of both branches
      (:func:`~attention_flax.layers.common.reduced_width`; divisor 1 gives the paper's
      C / r for channel counts divisible by r = 16).
    dilation: dilation and padding of the 3x3 convolutions (the paper's d = 4).
    num_dilated: how many dilated 3x3 convolutions (2).
    mlp_norm: BN + act after the channel MLP's hidden layer (released code), else act.
    branch_norm: BN at the end of each branch (the paper's Eqs. 2 and 3).
    combine: "sum" (paper), "product" (released code) or "max".
    norm: factory of every BN, called with ``use_running_average``, ``dtype``,
      ``param_dtype`` and ``name`` (default :class:`TorchBatchNorm`: PyTorch's momentum,
      epsilon and running-variance rule); the BNs compute in float32.
    conv: factory of the spatial convolutions, ``flax.linen.Conv``'s signature
      (default :data:`attention_flax.ops.conv`); kernels start He-normal (fan-out) as
      the authors initialise their convolutions, biases at zero.
    act: hidden activation (ReLU); gate: the gate (sigmoid).
    dtype: compute dtype of the layers; the mask is applied in the input's dtype.
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect). The branch
  # logits are kinds of their own, drawn by shape (a gate and a mask).
  maps: ClassVar[dict[str, str]] = {"bam_mask": "residual_mask",
                                    "bam_channel": "channel_logits",
                                    "bam_spatial": "spatial_logits"}

  rd_ratio: float = 1.0 / 16
  rd_divisor: int = 1
  rd_channels: int | None = None
  dilation: int = 4
  num_dilated: int = 2
  mlp_norm: bool = True
  branch_norm: bool = True
  combine: str = "sum"
  norm: ModuleDef = TorchBatchNorm
  conv: ModuleDef = ops.conv
  act: str | Callable = "relu"
  gate: str | Callable = "sigmoid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _check(self) -> None:
    name = type(self).__name__
    if self.combine not in COMBINES:
      raise ValueError(f"{name} combine must be one of {COMBINES}; got {self.combine!r}. "
                       "'sum' is the paper's, 'product' the authors' released code.")
    if not isinstance(self.dilation, int) or self.dilation < 1:
      raise ValueError(f"{name} dilation must be a positive integer (the paper's 4); got "
                       f"{self.dilation!r}.")
    if not isinstance(self.num_dilated, int) or self.num_dilated < 0:
      raise ValueError(f"{name} num_dilated must be a non-negative integer (the paper's 2); "
                       f"got {self.num_dilated!r}.")

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "gate_c_fc_0", "kernel")
    self._check()
    hidden = reduced_width(x.shape[-1], self.rd_ratio, self.rd_divisor, self.rd_channels)
    channel = self._channel_branch(jnp.mean(x, axis=(1, 2)), hidden, train)
    spatial = self._spatial_branch(x, hidden, train)
    self.sow("intermediates", "bam_channel", channel)
    self.sow("intermediates", "bam_spatial", spatial)
    if self.combine == "sum":
      logits = channel + spatial
    elif self.combine == "product":
      logits = channel * spatial
    else:
      logits = jnp.maximum(channel, spatial)
    mask = get_act(self.gate)(logits)
    self.sow("intermediates", "bam_mask", mask)
    return x * (1 + mask.astype(x.dtype))

  def _bn(self, y: Array, train: bool, name: str) -> Array:
    return norm_in_float32(self.norm, y, train, self.param_dtype, name)

  def _channel_branch(self, pooled: Array, hidden: int, train: bool) -> Array:
    """Mc (N, 1, 1, C) from the spatial mean (N, C) of the input (Eq. 2)."""
    act = get_act(self.act)

    def dense(features: int, name: str) -> nn.Dense:
      return nn.Dense(features, kernel_init=_linear_init, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)

    y = dense(hidden, "gate_c_fc_0")(pooled)
    if self.mlp_norm:
      y = self._bn(y, train, "gate_c_bn_1")
    y = dense(pooled.shape[-1], "gate_c_fc_final")(act(y))
    if self.branch_norm:
      y = self._bn(y, train, "gate_c_bn_final")
    return y[:, None, None, :]

  def _spatial_branch(self, x: Array, hidden: int, train: bool) -> Array:
    """Ms (N, H, W, 1) from the input (N, H, W, C) (Eq. 3)."""
    act = get_act(self.act)
    d = self.dilation

    def conv(features: int, size: int, name: str, **kwargs: Any) -> nn.Module:
      pad = (size // 2) * d if size > 1 else 0
      return self.conv(features, (size, size), padding=[(pad, pad), (pad, pad)],
                       use_bias=True, kernel_init=he_normal, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name, **kwargs)

    y = conv(hidden, 1, "gate_s_conv_reduce0")(x)
    y = act(self._bn(y, train, "gate_s_bn_reduce0"))
    for i in range(self.num_dilated):
      y = conv(hidden, 3, f"gate_s_conv_di_{i}", kernel_dilation=(d, d))(y)
      y = act(self._bn(y, train, f"gate_s_bn_di_{i}"))
    y = conv(1, 1, "gate_s_conv_final")(y)
    if self.branch_norm:
      y = self._bn(y, train, "gate_s_bn_final")
    return y
