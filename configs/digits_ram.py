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

``ram_digits``: 3 glimpses of 8 x 8 pixels at 3 scales (8, 16 and 32 pixels, so that no
glimpse shows the whole canvas and the policy has to find the digit), the paper's ReLU RNN
core of 256 units and a Gaussian location policy of standard deviation 0.2; trained on the
hybrid loss (cross-entropy + REINFORCE with a learned baseline, see
``attention_flax.models.ram``) with 8 episodes per image (``samples``, the paper's M),
which the policy needs to learn where to look from a 0/1 reward. The paper trains with SGD
and momentum for many epochs; so that RAM trains on a CPU in minutes, this config runs 10
epochs (3,590 steps of 32 images, 256 episodes) of Adam at 1e-3 with a cosine schedule.
Evaluation follows the policy's mean. Paper (error %, Table 2): cluttered 60 x 60, RAM
with 8 glimpses 5.23, a convolutional network 7.83.
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
      "num_glimpses": 3, "glimpse_size": 8, "num_scales": 3, "std": 0.2, "core": "rnn",
      "samples": 8})
  config.data = configs.data_config(
      "distorted_digits", image_size=60, channels=1, mean=(0.5,), std=(0.5,),
      max_rotation=0.0, scale_range=(1.0, 1.0), clutter=4 if arg == "cluttered" else 0,
      clutter_size=8)
  config.batch_size = 32  # x 8 episodes each
  config.eval_batch_size = 240
  config.num_epochs = 10.0  # 3,590 steps of 32 over 11,496 canvases
  config.optimizer = "adamw"
  config.learning_rate = 1e-3
  config.weight_decay = 0.0
  config.schedule = "cosine"
  config.warmup_epochs = 0.0
  config.grad_clip_norm = 5.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  if arg == "smoke":
    configs.shrink_for_smoke(config, steps=3)
  return config
