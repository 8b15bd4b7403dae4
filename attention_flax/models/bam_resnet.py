"""BAM-ResNet: a ResNet with a Bottleneck Attention Module between stages.

Park, Woo, Lee, Kweon, "BAM: Bottleneck Attention Module", BMVC 2018,
https://arxiv.org/abs/1807.06514. BAM sits "at each bottleneck of the network", where
the feature map is downsampled (Fig. 1): after stages 1, 2 and 3 of a ResNet, each
with the width of the stage's output (256, 512, 1024 for ResNet-50), and nowhere inside
the residual blocks. The authors' code (https://github.com/Jongchan/attention-module,
``MODELS/model_resnet.py``) names the modules ``bam1``, ``bam2``, ``bam3``; so do we.

The backbone is :class:`attention_flax.models.resnet.ResNet` (stems, blocks, shortcuts,
head, naming); the blocks keep their own attention slot (``attn``, none by default).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax.layers import ATTENTIONS, create_attention
from attention_flax.layers.common import get_act, he_normal
from attention_flax.layers.norm import batch_norm
from attention_flax.models.common import ModelEntry, check_model_images
from attention_flax.models.resnet import (
    ResNet, fc_kernel_init, imagenet_resnet, max_pool_3x3_s2, padding)

Array = jax.Array


def _fields_of(attn: str | Callable[..., nn.Module]) -> set[str] | None:
  """The dataclass fields of a registered name or module factory; None when unknown."""
  factory = ATTENTIONS.get(attn.lower()) if isinstance(attn, str) else attn
  while isinstance(factory, functools.partial):
    factory = factory.func
  fields = getattr(factory, "__dataclass_fields__", None)
  return set(fields) if fields is not None else None


class BAMResNet(ResNet):
  """ResNet v1 with an attention module between stages (BAM by default).

  Park et al. 2018, arXiv 1807.06514, Fig. 1. Every field of
  :class:`~attention_flax.models.resnet.ResNet` keeps its meaning; the output of stage i
  passes through the child ``bam{i}`` when i is in ``stage_attn_after``, and the result
  is what the next stage sees and what is sown as ``intermediates/stage{i}``. Takes
  (N, H, W, C) images and returns (N, num_classes) float32 logits.

  Attributes:
    stage_attn: the module between stages: a registered attention name or a factory
      (default ``"bam"``, :class:`~attention_flax.layers.bam.BAM`).
    stage_attn_kwargs: its extra fields (e.g. ``{"branch_norm": False, "combine":
      "product"}`` for the authors' released module).
    stage_attn_after: the stages (from 1) followed by one; (1, 2, 3) for four stages,
      the paper's placement at every downsampling.

  The model's ``conv`` (the raw factory; the module adds its own bias and init), its
  batch norm (``norm`` with ``bn_momentum``, ``bn_epsilon``), ``dtype`` and
  ``param_dtype`` reach the stage modules, so ``plain_factories`` covers them too.
  """
  stage_attn: str | Callable[..., nn.Module] = "bam"
  stage_attn_kwargs: Mapping[str, Any] | None = None
  stage_attn_after: Sequence[int] = (1, 2, 3)

  def _stage_module(self, index: int, norm: Callable[..., nn.Module]) -> nn.Module:
    kwargs = {"conv": self.conv, "norm": norm, "dtype": self.dtype,
              "param_dtype": self.param_dtype}
    # Only the fields the module has (a channel gate such as "se" has no conv or norm).
    fields = _fields_of(self.stage_attn)
    if fields is not None:
      kwargs = {k: v for k, v in kwargs.items() if k in fields}
    kwargs.update(self.stage_attn_kwargs or {})
    return create_attention(self.stage_attn, name=f"bam{index}", **kwargs)

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    check_model_images(x, type(self).__name__)
    down = self._check_config()
    stages = len(tuple(self.stage_sizes))
    after = tuple(self.stage_attn_after)
    if any(not isinstance(i, int) or not 1 <= i <= stages for i in after):
      raise ValueError(f"stage_attn_after names stages from 1 to {stages}; got {after}. "
                       "The paper places BAM after every stage but the last: (1, 2, 3).")
    block_norm = functools.partial(self.norm, momentum=self.bn_momentum,
                                   epsilon=self.bn_epsilon)
    conv = functools.partial(self.conv, use_bias=False, kernel_init=he_normal,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(block_norm, use_running_average=not train, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    act = get_act(self.act)
    stem_width = self.stem_width or self.widths[0]

    # The stems of ResNet, with its names.
    if self.stem == "classic":
      x = conv(stem_width, (7, 7), strides=2, padding=padding(7), name="conv1")(x)
      x = max_pool_3x3_s2(self.pool, act(batch_norm(norm, x, name="bn1")))
    elif self.stem == "deep":
      half = stem_width // 2
      x = conv(half, (3, 3), strides=2, padding=padding(3), name="conv1_0")(x)
      x = act(batch_norm(norm, x, name="conv1_1"))
      x = conv(half, (3, 3), padding=padding(3), name="conv1_3")(x)
      x = act(batch_norm(norm, x, name="conv1_4"))
      x = conv(stem_width, (3, 3), padding=padding(3), name="conv1_6")(x)
      x = max_pool_3x3_s2(self.pool, act(batch_norm(norm, x, name="bn1")))
    else:
      x = conv(stem_width, (3, 3), padding=padding(3), name="conv1")(x)
      x = act(batch_norm(norm, x, name="bn1"))

    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(num_blocks):
        x = self.block(
            features=width, strides=2 if i > 0 and j == 0 else 1, down=down,
            attn=self.attn, attn_kwargs=self.attn_kwargs,
            zero_init_last=self.zero_init_last, conv=self.conv, norm=block_norm,
            act=self.act, tail=self.tail, dtype=self.dtype,
            param_dtype=self.param_dtype, name=f"layer{i + 1}_{j}")(x, train=train)
      if i + 1 in after:
        x = self._stage_module(i + 1, block_norm)(x, train=train)
      self.sow("intermediates", f"stage{i + 1}", x)

    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=fc_kernel_init, name="fc")(x)
    return x.astype(jnp.float32)


def bam_resnet(depth: int, **fields: Any) -> Callable[..., BAMResNet]:
  """The factory of an ImageNet BAM-ResNet-``depth`` with extra ``fields``."""
  plain = imagenet_resnet(depth)
  return functools.partial(BAMResNet, **plain.keywords, **fields)


_BAM = "Park et al. 2018 (BAM), arXiv 1807.06514"

# Parameters (jax.eval_shape, 1000 classes, params only, BN scale and bias counted, running
# statistics not): ResNet-50 25,557,032; the three BAMs (C = 256, 512, 1024; rd = C / 16)
# add 17,875 + 69,539 + 274,243 = 361,657, so BAM-ResNet-50 has 25,918,689. The authors'
# released module (no BN at the end of either branch) has 2 * C + 2 fewer per BAM,
# 358,067 in all: 25,915,099, which is what the published conversion of the authors'
# ImageNet weights (pytorchcv's bam_resnet50) counts. The paper's ImageNet table gives
# 25.92M for ResNet50 + BAM; both round to it.
MODELS: dict[str, ModelEntry] = {
    "bam_resnet50": ModelEntry(
        bam_resnet(50), 224,
        paper=(f"{_BAM}, ImageNet-1K table (ResNet50 + BAM, 25.92M params; ours "
               "25,918,689: the paper's end-of-branch BNs add 3,590 to the authors' "
               "released code's 25,915,099)")),
}
