"""ImageNet SE-ResNet-50 (Hu et al., "Squeeze-and-Excitation Networks", sec. 5, Table 2).

Run:
  python -m train --config=configs/imagenet_seresnet50.py --workdir=runs/imagenet_seresnet50
  python -m train --config=configs/imagenet_seresnet50.py:smoke --workdir=/tmp/smoke_se50

Paper setting (sec. 5): synchronous SGD, momentum 0.9, mini-batch 1024, initial learning
rate 0.6 decreased by a factor of 10 every 30 epochs, 100 epochs from scratch;
random-size cropping to 224x224 and random horizontal flips; weight decay 1e-4 (the
ResNet recipe they build on). Published (Table 2, single 224 crop): ResNet-50 24.80 /
7.48 -> SE-ResNet-50 23.29 / 6.62 top-1 / top-5 error; timm's seresnet50 has 28,088,024
parameters. With a smaller batch B, scale the learning rate linearly: 0.6 * B / 1024.
"""

from __future__ import annotations

import ml_collections

import configs
from configs.imagenet_resnet50 import imagenet_config, imagenet_smoke


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg)
  config = imagenet_config("seresnet50")
  config.batch_size = 1024
  config.learning_rate = 0.6
  config.num_epochs = 100.0
  config.decay_epochs = (30, 60, 90)
  if arg == "smoke":
    imagenet_smoke(config)
  return config
