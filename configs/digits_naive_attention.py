"""Attention residual learning against naive attention learning: Attention-56 (CIFAR
layout) on the embedded digits, output ``(1 + M) * T`` against ``M * T``.

Run:
  python -m train --config=configs/digits_naive_attention.py --workdir=runs/digits_naive
  python -m train --config=configs/digits_naive_attention.py:smoke --workdir=/tmp/smoke_naive
  python -m train.activations --workdir=runs/digits_naive            # (1 + M) * T
  python -m train.activations --workdir=runs/digits_naive/baseline   # M * T
  python -m train.activations --workdir=runs/digits_naive --init     # the same two,
  python -m train.activations --workdir=runs/digits_naive/baseline --init  # untrained

Wang et al., "Residual Attention Network for Image Classification" (CVPR 2017,
https://arxiv.org/abs/1704.06904), Sec. 3.1: multiplying the trunk T by a soft mask M in
[0, 1] module after module ("naive attention learning") degrades the features of deep
layers, so each Attention Module outputs ``(1 + M) * T`` ("attention residual learning");
the paper's Table 3 compares the two on CIFAR-10. Here ``attention56_cifar`` (one module
per stage) is trained with ``(1 + M) * T``, then the same network with ``naive=True``
(``compare_with``, into ``workdir/baseline``) on the same data, seed and recipe: the
default digits recipe (``configs/default.py``: 16x16 one-channel digits, Nesterov SGD,
lr 0.1 with a cosine decay, 1-pixel random crops), shortened to 6 epochs (132 steps of
64) each so that both runs together train on two CPU cores; longer runs:
--config.num_epochs=20. ``train.activations`` prints the mean absolute value of the
features around every attention module, the measure of that shrinking. Results:
docs/benchmarks.md.
"""

from __future__ import annotations

import ml_collections

import configs
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg)
  config = default.get_config(arg)
  config.model = "attention56_cifar"
  config.compare_with = "attention56_cifar:naive=True"
  config.attention_png = False
  if arg != "smoke":
    config.num_epochs = 6.0  # 132 steps of 64 over 1,437 digits
  return config
