"""CIFAR-10 SE-ResNet-110 (Hu et al., "Squeeze-and-Excitation Networks", Table 4).

Run:
  python -m train --config=configs/cifar10_se_resnet110.py --workdir=runs/cifar10_se_resnet110
  python -m train --config=configs/cifar10_se_resnet110.py:smoke --workdir=/tmp/smoke_se110
  python -m train --config=configs/cifar10_se_resnet110.py:torch_like --workdir=runs/se110_t

SENet sec. 6.1 (CIFAR): the ResNet-110 of He et al. with an SE block (reduction 16) in
every residual block, trained with the standard augmentation (4-pixel zero padding, random
32x32 crop, horizontal flip) and mean/std normalisation. The schedule is the one of He et
al. sec. 4.2 (SGD 0.1, momentum 0.9, weight decay 1e-4, batch 128, /10 at 32k and 48k,
stop at 64k); for the 110-layer net He et al. warm up at 0.01 for about 400 iterations,
approximated here by a one-epoch linear warm-up. Published CIFAR-10 error (Table 4):
ResNet-110 6.37% -> SE-ResNet-110 5.21%.

Convention: as configs/cifar10_resnet20.py, the paper's option-A shortcuts and the last
batch norm of every block starting at scale 0. ``:torch_like`` switches to 1x1 projection
shortcuts with batch norm (``model_kwargs.down="conv"``) and every scale at 1
(``model_kwargs.zero_init_last=False``), as most PyTorch CIFAR scripts; arguments combine
with a comma (``:torch_like,smoke``).
"""

from __future__ import annotations

import ml_collections

import configs
from configs.cifar10_resnet20 import TORCH_LIKE, cifar10_config, parse_args


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_args(arg)
  config = cifar10_config("se_resnet110")
  config.warmup_epochs = 1.0
  if "torch_like" in args:
    config.model_kwargs.update(TORCH_LIKE)
  if "smoke" in args:
    configs.shrink_for_smoke(config, steps=2, batch_size=4, mock_examples=8)
  return config
