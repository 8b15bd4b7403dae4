"""What every model family file exports: a table of registered names.

Each family file (``resnet.py``, ``residual_attention.py``, ``stn.py``) ends with a plain
dict ``MODELS: dict[str, ModelEntry]``; ``attention_flax.models`` merges them into the one
registry behind ``create_model`` and ``list_models``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from flax import linen as nn


class ModelEntry(NamedTuple):
  """A registered model.

  Attributes:
    factory: called as ``factory(num_classes=..., **overrides)``; returns an ``nn.Module``
      whose ``__call__(images, *, train=False)`` maps (N, H, W, C) images to (N, classes)
      logits.
    input_size: the default square resolution (H = W) for FLOPs and examples.
    in_channels: channels of the default input (3 for RGB, 1 for digits).
    paper: the paper (and table) the architecture comes from.
    test_only: a tiny variant used by the test suite; hidden from ``list_models()``
      unless asked for.
  """
  factory: Callable[..., nn.Module]
  input_size: int
  in_channels: int = 3
  paper: str = ""
  test_only: bool = False
