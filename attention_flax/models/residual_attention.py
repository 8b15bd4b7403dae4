"""Residual Attention Networks: Attention-56 / Attention-92 for ImageNet and CIFAR.

Wang et al., "Residual Attention Network for Image Classification", CVPR 2017,
https://arxiv.org/abs/1704.06904. ImageNet structure from the paper's Table 2 and the
authors' Caffe prototxts; CIFAR structure from Section 4.1.

ImageNet (224x224 input; Table 2):

  stem    conv 7x7/2, 64 -> BN -> ReLU -> max-pool 3x3/2                112 -> 56
  stage1  unit -> 256,        attention modules (levels 3)              56x56
  stage2  unit /2 -> 512,     attention modules (levels 2)              28x28
  stage3  unit /2 -> 1024,    attention modules (levels 1)              14x14
  stage4  unit /2 -> 2048, two more units                               7x7
  head    BN -> ReLU -> global average pool -> FC

Attention-56 has 1, 1, 1 modules and Attention-92 1, 2, 3 (each module is 12 weighted
layers deep along its trunk: p + t + p = 4 units). The prototxts confirm the three
2048-wide units at the end (``post_res_4_1..3``) and the BN-ReLU on the max-pooled stem
(here the first unit's ``bn1``). Parameter counts of this structure: Attention-56
31,810,728 (paper: 31.9M, -0.3%), Attention-92 52,466,344 (paper: 51.3M, +2.3%); the
released Attention-92 prototxt has exactly this structure, so the gap lies in the paper's
counting, not in a missing layer. Multiply-adds at 224x224 (convolutions and FC): 6.27G
(paper: 6.2G) and 10.53G (paper: 10.4G).

CIFAR (32x32 input; Section 4.1): three stages, the same number ``m`` of modules in each and
"two Residual Units at each stage", trunk depth ``36 m + 20`` (m = 1: Attention-56, m = 2:
Attention-92). Widths follow the pre-activation ResNet-164 that the paper compares with:
bottlenecks 16, 32, 64 wide, outputs 64, 128, 256. The two extra units of a stage are placed
one before the modules (changing width and stride) and one after them. Mask levels 3, 2, 1
pool every stage down to 4x4, as the ImageNet levels pool every stage down to 7x7. The stem
is a bare 3x3 convolution to 16 channels (the first unit pre-activates it, as in pre-act
ResNets). With a 100-class head this gives 1,864,372 parameters for Attention-92 (paper:
1.9M) and, with m = 6, 5,107,892 for Attention-236 (paper: 5.1M), which supports the
reading; with 10 classes Attention-92 has 1,841,242.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.common import get_act, he_normal
from attention_flax.layers.norm import TorchBatchNorm, batch_norm
from attention_flax.layers.residual import ResidualAttention, ResidualUnit
from attention_flax.models.common import ModelEntry, check_model_images

Array = jax.Array


class ResidualAttentionNet(nn.Module):
  """A stem, stages of [unit, attention modules, units], optional plain stage, classifier.

  Stage ``i`` (from 1) is a :class:`ResidualUnit` to ``stage_widths[i-1]`` with stride
  ``stage_strides[i-1]`` (child ``stage{i}_unit1``), ``stage_modules[i-1]`` attention modules
  with ``stage_levels[i-1]`` poolings (``stage{i}_attn{j}``), then ``units_after`` units
  keeping the width (``stage{i}_unit2..``). If ``final_units > 0`` a last stage of plain
  units follows (the first to ``final_width`` with ``final_stride``). Every stage output is
  sown as ``"stage{i}"``; the modules sow their ``"residual_mask"``.

  Input (N, H, W, in_channels) images; output (N, num_classes) float32 logits. Any H, W
  works; with the ImageNet stem, multiples of 32 keep every level of the masks aligned.
  ``conv``, ``norm`` and ``pool`` are the factories of every convolution, batch norm and
  max pool (``flax.linen.Conv``, ``flax.linen.BatchNorm`` and ``flax.linen.max_pool``
  signatures). ``naive=True`` makes every attention module output ``M * T`` (the paper's
  naive attention learning) instead of ``(1 + M) * T``.
  """
  num_classes: int = 1000
  stage_widths: Sequence[int] = (256, 512, 1024)
  stage_modules: Sequence[int] = (1, 1, 1)
  stage_levels: Sequence[int] = (3, 2, 1)
  stage_strides: Sequence[int] = (1, 2, 2)
  units_after: int = 0
  final_width: int = 2048
  final_units: int = 3
  final_stride: int = 2
  stem_width: int = 64
  stem_kernel: int = 7
  stem_stride: int = 2
  stem_norm: bool = True
  stem_pool: bool = True
  p: int = 1
  t: int = 2
  r: int = 1
  bottleneck_ratio: int = 4
  naive: bool = False
  align_corners: bool = False
  act: str | Callable = "relu"
  gate: str | Callable = "sigmoid"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  norm: Callable[..., nn.Module] = TorchBatchNorm
  conv: Callable[..., nn.Module] = ops.conv
  pool: Callable[..., Array] = nn.max_pool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check(self) -> None:
    name = type(self).__name__
    lengths = {len(self.stage_widths), len(self.stage_modules), len(self.stage_levels),
               len(self.stage_strides)}
    if len(lengths) != 1:
      raise ValueError(
          f"{name}: stage_widths, stage_modules, stage_levels and stage_strides need one "
          f"entry per stage; got lengths {len(self.stage_widths)}, {len(self.stage_modules)}, "
          f"{len(self.stage_levels)}, {len(self.stage_strides)}.")
    if self.stem_kernel < 1 or self.stem_kernel % 2 == 0:
      raise ValueError(f"{name}.stem_kernel must be odd so the padding is symmetric; got "
                       f"{self.stem_kernel}.")
    if min(self.stage_modules, default=0) < 0 or self.units_after < 0 or self.final_units < 0:
      raise ValueError(f"{name}: module and unit counts must be >= 0.")
    if self.num_classes < 1:
      raise ValueError(f"{name}.num_classes must be >= 1; got {self.num_classes}.")

  def _norm_act(self, x: Array, name: str, train: bool) -> Array:
    x = batch_norm(self.norm, x, name=name, use_running_average=not train,
                   momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
                   param_dtype=self.param_dtype)
    return get_act(self.act)(x)

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    check_model_images(x, type(self).__name__)
    self._check()
    common = dict(bottleneck_ratio=self.bottleneck_ratio, act=self.act,
                  bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                  norm=self.norm, conv=self.conv, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    unit = functools.partial(ResidualUnit, **common)
    attention = functools.partial(ResidualAttention, p=self.p, t=self.t, r=self.r,
                                  naive=self.naive, align_corners=self.align_corners,
                                  gate=self.gate, pool=self.pool, **common)

    k = self.stem_kernel
    pad = (k - 1) // 2
    x = self.conv(self.stem_width, (k, k), strides=(self.stem_stride, self.stem_stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
                  param_dtype=self.param_dtype, kernel_init=he_normal, name="stem_conv")(x)
    if self.stem_norm:
      x = self._norm_act(x, "stem_bn", train)
    if self.stem_pool:
      x = self.pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    stages = zip(self.stage_widths, self.stage_modules, self.stage_levels, self.stage_strides)
    for i, (width, modules, levels, stride) in enumerate(stages, start=1):
      x = unit(features=width, stride=stride, name=f"stage{i}_unit1")(x, train)
      for j in range(modules):
        x = attention(levels=levels, name=f"stage{i}_attn{j + 1}")(x, train)
      for j in range(self.units_after):
        x = unit(name=f"stage{i}_unit{j + 2}")(x, train)
      self.sow("intermediates", f"stage{i}", x)

    if self.final_units:
      i = len(self.stage_widths) + 1
      for j in range(self.final_units):
        first = j == 0
        x = unit(features=self.final_width if first else None,
                 stride=self.final_stride if first else 1, name=f"stage{i}_unit{j + 1}")(x, train)
      self.sow("intermediates", f"stage{i}", x)

    x = self._norm_act(x, "final_bn", train)
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="head")(x)
    return logits.astype(jnp.float32)


attention56 = functools.partial(ResidualAttentionNet, stage_modules=(1, 1, 1))
attention92 = functools.partial(ResidualAttentionNet, stage_modules=(1, 2, 3))

_cifar = functools.partial(
    ResidualAttentionNet, num_classes=10, stage_widths=(64, 128, 256),
    stage_levels=(3, 2, 1), stage_strides=(1, 2, 2), units_after=1, final_units=0,
    stem_width=16, stem_kernel=3, stem_stride=1, stem_norm=False, stem_pool=False)
attention56_cifar = functools.partial(_cifar, stage_modules=(1, 1, 1))
attention92_cifar = functools.partial(_cifar, stage_modules=(2, 2, 2))

# Tiny variants for the test suite: every structural feature, few channels.
attention_tiny = functools.partial(
    ResidualAttentionNet, num_classes=10, stage_widths=(16, 32), stage_modules=(1, 1),
    stage_levels=(2, 1), stage_strides=(1, 2), final_width=64, final_units=1, stem_width=8)
attention_tiny_cifar = functools.partial(
    _cifar, stage_widths=(8, 16, 32), stage_modules=(1, 1, 1), stage_levels=(2, 1, 1),
    stem_width=4)

_PAPER = "Wang et al. 2017, Residual Attention Network (arXiv 1704.06904)"

MODELS: dict[str, ModelEntry] = {
    "attention56": ModelEntry(
        attention56, 224, paper=f"{_PAPER}, Table 2: Attention-56 (31.9M params, 6.2G FLOPs)"),
    "attention92": ModelEntry(
        attention92, 224, paper=f"{_PAPER}, Table 2: Attention-92 (51.3M params, 10.4G FLOPs)"),
    "attention56_cifar": ModelEntry(
        attention56_cifar, 32, paper=f"{_PAPER}, Sec. 4.1: Attention-56 on CIFAR (36m+20, m=1)"),
    "attention92_cifar": ModelEntry(
        attention92_cifar, 32,
        paper=f"{_PAPER}, Sec. 4.1 and CIFAR results table: Attention-92 (1.9M params)"),
    "attention_tiny": ModelEntry(attention_tiny, 64, paper=_PAPER, test_only=True),
    "attention_tiny_cifar": ModelEntry(attention_tiny_cifar, 32, paper=_PAPER, test_only=True),
}
