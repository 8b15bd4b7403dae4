"""ImageNet CBAM ResNet-50 (Woo et al. 2018, "CBAM", sec. 4.1, Table 4).

Run:
  python -m train --config=configs/imagenet_cbam_resnet50.py --workdir=runs/imagenet_cbam_resnet50
  python -m train --config=configs/imagenet_cbam_resnet50.py:smoke --workdir=/tmp/smoke_cbam

Paper setting (sec. 4.1): the ResNet ImageNet recipe with the same data augmentation for
training and single-crop 224x224 testing; SGD, momentum 0.9, weight decay 1e-4, batch 256,
learning rate 0.1 divided by 10 at epochs 30 and 60, 90 epochs. Published (Table 4):
ResNet-50 + CBAM 22.66 / 6.31 top-1 / top-5 error, 28.09M parameters.
"""

from __future__ import annotations

import ml_collections

import configs
from configs.imagenet_resnet50 import imagenet_config, imagenet_smoke


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg)
  config = imagenet_config("cbam_resnet50")
  if arg == "smoke":
    imagenet_smoke(config)
  return config
