"""ResNeSt: ResNet-D with split-attention bottlenecks.

Zhang et al., "ResNeSt: Split-Attention Networks", https://arxiv.org/abs/2004.08955
(Section 4: ResNeSt-50 is 2s1x64d on ResNet-D). The networks are timm's ``resnest14d``,
``resnest26d`` and ``resnest50d`` (``timm/models/resnest.py``): the ResNet-D trunk of
:mod:`attention_flax.models.resnet` (deep stem 32-32-64, average-pool downsampling
shortcuts) with :class:`ResNestBottleneck` blocks whose 3x3 convolution is a
:class:`~attention_flax.layers.split.SplitAttention` unit (radix 2, cardinality 1, base
width 64), and the stride of a downsampling block moved to a 3x3 average pool after that
unit ("avd", the paper's Section 4.1 "Average Downsampling").

Naming follows timm's state dict with "." before an index replaced by "_"
(``layer2_0/conv2/fc1``, ``layer2_0/downsample_1``), so
:func:`attention_flax.convert.from_timm` maps timm weights one to one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import jax
import numpy as np
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.common import check_images
from attention_flax.layers.norm import batch_norm
from attention_flax.layers.split import SplitAttention
from attention_flax.models.common import ModelEntry
from attention_flax.models.resnet import ResidualBlock, ResNet, padding

Array = jax.Array


def avg_pool_3x3(x: Array, stride: int) -> Array:
  """PyTorch's AvgPool2d(3, stride, padding=1) (zeros counted in the mean) on (N, H, W, C):
  output size ``(H - 1) // stride + 1``."""
  sums = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, (1, 3, 3, 1),
                               (1, stride, stride, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sums / np.asarray(9, x.dtype)


class ResNestBottleneck(ResidualBlock):
  """ResNeSt bottleneck (Zhang et al. 2020, arXiv 2004.08955, Fig. 2 right and Section 4.1).

  conv1 (1x1) -> bn1 -> act -> [avg pool] -> conv2 (:class:`SplitAttention`, 3x3) ->
  [avg pool] -> conv3 (1x1) -> bn3 -> ATTN -> (+ shortcut) -> act. Maps (N, H, W, C) to
  (N, H / strides, W / strides, 4 * features). The inner width is
  ``int(features * base_width / 64) * cardinality``.

  With ``avd`` a strided block keeps conv2 at stride 1 and downsamples with a 3x3 average
  pool (PyTorch's ``AvgPool2d(3, strides, padding=1)``), after conv2 or, with
  ``avd_first``, before it. The defaults are those of timm's ``resnest14d/26d/50d``. The
  shortcut, the attention slot (``attn``, after bn3) and the tail are
  :class:`~attention_flax.models.resnet.ResidualBlock`'s.

  Attributes (beyond :class:`~attention_flax.models.resnet.ResidualBlock`'s):
    radix: splits of the split-attention unit (1: a sigmoid-gated grouped conv).
    cardinality: cardinal groups of the split-attention unit.
    base_width: width per cardinal group at ``features == 64``.
    avd, avd_first: average downsampling and its place (see above).
  """
  expansion: ClassVar[int] = 4
  default_tail: ClassVar[Callable[..., Array]] = staticmethod(ops.bottleneck_tail)

  radix: int = 2
  cardinality: int = 1
  base_width: int = 64
  avd: bool = True
  avd_first: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    conv, norm, act = self._layers(train)
    width = int(self.features * (self.base_width / 64.0)) * self.cardinality
    avd_stride = self.strides if self.avd and self.strides > 1 else 0
    y = conv(width, (1, 1), padding=padding(1), name="conv1")(x)
    y = act(batch_norm(norm, y, name="bn1"))
    if avd_stride and self.avd_first:
      y = avg_pool_3x3(y, avd_stride)
    y = SplitAttention(
        features=width, radix=self.radix, groups=self.cardinality,
        strides=1 if avd_stride else self.strides, act=self.act, norm=self.norm,
        conv=self.conv, dtype=self.dtype, param_dtype=self.param_dtype,
        name="conv2")(y, train=train)
    if avd_stride and not self.avd_first:
      y = avg_pool_3x3(y, avd_stride)
    y = conv(self.features * self.expansion, (1, 1), padding=padding(1), name="conv3")(y)
    return self._end(x, y, conv, norm, train, "bn3")


def resnest(stage_sizes: tuple[int, ...], **fields: Any) -> Callable[..., ResNet]:
  """The factory of a ResNeSt-D: ResNet with :class:`ResNestBottleneck`, the deep stem
  32-32-64 and average-pool shortcuts, plus any further ResNet ``fields``."""
  fields = {"block": ResNestBottleneck, "stem": "deep", "stem_width": 64, "down": "avg",
            **fields}
  return functools.partial(ResNet, stage_sizes=stage_sizes, **fields)


_ZHANG = "Zhang et al. 2020 (ResNeSt), arXiv 2004.08955"

MODELS: dict[str, ModelEntry] = {
    "resnest14d": ModelEntry(resnest((1, 1, 1, 1)), 224,
                             paper=f"{_ZHANG}; timm's ResNeSt-14d (2s1x64d, deep stem, avg down)"),
    "resnest26d": ModelEntry(resnest((2, 2, 2, 2)), 224,
                             paper=f"{_ZHANG}; timm's ResNeSt-26d (2s1x64d, deep stem, avg down)"),
    "resnest50d": ModelEntry(resnest((3, 4, 6, 3)), 224,
                             paper=f"{_ZHANG}, ResNeSt-50 (2s1x64d, deep stem, avg down)"),
    # Two bottlenecks, the second strided (average downsampling), for fast tests.
    "test_resnest_tiny": ModelEntry(
        resnest((1, 1), widths=(4, 8), stem_width=16), 26, test_only=True),
}
