"""CIFAR-10 ResNet-20 (He et al. 2016, "Deep Residual Learning", sec. 4.2, Table 6).

Run:
  python -m train --config=configs/cifar10_resnet20.py --workdir=runs/cifar10_resnet20
  python -m train --config=configs/cifar10_resnet20.py:smoke --workdir=/tmp/smoke_c10

Paper setting (sec. 4.2): SGD, momentum 0.9, weight decay 1e-4, mini-batch 128, learning
rate 0.1 divided by 10 at 32k and 48k iterations, training stopped at 64k iterations
(about 164 epochs of 50k images); augmentation: 4 pixels of zero padding, a random 32x32
crop and a horizontal flip. Published: 0.27M parameters, 8.75% test error (Table 6).
Needs the prepared tfds ``cifar10`` (``python -m train.prepare cifar10``).
"""

from __future__ import annotations

import ml_collections

import configs


def cifar10_config(model: str) -> ml_collections.ConfigDict:
  """He et al.'s CIFAR-10 recipe for ``model``; shared with the other CIFAR configs."""
  config = configs.base_config()
  config.model = model
  config.data = configs.data_config(
      "tfds", tfds_name="cifar10", image_size=32, channels=3,
      mean=configs.CIFAR10_MEAN, std=configs.CIFAR10_STD,
      augment={"crop_padding": 4, "flip": True})
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_train_steps = 64_000
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.schedule = "step"
  config.decay_steps = (32_000, 48_000)
  config.decay_factor = 0.1
  config.log_every_steps = 100
  config.eval_every_steps = 4_000
  config.checkpoint_every_steps = 2_000
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg)
  config = cifar10_config("resnet20")
  if arg == "smoke":
    configs.shrink_for_smoke(config, steps=3, batch_size=8, mock_examples=16)
  return config
