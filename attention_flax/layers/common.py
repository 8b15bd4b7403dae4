"""Conventions shared by every attention module: input checks, reduced widths, activations.

Every module in ``attention_flax.layers`` takes images in NHWC layout, (N, H, W, C), the
layout of Flax convolutions, and validates them with :func:`check_images` before any
computation so that a wrong rank or an integer image fails with a message naming the fix
instead of an XLA shape error.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
ActFn = Callable[[Array], Array]


def check_images(x: Array, module: str) -> None:
  """Raises a clear error unless ``x`` is a floating (N, H, W, C) batch."""
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(
        f"{module} expects images in NHWC layout, a rank-4 array (N, H, W, C); "
        f"got shape {shape}. Add a batch axis with x[None] for a single image, "
        "or transpose NCHW input with x.transpose(0, 2, 3, 1).")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{module} expects floating-point images; got dtype {x.dtype}. "
        "Convert first, e.g. x.astype(jnp.float32) / 255.")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.0) -> int:
  """Rounds a channel count to a multiple of ``divisor`` (timm's convention).

  ``max(min_value, int(value + divisor / 2) // divisor * divisor)`` with ``min_value``
  defaulting to ``divisor``; if rounding lost more than ``1 - round_limit`` of the value,
  one more ``divisor`` is added (``round_limit=0`` never adds). ``divisor=1`` rounds to the
  nearest integer (at least 1), which gives the papers' ``C // r`` for exact multiples.
  """
  min_value = divisor if min_value is None else min_value
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < round_limit * value:
    new_value += divisor
  return int(new_value)


def reduced_width(channels: int, rd_ratio: float, rd_divisor: int,
                  rd_channels: int | None = None) -> int:
  """The hidden width of a gating MLP: explicit ``rd_channels`` or ``channels * rd_ratio``
  rounded with ``rd_divisor``; never below 1 however few channels there are."""
  if rd_channels is not None:
    if rd_channels < 1:
      raise ValueError(f"rd_channels must be >= 1, got {rd_channels}.")
    return int(rd_channels)
  if rd_ratio <= 0.0:
    raise ValueError(f"rd_ratio must be positive, got {rd_ratio}.")
  return max(1, make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0))


_ACTIVATIONS: dict[str, ActFn] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "sigmoid": nn.sigmoid,
    "hard_sigmoid": nn.hard_sigmoid,
    "hard_swish": nn.hard_swish,
    "swish": nn.swish,
    "silu": nn.silu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def get_act(act: str | ActFn | None) -> ActFn:
  """An activation given by name (``"relu"``, ``"hard_sigmoid"``, ...) or as a callable."""
  if act is None:
    return _ACTIVATIONS["identity"]
  if callable(act):
    return act
  try:
    return _ACTIVATIONS[act]
  except KeyError:
    raise ValueError(
        f"Unknown activation {act!r}; known names: {sorted(_ACTIVATIONS)}, "
        "or pass any callable.") from None
