"""What every model family file shares: the table of registered names and the input check.

Each family file (``resnet.py``, ``residual_attention.py``, ``stn.py``) ends with a plain
dict ``MODELS: dict[str, ModelEntry]``; ``attention_flax.models`` merges them into the one
registry behind ``create_model`` and ``list_models``. Every model checks its images with
:func:`check_model_images` before its first layer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from flax import linen as nn

from attention_flax.layers.common import check_images

# Channel counts of images stored channels-first: grayscale, RGB, RGBA.
_IMAGE_CHANNELS = (1, 3, 4)


def check_model_images(x: Any, module: str) -> None:
  """Raises a clear error unless ``x`` is a floating (N, H, W, C) batch of images.

  Beyond the layers' check (rank 4, floating dtype), a batch that is (N, C, H, W) with
  1, 3 or 4 channels, as PyTorch stores images, is rejected: read as NHWC it would be an
  image 1-4 pixels high with H channels, which a model would take without complaint at
  ``init`` (it reads C from its input) and fail on deep inside at ``apply``. So NHWC
  images 1, 3 or 4 pixels high with more than 4 channels are refused too: no model here
  is meant for them.
  """
  check_images(x, module)
  _, h, w, c = x.shape
  if h in _IMAGE_CHANNELS and min(w, c) > max(_IMAGE_CHANNELS):
    raise ValueError(
        f"{module} takes images as (N, H, W, C); got shape {tuple(x.shape)}, which looks "
        f"channels-first, (N, C, H, W) with {h} channel(s). Transpose it with "
        "x.transpose(0, 2, 3, 1) (numpy / jax.numpy arrays) before calling the model.")


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


def plain_tail(y: Any, shortcut: Any, *, norm: nn.Module, attn: nn.Module | None,
               act: Callable[[Any], Any], train: bool) -> Any:
  """The end of a residual block, one layer after another: ``act(attn(norm(y)) + shortcut)``.

  The plain counterpart of :func:`attention_flax.ops.residual_tail` (same values).
  """
  y = norm(y)
  if attn is not None:
    y = attn(y, train=train)
  return act(y + shortcut)
