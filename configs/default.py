"""Default experiment: an SE-ResNet-20 on the embedded scikit-learn digits.

Run:
  python -m train                       # = --config=configs/default.py --workdir=runs/default
  python -m train --config=configs/default.py:smoke --workdir=/tmp/smoke

The 1,797 8x8 digits of scikit-learn ship with the package, so this runs offline on a
laptop CPU. The images are upsampled to 16x16 (one channel) and fed to the CIFAR
SE-ResNet-20 (He et al. 2016 sec. 4.2 with the SE block of Hu et al. 2018, rd_ratio 1/16):
Nesterov SGD, lr 0.1 with one epoch of warm-up and a cosine decay, weight decay 5e-4,
1-pixel random crops, 20 epochs (440 steps of 64) over the 1,437 training digits.
Its result and the pictures drawn from it: docs/pictures.md.
"""

from __future__ import annotations

import ml_collections

import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg)
  config = configs.base_config()
  config.model = "se_resnet20"
  config.data = configs.data_config(
      "digits", image_size=16, channels=1, mean=(0.5,), std=(0.5,),
      augment={"crop_padding": 1})
  config.batch_size = 64
  config.eval_batch_size = 256
  config.num_epochs = 20.0  # 440 steps of 64
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4
  config.schedule = "cosine"
  config.warmup_epochs = 1.0
  config.label_smoothing = 0.0
  config.log_every_steps = 20
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  if arg == "smoke":
    configs.shrink_for_smoke(config)
  return config
