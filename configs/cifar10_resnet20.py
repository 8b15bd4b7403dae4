"""CIFAR-10 ResNet-20 (He et al. 2016, "Deep Residual Learning", sec. 4.2, Table 6).

Run:
  python -m train --config=configs/cifar10_resnet20.py --workdir=runs/cifar10_resnet20
  python -m train --config=configs/cifar10_resnet20.py:smoke --workdir=/tmp/smoke_c10
  python -m train --config=configs/cifar10_resnet20.py:torch_like --workdir=runs/c10_r20_torch

Paper setting (sec. 4.2): SGD, momentum 0.9, weight decay 1e-4, mini-batch 128, learning
rate 0.1 divided by 10 at 32k and 48k iterations, training stopped at 64k iterations
(about 164 epochs of 50k images); augmentation: 4 pixels of zero padding, a random 32x32
crop and a horizontal flip. Published: 0.27M parameters, 8.75% test error (Table 6).
Needs the prepared tfds ``cifar10`` (``python -m train.prepare cifar10``).

Convention: the paper's. Option-A shortcuts (the stride-2 shortcut subsamples and appends
zero channels, no parameters) and the last batch norm of every block starting at scale 0
(the block starts as its shortcut, timm's ``zero_init_last``). ``:torch_like`` builds what
most PyTorch CIFAR scripts build instead: 1x1 projection shortcuts with batch norm (option
B, ``model_kwargs.down="conv"``; +2,752 parameters for ResNet-20) and every scale at 1
(``model_kwargs.zero_init_last=False``). Zero-initialised blocks learn more slowly at
first, so on short budgets (a few epochs) ``:torch_like`` scores higher; the optimiser,
schedule and batch-norm updates are PyTorch's either way (``python -m train.parity``).
Arguments combine with a comma: ``:torch_like,smoke``.
"""

from __future__ import annotations

import ml_collections

import configs


# model_kwargs of ``:torch_like`` for the CIFAR ResNets (attention_flax.models.resnet).
TORCH_LIKE = {"down": "conv", "zero_init_last": False}
CIFAR_ARGS = ("smoke", "torch_like")


def parse_args(arg: str | None, choices: tuple[str, ...] = CIFAR_ARGS) -> set[str]:
  """The comma-separated ``:a,b`` arguments of a CIFAR config, each one of ``choices``."""
  return {configs.parse_arg(part.strip(), choices)
          for part in (arg or "").split(",") if part.strip()}


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
  args = parse_args(arg)
  config = cifar10_config("resnet20")
  if "torch_like" in args:
    config.model_kwargs.update(TORCH_LIKE)
  if "smoke" in args:
    configs.shrink_for_smoke(config, steps=3, batch_size=8, mock_examples=16)
  return config
