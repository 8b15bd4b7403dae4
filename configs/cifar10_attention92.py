"""CIFAR-10 Attention-92 (Wang et al. 2017, "Residual Attention Network", sec. 4.1, Table 5).

Run:
  python -m train --config=configs/cifar10_attention92.py --workdir=runs/cifar10_attention92
  python -m train --config=configs/cifar10_attention92.py:smoke --workdir=/tmp/smoke_att92

Paper setting (sec. 4.1): Nesterov SGD, momentum 0.9, weight decay 1e-4, mini-batch 64,
learning rate 0.1 divided by 10 at 64k and 96k iterations, training stopped at 160k;
augmentation: 4-pixel zero padding, random 32x32 crop, horizontal flip, per-channel
normalisation. Published: Attention-92 1.9M parameters, 4.99% CIFAR-10 error (Table 5).

Convention: already PyTorch's usual one: pre-activation residual units whose shortcut is a
1x1 convolution when the shape changes, and no batch norm starting at scale 0; so this
config has no ``:torch_like`` argument (the CIFAR ResNet configs do).
"""

from __future__ import annotations

import ml_collections

import configs
from configs.cifar10_resnet20 import cifar10_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg)
  config = cifar10_config("attention92_cifar")
  config.batch_size = 64
  config.num_train_steps = 160_000
  config.nesterov = True
  config.decay_steps = (64_000, 96_000)
  config.eval_every_steps = 8_000
  config.checkpoint_every_steps = 4_000
  if arg == "smoke":
    configs.shrink_for_smoke(config, steps=2, batch_size=4, mock_examples=8)
  return config
