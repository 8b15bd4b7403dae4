"""Spatial transformer classifiers (Jaderberg et al., NIPS 2015), https://arxiv.org/abs/1506.02025

:class:`STNClassifier` puts a :class:`~attention_flax.layers.transformer.SpatialTransformer`
in front of any backbone factory. The ST-CNN of the paper's distorted-MNIST experiments
(Table 1) is that wrapper around :class:`DigitsCNN`, a small CNN in the spirit of the
paper's baseline (two 9 x 9 convolution + 2 x 2 max-pool stages, then a linear classifier;
the widths 32 and 64 are this package's choice). ``cnn_digits`` registers the same CNN
without the transformer so that one training config can compare the two.

Input size: the paper used 60 x 60 for translated (T) and cluttered MNIST and 42 x 42 for
rotated-translated-scaled (RTS); the registered default is 60 x 60, and any side of at
least 18 pixels works (the localization net's minimum), e.g. 42 for RTS. Note that
:class:`DigitsCNN` flattens its last feature map, so its classifier's width depends on
the input size chosen at init.

Published error (%), distorted MNIST R / RTS / P / E: CNN 1.2 / 0.8 / 1.5 / 1.4,
ST-CNN (affine) 0.7 / 0.5 / 0.8 / 1.2; cluttered MNIST: CNN 3.5, ST-CNN 1.7.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.common import get_act
from attention_flax.layers.transformer import SpatialTransformer
from attention_flax.models.common import ModelEntry, check_model_images
from attention_flax.models.resnet import cifar_resnet

Array = jax.Array

PAPER = "Jaderberg et al. 2015, Spatial Transformer Networks, arXiv:1506.02025"


class DigitsCNN(nn.Module):
  """Conv k x k -> ReLU -> max-pool 2 per stage, then flatten -> Dense (``head``).

  Convolutions pad (k - 1) // 2 on each side, so a stage halves the size (floor); inputs
  need at least 2 ** len(features) pixels per side. Stage i's output is sown as
  ``stage{i}``; no batch norm, so ``train`` changes nothing. ``conv`` and ``pool`` are
  the factories of the convolutions and max pools (``flax.linen.Conv`` and
  ``flax.linen.max_pool`` signatures).
  """
  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  kernel_size: int = 9
  act: str | Callable = "relu"
  conv: Callable[..., nn.Module] = ops.conv
  pool: Callable[..., Array] = nn.max_pool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    """(N, H, W, C) images -> (N, num_classes) float32 logits."""
    check_model_images(x, type(self).__name__)
    min_side = 2 ** len(self.features)
    if min(x.shape[1:3]) < min_side:
      raise ValueError(f"DigitsCNN with {len(self.features)} stages needs inputs of at least "
                       f"{min_side} x {min_side} pixels; got {x.shape[1]} x {x.shape[2]}.")
    act = get_act(self.act)
    pad = (self.kernel_size - 1) // 2
    y = x.astype(self.dtype)
    for i, feat in enumerate(self.features, start=1):
      y = self.conv(feat, (self.kernel_size, self.kernel_size),
                    padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"conv{i}")(y)
      y = self.pool(act(y), (2, 2), strides=(2, 2), padding="VALID")
      self.sow("intermediates", f"stage{i}", y)
    y = y.reshape(y.shape[0], -1)
    y = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="head")(y)
    return y.astype(jnp.float32)


class STNClassifier(nn.Module):
  """A spatial transformer (``stn``) followed by any classifier (``backbone``).

  Attributes:
    backbone: a factory called as ``backbone(num_classes=..., dtype=..., param_dtype=...)``
      returning a module with ``__call__(x, *, train)``; its parameters live under
      ``backbone``. It is also given ``conv``.
    num_classes: classes of the backbone's output.
    out_size ... align_corners: the :class:`SpatialTransformer` fields; ``out_size`` lets
      the transformer crop/zoom to a smaller image for the backbone.
    conv: the convolution factory of both parts (``flax.linen.Conv``'s signature).
    sampler: the transformer's sampler (:class:`SpatialTransformer`).
    dtype: compute dtype of both parts (the sampling grid stays float32).
    param_dtype: dtype of the parameters.
  """
  backbone: Callable[..., nn.Module]
  num_classes: int = 1000
  out_size: tuple[int, int] | None = None
  localization: Callable[[], nn.Module] | None = None
  loc_features: Sequence[int] = (8, 10)
  loc_hidden: int = 32
  mode: str = "bilinear"
  padding_mode: str = "zeros"
  align_corners: bool = False
  conv: Callable[..., nn.Module] = ops.conv
  sampler: Callable[..., Array] = ops.grid_sample
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    """(N, H, W, C) images -> (N, num_classes) float32 logits."""
    check_model_images(x, type(self).__name__)
    y = SpatialTransformer(out_size=self.out_size, localization=self.localization,
                           loc_features=self.loc_features, loc_hidden=self.loc_hidden,
                           mode=self.mode, padding_mode=self.padding_mode,
                           align_corners=self.align_corners, conv=self.conv,
                           sampler=self.sampler, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="stn")(x, train=train)
    # The factory builds its module in this scope under an automatic name; the clone
    # gives it the stable name `backbone`.
    net = self.backbone(num_classes=self.num_classes, conv=self.conv, dtype=self.dtype,
                        param_dtype=self.param_dtype).clone(parent=self, name="backbone")
    return net(y, train=train).astype(jnp.float32)


stn_cnn = functools.partial(STNClassifier, backbone=DigitsCNN, num_classes=10)
cnn_digits = functools.partial(DigitsCNN, num_classes=10)
stn_resnet20 = functools.partial(STNClassifier, backbone=cifar_resnet(20), num_classes=10)

# Tiny variants for the test suite: 24 x 24 is above the localization net's 18-pixel minimum.
_tiny_cnn = functools.partial(DigitsCNN, features=(4, 8), kernel_size=3)
stn_cnn_tiny = functools.partial(STNClassifier, backbone=_tiny_cnn, num_classes=10,
                                 loc_features=(4, 4), loc_hidden=8)
cnn_digits_tiny = functools.partial(_tiny_cnn, num_classes=10)

MODELS: dict[str, ModelEntry] = {
    "stn_cnn": ModelEntry(stn_cnn, input_size=60, in_channels=1,
                          paper=PAPER + " (ST-CNN, distorted MNIST, Table 1)"),
    "cnn_digits": ModelEntry(cnn_digits, input_size=60, in_channels=1,
                             paper=PAPER + " (CNN baseline, Table 1)"),
    "stn_resnet20": ModelEntry(stn_resnet20, input_size=32, in_channels=3,
                               paper=PAPER + " + He et al. 2016 CIFAR ResNet-20"),
    "stn_cnn_tiny": ModelEntry(stn_cnn_tiny, input_size=24, in_channels=1, paper=PAPER,
                               test_only=True),
    "cnn_digits_tiny": ModelEntry(cnn_digits_tiny, input_size=24, in_channels=1, paper=PAPER,
                                  test_only=True),
}
