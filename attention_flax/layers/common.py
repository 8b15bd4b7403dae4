"""Conventions shared by the attention layers: reduced widths, activations, input checks.

Every layer takes images in NHWC layout, (N, H, W, C), and validates them with
:func:`check_images` before any computation, and at apply time with :func:`check_layout`
against the channel count its parameters were made for.
"""

from __future__ import annotations

from typing import Callable, Mapping

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
                  rd_channels: int | Callable[[int], int] | None = None) -> int:
  """The hidden width of a gating MLP: explicit ``rd_channels`` or ``channels * rd_ratio``
  rounded with ``rd_divisor``; never below 1 however few channels there are.

  ``rd_channels`` may also be a function of the input channels, for widths no ratio and
  divisor give, e.g. ``lambda c: c // 16`` (the floor of PyTorch sketches' ``C // r``:
  1 for 24 channels, where timm's rounding gives 2).
  """
  if callable(rd_channels):
    width = rd_channels(channels)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
      raise ValueError(
          f"rd_channels({channels}) gave {width!r}; the hidden width must be an int >= 1. "
          f"Use e.g. lambda c: max(1, c // 16).")
    return width
  if rd_channels is not None:
    if rd_channels < 1:
      raise ValueError(f"rd_channels must be >= 1, got {rd_channels}.")
    return int(rd_channels)
  if rd_ratio <= 0.0:
    raise ValueError(f"rd_ratio must be positive, got {rd_ratio}.")
  return max(1, make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0))


def built_channels(module: nn.Module, *path: str, axis: int = -2, groups: int = 1
                   ) -> int | None:
  """The input channel count ``module``'s parameters were made for, or None when that
  cannot be read: while the module initialises (its parameters are then made from the
  input itself) or when the parameter at ``path`` is absent (another factory's layout).

  ``path`` leads from the module's parameters to an array whose size along ``axis``,
  times ``groups``, is the input width: ("fc1", "kernel") of a Dense (C, hidden) or of a
  convolution (kh, kw, C / groups, out) with the default ``axis=-2``; a depthwise kernel
  (kh, kw, 1, C) with ``axis=-1``.
  """
  if module.is_initializing():
    return None
  node = module.variables.get("params", {})
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  shape = getattr(node, "shape", None)
  if shape is None or len(shape) < abs(axis):
    return None
  return int(shape[axis]) * int(groups)


def check_layout(module: nn.Module, x: Array, *path: str, axis: int = -2,
                 groups: int = 1) -> None:
  """Raises a one-line ValueError when ``x`` (N, H, W, C) does not have the channel count
  read by :func:`built_channels` (same arguments), naming a channels-first batch (axis 1
  holding that count) as such. Does nothing when the count cannot be read."""
  channels = built_channels(module, *path, axis=axis, groups=groups)
  if channels is None or x.shape[-1] == channels:
    return
  name = type(module).__name__
  if x.ndim == 4 and x.shape[1] == channels:
    raise ValueError(
        f"{name} was initialised for {channels} channels but got shape {tuple(x.shape)}, "
        f"whose axis 1 holds them: a channels-first (NCHW) batch; layers take NHWC, "
        f"transpose with x.transpose(0, 2, 3, 1).")
  raise ValueError(
      f"{name} was initialised for {channels} channels but got {x.shape[-1]} (shape "
      f"{tuple(x.shape)}); apply it to inputs of the width it was initialised on, or "
      f"initialise it again. An NCHW batch needs x.transpose(0, 2, 3, 1).")


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
