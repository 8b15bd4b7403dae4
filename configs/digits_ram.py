"""The Recurrent Attention Model (Mnih et al. 2014, arXiv 1406.6247) on translated digits.

Run:
  python -m train --config=configs/digits_ram.py --workdir=runs/digits_ram
  python -m train --config=configs/digits_ram.py:cluttered --workdir=runs/digits_ram_clutter
  python -m train --config=configs/digits_ram.py:smoke --workdir=/tmp/smoke_ram
  python -m train.visualize --workdir=runs/digits_ram

The paper's 60 x 60 translated MNIST, rebuilt offline from the embedded scikit-learn
digits (``data.name = "distorted_digits"``): each digit, drawn 28 pixels tall, is placed
at a uniformly random position of a 60 x 60 canvas, with no rotation and no scaling
(``max_rotation=0``, ``scale_range=(1, 1)``, ``clutter=0``). ``:cluttered`` adds four 8 x 8
pieces of other digits per canvas, the paper's cluttered translated MNIST. 11,496 train /
1,440 test canvases.

``ram_digits``: 8 glimpses of 12 x 12 pixels at 3 scales (12, 24 and 48 pixels), the
paper's ReLU RNN core of 256 units and a Gaussian location policy of standard deviation
0.2; trained on the hybrid loss (cross-entropy + REINFORCE with a learned baseline, see
``attention_flax.models.ram``). The paper trains with SGD and momentum for many epochs;
so that RAM trains on a CPU in minutes, this config runs 20 epochs (3,580 steps of 64) of
Adam at 2e-3 with a cosine schedule. Evaluation follows the policy's mean. Paper (error
%, Table 2): cluttered 60 x 60, RAM with 8 glimpses 5.23, a convolutional network 7.83.
Results: docs/pictures.md.
"""

from __future__ import annotations

import ml_collections

import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg, ("smoke", "cluttered"))
  config = configs.base_config()
  config.model = "ram_digits"
  config.model_kwargs = ml_collections.ConfigDict({
      "num_glimpses": 8, "glimpse_size": 12, "num_scales": 3, "std": 0.2, "core": "rnn"})
  config.data = configs.data_config(
      "distorted_digits", image_size=60, channels=1, mean=(0.5,), std=(0.5,),
      max_rotation=0.0, scale_range=(1.0, 1.0), clutter=4 if arg == "cluttered" else 0,
      clutter_size=8)
  config.batch_size = 64
  config.eval_batch_size = 240
  config.num_epochs = 20.0  # 3,580 steps of 64 over 11,496 canvases
  config.optimizer = "adamw"
  config.learning_rate = 2e-3
  config.weight_decay = 0.0
  config.schedule = "cosine"
  config.warmup_epochs = 0.0
  config.grad_clip_norm = 5.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  if arg == "smoke":
    configs.shrink_for_smoke(config, steps=3)
  return config
