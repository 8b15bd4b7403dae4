"""Spatial transformer vs. plain CNN on distorted digits (Jaderberg et al. 2015, Table 1).

Run:
  python -m train --config=configs/digits_stn.py --workdir=runs/digits_stn
  python -m train --config=configs/digits_stn.py:smoke --workdir=/tmp/smoke_stn

The paper's distorted-MNIST experiment (rotation, scale, translation, clutter), rebuilt
offline from the embedded scikit-learn digits: each digit is randomly rotated (+-45
degrees), scaled and translated on a canvas with clutter (``data.name =
"distorted_digits"``, fixed by ``data.seed``; 11,496 train / 1,440 test canvases).
``stn_cnn`` (an affine spatial transformer in front of the CNN) is trained first, then the
baseline ``cnn_digits`` named by ``compare_with`` with identical settings, and the run
prints both test accuracies. Paper (MNIST RTS, error %): CNN 0.8, ST-CNN 0.5.

The paper trains with SGD, lr 0.01 divided by 10 every 50k iterations, batch 256
(sec. 4.1) on 60x60 canvases. So that both models train on a CPU, this config uses 40x40
canvases (the same distortions, scaled) and 4 epochs (716 steps of 64) of Nesterov SGD
with a cosine schedule. The canvases are uint8, normalised in the step
(``data.normalize_on_device``). Longer runs and the paper's canvas:
--config.num_epochs=40 --config.data.image_size=60. Results and the transformer's
panels: docs/pictures.md.
"""

from __future__ import annotations

import ml_collections

import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg)
  config = configs.base_config()
  config.model = "stn_cnn"
  config.compare_with = "cnn_digits"
  config.data = configs.data_config(
      "distorted_digits", image_size=40, channels=1, mean=(0.5,), std=(0.5,))
  config.batch_size = 64
  config.eval_batch_size = 240
  config.num_epochs = 4.0  # 716 steps of 64 over 11,496 canvases
  config.optimizer = "sgd"
  config.learning_rate = 0.02
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  config.schedule = "cosine"
  config.warmup_epochs = 0.2
  config.grad_clip_norm = 5.0
  config.log_every_steps = 20
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 200
  if arg == "smoke":
    configs.shrink_for_smoke(config, steps=3)
  return config
