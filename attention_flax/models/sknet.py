"""Selective Kernel ResNets: the block's 3x3 convolution replaced by a Selective Kernel one.

Li, Wang, Hu & Yang, "Selective Kernel Networks", CVPR 2019, https://arxiv.org/abs/1903.06586
(SKNet-50: Table 1, a ResNeXt-50 32x4d whose grouped 3x3 convolution is an SK unit of two
branches, 3x3 and dilated 3x3, attention width max(C / 16, 32)).
The networks are timm's ``skresnet18``, ``skresnet34`` and ``skresnext50_32x4d`` (timm 1.0):
the ResNet trunk of :mod:`attention_flax.models.resnet` (stem, stages, shortcuts, ``fc``)
with the blocks below. timm's basic-block variants split the input channels between the
two branches (not in the paper) to keep the parameter count near ResNet's.

Naming follows timm's state dict with "." -> "_": ``layer1_0/conv1/paths_0/conv``,
``layer1_0/conv1/attn/fc_select``, ``layer1_0/conv2/bn``, ``layer2_0/downsample_0``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar

import jax
from flax import linen as nn

from attention_flax.layers import create_attention
from attention_flax.layers.common import check_images
from attention_flax.layers.selective import ConvBnAct, SelectiveKernel
from attention_flax.models.common import ModelEntry
from attention_flax.models.resnet import ResidualBlock, ResNet, shortcut

Array = jax.Array


class SelectiveKernelBlock(ResidualBlock):
  """Fields shared by the SK blocks: those of :class:`ResidualBlock` and the SK unit's.

  Attributes:
    rd_ratio, rd_divisor: width of the SK attention, ``make_divisible(width * rd_ratio,
      rd_divisor)``.
    split_input: the SK branches each see C / 2 input channels.
    cardinality, base_width: ResNeXt's groups and width per group (bottleneck only).

  The end of the block is ``act(attn(bn(y)) + shortcut(x))`` with ``bn`` inside the last
  conv-BN child (timm's names), applied layer by layer: ``tail`` is not used.
  """
  rd_ratio: float = 1.0 / 16
  rd_divisor: int = 8
  split_input: bool = True
  cardinality: int = 1
  base_width: int = 64

  def _sk(self, features: int, name: str) -> SelectiveKernel:
    return SelectiveKernel(
        features, strides=self.strides, groups=self.cardinality, rd_ratio=self.rd_ratio,
        rd_divisor=self.rd_divisor, split_input=self.split_input, conv=self.conv,
        norm=self.norm, act=self.act, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)

  def _conv_bn(self, features: int, kernel_size: int, name: str,
               apply_act: bool = True, last: bool = False) -> ConvBnAct:
    norm = self.norm
    if last and self.zero_init_last:
      norm = functools.partial(norm, scale_init=nn.initializers.zeros_init())
    return ConvBnAct(features, kernel_size, apply_act=apply_act, conv=self.conv, norm=norm,
                     act=self.act, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _finish(self, x: Array, y: Array, train: bool) -> Array:
    """act(ATTN(y) + shortcut(x)); y is the residual branch after its last BN."""
    if self.attn is not None:
      kwargs = {"dtype": self.dtype, "param_dtype": self.param_dtype,
                **dict(self.attn_kwargs or {})}
      y = create_attention(self.attn, name="se", **kwargs)(y, train=train)
    conv, norm, act = self._layers(train)
    short = shortcut(x, self.features * self.expansion, self.strides, self.down, conv, norm)
    return act(y + short.astype(y.dtype))


class SelectiveKernelBasic(SelectiveKernelBlock):
  """timm's ``SelectiveKernelBasic``: SK conv (strided) then conv-bn, ATTN, + shortcut, act.

  Maps (N, H, W, C) to (N, H / strides, W / strides, features). Children ``conv1``
  (:class:`~attention_flax.layers.selective.SelectiveKernel`) and ``conv2`` (3x3 conv-BN).
  Defaults are timm's ``skresnet18``/``skresnet34``: rd_ratio 1/8, divisor 16, split input.
  """
  expansion: ClassVar[int] = 1
  rd_ratio: float = 1.0 / 8
  rd_divisor: int = 16

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    if self.cardinality != 1 or self.base_width != 64:
      raise ValueError("SelectiveKernelBasic has no groups: cardinality must be 1 and "
                       "base_width 64; use SelectiveKernelBottleneck for ResNeXt widths.")
    y = self._sk(self.features, "conv1")(x, train)
    y = self._conv_bn(self.features, 3, "conv2", apply_act=False, last=True)(y, train)
    return self._finish(x, y, train)


class SelectiveKernelBottleneck(SelectiveKernelBlock):
  """timm's ``SelectiveKernelBottleneck``: 1x1 conv-bn-act, SK conv (strided, grouped),
  1x1 conv-bn, ATTN, + shortcut, act.

  Maps (N, H, W, C) to (N, H / strides, W / strides, 4 * features); the inner width is
  ``floor(features * base_width / 64) * cardinality``. Children ``conv1``, ``conv2``
  (the SK unit), ``conv3``. Defaults are timm's ``skresnet50`` (split input, rd 1/16,
  divisor 8); :class:`SelectiveKernelXBottleneck` is SKNet-50's.
  """
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    width = math.floor(self.features * self.base_width / 64) * self.cardinality
    y = self._conv_bn(width, 1, "conv1")(x, train)
    y = self._sk(width, "conv2")(y, train)
    y = self._conv_bn(self.features * self.expansion, 1, "conv3", apply_act=False,
                      last=True)(y, train)
    return self._finish(x, y, train)


class SelectiveKernelXBottleneck(SelectiveKernelBottleneck):
  """The SKNet-50 bottleneck (timm's ``skresnext50_32x4d``): ResNeXt 32x4d widths, each SK
  branch on the whole input, attention width ``make_divisible(width / 16, 32)``."""
  rd_divisor: int = 32
  split_input: bool = False
  cardinality: int = 32
  base_width: int = 4


def sk_resnet(stage_sizes: tuple[int, ...], block: type[nn.Module], **fields: Any
              ) -> Callable[..., ResNet]:
  """The factory of a ResNet of SK ``block``s; timm's SK nets start every BN scale at 1."""
  return functools.partial(ResNet, stage_sizes=stage_sizes, block=block,
                           **{"zero_init_last": False, **fields})


_SK = "Li et al. 2019 (SKNet), arXiv 1903.06586"

MODELS: dict[str, ModelEntry] = {
    "skresnet18": ModelEntry(sk_resnet((2, 2, 2, 2), SelectiveKernelBasic), 224,
                             paper=f"{_SK}, SK units in ResNet-18 (timm, split input)"),
    "skresnet34": ModelEntry(sk_resnet((3, 4, 6, 3), SelectiveKernelBasic), 224,
                             paper=f"{_SK}, SK units in ResNet-34 (timm, split input)"),
    "skresnext50_32x4d": ModelEntry(sk_resnet((3, 4, 6, 3), SelectiveKernelXBottleneck), 224,
                                    paper=f"{_SK}, Table 1 (SKNet-50)"),
    "test_skresnet_tiny": ModelEntry(
        sk_resnet((1, 1), SelectiveKernelBasic, widths=(8, 16)), 32, test_only=True),
}
