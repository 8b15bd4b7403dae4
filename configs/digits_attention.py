"""Attention-56 (CIFAR layout) on the embedded digits: the run behind the residual-mask
pictures.

Run:
  python -m train --config=configs/digits_attention.py --workdir=runs/digits_attention
  python -m train --config=configs/digits_attention.py:smoke --workdir=/tmp/smoke_attention
  python -m train.visualize --workdir=runs/digits_attention --num_images=6

The Residual Attention Network (Wang et al. 2017, https://arxiv.org/abs/1704.06904) of
the paper's CIFAR section with one attention module per stage (``attention56_cifar``),
trained with the default digits recipe (``configs/default.py``: 16x16 one-channel digits,
Nesterov SGD, lr 0.1 with a cosine decay, 1-pixel random crops) for 10 epochs. The CIFAR
layout takes any input side that halves cleanly: at 16x16 the three stages' soft masks
are 16x16, 8x8 and 4x4, and their mask branches pool down to 2x2. Its results and
masks: docs/pictures.md.
"""

from __future__ import annotations

import ml_collections

import configs
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(configs.parse_arg(arg))
  config.model = "attention56_cifar"
  config.num_epochs = 10.0  # 220 steps of 64
  return config
