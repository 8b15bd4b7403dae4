"""CBAM-ResNet-20 on the embedded digits: the run behind the spatial-mask pictures.

Run:
  python -m train --config=configs/digits_cbam.py --workdir=runs/digits_cbam
  python -m train --config=configs/digits_cbam.py:smoke --workdir=/tmp/smoke_cbam
  python -m train.visualize --workdir=runs/digits_cbam --num_images=6

CBAM (Woo et al. 2018, https://arxiv.org/abs/1807.06521) in every block of the CIFAR
ResNet-20 (He et al. 2016 sec. 4.2), trained with the default digits recipe
(``configs/default.py``: 16x16 one-channel digits, Nesterov SGD, cosine decay) for 8
epochs. ``zero_init_last=False`` starts every block's last BN scale at 1 instead of 0: with
timm's zero start each block's residual, which CBAM multiplies by its gates, is all zero
at initialisation, so the channel MLP and the 7x7 spatial convolution get no gradient at
the first step; starting at 1 lets the attention learn from the start of a short run.
Its results and spatial masks: docs/pictures.md.
"""

from __future__ import annotations

import ml_collections

import configs
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(configs.parse_arg(arg))
  config.model = "cbam_resnet20"
  config.model_kwargs = ml_collections.ConfigDict({"zero_init_last": False})
  config.num_epochs = 8.0  # 176 steps of 64
  return config
