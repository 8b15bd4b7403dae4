"""Soft against hard attention on cluttered translated digits: RAM, ST-CNN and the plain CNN.

Run:
  python -m train --config=configs/digits_soft_hard.py --workdir=runs/digits_soft_hard
  python -m train --config=configs/digits_soft_hard.py:smoke --workdir=/tmp/smoke_soft_hard

One dataset, three models trained one after another with identical settings: the
Recurrent Attention Model ``ram_digits`` (hard attention: a few glimpses chosen by a
policy trained with REINFORCE; Mnih et al. 2014, arXiv 1406.6247), then, through
``compare_with``, the spatial-transformer CNN ``stn_cnn`` (soft attention: a
differentiable warp; Jaderberg et al. 2015) and the plain CNN ``cnn_digits`` in
``workdir/compared/<model>``. The run prints the three test accuracies.

Data: the RAM paper's cluttered translated MNIST rebuilt from the embedded scikit-learn
digits (``data.name = "distorted_digits"``) on 40 x 40 canvases, the paper's 60 x 60
scaled by 2/3 so that the two CNNs train on a CPU: each digit, 19 pixels tall, placed at a
uniformly random position with no rotation or scaling, plus four 5 x 5 pieces of other
digits (the paper: 28-pixel digits and 8 x 8 pieces). RAM looks with 6 glimpses of 8 x 8
pixels at 3 scales (8, 16 and 32 pixels). 11,496 train / 1,440 test canvases.

Training: 3 epochs (537 steps of 64) of Adam at 1e-3 with a cosine schedule for each
model, few so that the two CNNs train on a CPU (RAM's steps cost a small fraction of
theirs). RAM wants more epochs than the CNNs: ``--config.compare_with=
--config.num_epochs=20`` trains it alone for 20 (3,580 steps). Paper
(Table 2, 60 x 60 cluttered translated MNIST, error %): RAM with 8 glimpses of 12 x 12
at 3 scales 5.23, a convolutional network 7.83. Results and FLOPs per image:
docs/pictures.md.
"""

from __future__ import annotations

import ml_collections

import configs
from configs import digits_ram


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg)
  config = digits_ram.get_config()  # RAM's recipe; one episode per image, as the paper's CNNs
  config.model_kwargs = ml_collections.ConfigDict({
      "num_glimpses": 6, "glimpse_size": 8, "num_scales": 3, "std": 0.2, "core": "rnn"})
  config.compare_with = "stn_cnn,cnn_digits"
  config.data = configs.data_config(
      "distorted_digits", image_size=40, channels=1, mean=(0.5,), std=(0.5,),
      max_rotation=0.0, scale_range=(1.0, 1.0), clutter=4, clutter_size=5)
  config.batch_size = 64
  config.num_epochs = 3.0  # 537 steps of 64 over 11,496 canvases, for each model
  if arg == "smoke":
    configs.shrink_for_smoke(config, steps=3)
  return config
