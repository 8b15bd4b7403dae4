"""Selective Kernel: convolution branches of different receptive fields, mixed per channel.

Li, Wang, Hu & Yang, "Selective Kernel Networks", CVPR 2019, https://arxiv.org/abs/1903.06586.
Split (Sec. 3.1): the input goes through ``P`` conv-BN-ReLU branches ``U_p`` of different
kernel sizes (a 5x5 kernel is a 3x3 one with dilation 2). Fuse: ``s = mean_hw(sum_p U_p)``,
``z = relu(bn(fc_reduce(s)))`` (Eq. 1-2). Select: ``a_p = softmax_p(fc_select(z))_p``, per
channel (Eq. 3), and ``V = sum_p a_p * U_p`` (Eq. 4).

The defaults are timm's ``SelectiveKernel`` (timm 1.0): two branches 3x3 dilation 1 and
3x3 dilation 2 (``keep_3x3``), the input channels split evenly between the branches
(``split_input``, timm's change to keep the parameter count low), attention width
``make_divisible(out * rd_ratio, rd_divisor)``. Child names follow timm's state dict:
``paths_{p}/conv``, ``paths_{p}/bn``, ``attn/fc_reduce``, ``attn/bn``, ``attn/fc_select``;
the two 1x1 convolutions of the attention act on pooled (N, C) vectors as ``nn.Dense``
without bias (a timm weight (O, I, 1, 1) is the kernel ``w[:, :, 0, 0].T``).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

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


def conv_padding(kernel_size: int, strides: int = 1, dilation: int = 1) -> list[tuple[int, int]]:
  """timm's symmetric padding ``((strides - 1) + dilation * (kernel_size - 1)) // 2`` on
  every side of H and W (PyTorch pads both sides alike; Flax's "SAME" may not)."""
  p = ((strides - 1) + dilation * (kernel_size - 1)) // 2
  return [(p, p), (p, p)]


def branch_kernels(kernel_size: int | Sequence[int] | None = None, dilation: int = 1,
                   keep_3x3: bool = True) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The kernel sizes and dilations of the branches, as timm derives them.

  ``kernel_size`` None means (3, 5); one int k means two branches of k. With ``keep_3x3``
  a k x k branch becomes a 3x3 one of dilation ``dilation * (k - 1) // 2`` (same receptive
  field): (3, 5) -> kernels (3, 3), dilations (1, 2). Returns ``(kernels, dilations)``.

  Raises:
    ValueError: a kernel size that is not odd and >= 3.
  """
  if kernel_size is None:
    kernel_size = (3, 5)
  kernels = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
  if len(kernels) < 1 or any(not isinstance(k, int) or k < 3 or k % 2 == 0 for k in kernels):
    raise ValueError(f"SelectiveKernel branch kernels must be odd and >= 3, e.g. (3, 5); "
                     f"got {kernel_size!r}.")
  if keep_3x3:
    return (3,) * len(kernels), tuple(dilation * (k - 1) // 2 for k in kernels)
  return kernels, (dilation,) * len(kernels)


class ConvBnAct(nn.Module):
  """Convolution without bias, batch norm, optional activation (timm's ``ConvNormAct``,
  children ``conv`` and ``bn``). (N, H, W, C) -> (N, H / strides, W / strides, features).

  The norm runs in float32 and hands back the convolution's dtype. Attributes as
  :class:`SelectiveKernel`; ``apply_act=False`` leaves the normalised map as it is.
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  dilation: int = 1
  groups: int = 1
  apply_act: bool = True
  conv: ModuleDef = ops.conv
  norm: ModuleDef = TorchBatchNorm
  act: str | Callable = "relu"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    k = self.kernel_size
    y = self.conv(self.features, (k, k), strides=self.strides,
                  padding=conv_padding(k, self.strides, self.dilation),
                  kernel_dilation=self.dilation, feature_group_count=self.groups,
                  use_bias=False, kernel_init=he_normal, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="conv")(x)
    y = norm_in_float32(self.norm, y, train, self.param_dtype, "bn")
    return get_act(self.act)(y) if self.apply_act else y


class SelectiveKernelAttn(nn.Module):
  """SK's fuse and select steps (timm's ``SelectiveKernelAttn``): per-channel softmax
  weights over the branches.

  Takes the stacked branch outputs (N, P, H, W, C) and returns the weights (N, P, C),
  which sum to 1 over P: ``softmax_P(fc_select(act(bn(fc_reduce(mean_hw(sum_P x))))))``,
  ``fc_reduce`` C -> ``rd_channels``, ``fc_select`` -> P * C read as (P, C). Sows them as
  ``"branch_weights"`` (N, P, C).
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"branch_weights": "branch_weights"}

  rd_channels: int
  norm: ModuleDef = TorchBatchNorm
  act: str | Callable = "relu"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if getattr(x, "ndim", None) != 5:
      raise ValueError(f"{type(self).__name__} expects stacked branches (N, P, H, W, C); got "
                       f"shape {getattr(x, 'shape', None)}.")
    _, paths, _, _, channels = x.shape
    pooled = jnp.mean(jnp.sum(x, axis=1), axis=(1, 2))
    z = nn.Dense(self.rd_channels, use_bias=False, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc_reduce")(pooled)
    z = get_act(self.act)(norm_in_float32(self.norm, z, train, self.param_dtype, "bn"))
    logits = nn.Dense(paths * channels, use_bias=False, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="fc_select")(z)
    weights = jax.nn.softmax(logits.reshape(-1, paths, channels).astype(jnp.float32), axis=1)
    self.sow("intermediates", "branch_weights", weights)
    return weights


class SelectiveKernel(nn.Module):
  """Selective Kernel convolution (Li et al. 2019): replaces a k x k convolution.

  Maps (N, H, W, C) to (N, H / strides, W / strides, features); ``features`` None keeps C.
  Each branch p is conv-BN-act (child ``paths_{p}``, a :class:`ConvBnAct`) on the whole
  input or, with ``split_input``, on its p-th slice of C / P channels; the outputs U_p are
  weighted per channel by the softmax over branches of child ``attn``
  (:class:`SelectiveKernelAttn`, which sows ``"branch_weights"`` (N, P, features)) and
  summed. Used as an attention layer it returns that sum (not a gated copy of x).

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    features: output channels; None = the input's.
    kernel_size: branch kernel sizes; None = (3, 5); see :func:`branch_kernels`.
    strides: stride of every branch.
    dilation: dilation of the module, multiplied into every branch's.
    groups: groups of every branch convolution (at most ``features``).
    rd_ratio, rd_divisor, rd_channels: attention width ``rd_channels`` or
      ``make_divisible(features * rd_ratio, rd_divisor, round_limit=0.9)`` (timm's).
    keep_3x3: every branch a 3x3 kernel, larger kernels becoming dilations.
    split_input: split the input channels evenly between the branches (C % P == 0).
    conv, norm, act: factories of the branch convolutions (``flax.linen.Conv``'s
      signature), of all batch norms (called with ``use_running_average``, ``dtype``,
      ``param_dtype``, ``name``), and the activation of branches and attention.
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"branch_weights": "branch_weights"}

  features: int | None = None
  kernel_size: int | Sequence[int] | None = None
  strides: int = 1
  dilation: int = 1
  groups: int = 1
  rd_ratio: float = 1.0 / 16
  rd_divisor: int = 8
  rd_channels: int | None = None
  keep_3x3: bool = True
  split_input: bool = True
  conv: ModuleDef = ops.conv
  norm: ModuleDef = TorchBatchNorm
  act: str | Callable = "relu"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    kernels, dilations = branch_kernels(self.kernel_size, self.dilation, self.keep_3x3)
    # The branch kernels are (k, k, C / (groups * paths with split_input), features).
    groups = self.groups if self.features is None else min(self.features, self.groups)
    check_layout(self, x, "paths_0", "conv", "kernel",
                 groups=groups * (len(kernels) if self.split_input else 1))
    paths, in_features = len(kernels), x.shape[-1]
    features = self.features or in_features
    if self.split_input and in_features % paths:
      raise ValueError(f"{type(self).__name__} with split_input divides the {in_features} "
                       f"input channels between {paths} branches; use a multiple of "
                       f"{paths} or split_input=False.")
    inputs = jnp.split(x, paths, axis=-1) if self.split_input else [x] * paths
    branches = [
        ConvBnAct(features, k, self.strides, d, min(features, self.groups), conv=self.conv,
                  norm=self.norm, act=self.act, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"paths_{p}")(xp, train)
        for p, (xp, k, d) in enumerate(zip(inputs, kernels, dilations))]
    stacked = jnp.stack(branches, axis=1)
    # timm's make_divisible with its 0.9 round limit (the channel attentions use none).
    rd = self.rd_channels or make_divisible(features * self.rd_ratio, self.rd_divisor,
                                            round_limit=0.9)
    weights = SelectiveKernelAttn(rd, norm=self.norm, act=self.act, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name="attn")(stacked, train)
    weights = weights.astype(stacked.dtype)[:, :, None, None, :]
    return jnp.sum(stacked * weights, axis=1)


__all__ = ["ConvBnAct", "SelectiveKernel", "SelectiveKernelAttn", "branch_kernels",
           "conv_padding"]
