"""Conventions shared by the attention layers: reduced widths, activations, input checks.

Every layer takes images in NHWC layout, (N, H, W, C), and validates them with
:func:`check_images` before any computation.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax.checks import accumulation_dtype, check_images  # noqa: F401  (re-exported)

Array = jax.Array
ActFn = Callable[[Array], Array]

# He et al. 2015 initialisation as PyTorch's kaiming_normal(mode="fan_out", relu): an
# untruncated normal of variance 2 / (kh * kw * out_channels).
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


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
