"""ImageNet ResNet-50 (He et al. 2016, "Deep Residual Learning", sec. 3.4, Table 3).

Run:
  python -m train --config=configs/imagenet_resnet50.py --workdir=runs/imagenet_resnet50
  python -m train --config=configs/imagenet_resnet50.py:smoke --workdir=/tmp/smoke_in

Paper setting (sec. 3.4): SGD, momentum 0.9, weight decay 1e-4, mini-batch 256, learning
rate 0.1 divided by 10 when the error plateaus (here at epochs 30 and 60 of 90, the
schedule of the reference implementations); random-resized 224x224 crops and horizontal
flips. timm's resnet50 has 25,557,032 parameters. Needs the prepared tfds
``imagenet2012`` (manual download; ``python -m train.prepare imagenet2012``).
"""

from __future__ import annotations

import ml_collections

import configs


def imagenet_config(model: str) -> ml_collections.ConfigDict:
  """The 90-epoch ResNet ImageNet recipe for ``model``; shared with the other ImageNet configs."""
  config = configs.base_config()
  config.model = model
  config.data = configs.data_config(
      "tfds", tfds_name="imagenet2012", eval_split="validation", image_size=224,
      channels=3, mean=configs.IMAGENET_MEAN, std=configs.IMAGENET_STD,
      augment={"random_resized_crop": True, "flip": True, "min_area": 0.08},
      worker_count=8)
  config.batch_size = 256
  config.eval_batch_size = 250
  config.num_epochs = 90.0
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.schedule = "step"
  config.decay_epochs = (30, 60)
  config.decay_factor = 0.1
  config.half_precision = True
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 5_000
  return config


def imagenet_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps at 64x64 on tfds mock data, in float32 (bf16 is slow on CPUs)."""
  config.half_precision = False
  config.data.worker_count = 0
  return configs.shrink_for_smoke(config, steps=2, batch_size=2, image_size=64,
                                  mock_examples=4)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg)
  config = imagenet_config("resnet50")
  if arg == "smoke":
    imagenet_smoke(config)
  return config
