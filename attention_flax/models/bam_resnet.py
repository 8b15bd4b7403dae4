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
from typing import Any, Callable, Sequence

from flax import linen as nn

from attention_flax.models.common import ModelEntry
from attention_flax.models.resnet import ResNet, imagenet_resnet


class BAMResNet(ResNet):
  """ResNet v1 with an attention module between stages, BAM by default.

  Park et al. 2018, arXiv 1807.06514, Fig. 1: :class:`~attention_flax.models.resnet.ResNet`
  with ``stage_attn="bam"`` after stages ``stage_attn_after`` = (1, 2, 3); the output of
  stage i passes through the child ``bam{i}``, and the result is what the next stage sees
  and what is sown as ``intermediates/stage{i}``. ``stage_attn_kwargs={"branch_norm":
  False, "combine": "product"}`` gives the authors' released module. Takes (N, H, W, C)
  images and returns (N, num_classes) float32 logits.
  """
  stage_attn: str | Callable[..., nn.Module] | None = "bam"
  stage_attn_after: Sequence[int] = (1, 2, 3)


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
