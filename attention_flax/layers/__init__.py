"""Attention layers and their registry.

``create_attention(name, **kwargs)`` builds any layer by its short name; every layer reads
its channel count from its input, so ``create_attention("se")`` is complete. The registry
is one plain dict, ``ATTENTIONS``; ``list_attentions()`` gives its names.
"""

from __future__ import annotations

from flax import linen as nn

from attention_flax.layers.channel import ECA, EffectiveSE, GatherExcite, SqueezeExcite
from attention_flax.layers.common import get_act, make_divisible
from attention_flax.layers.hybrid import CBAM, GlobalContext
from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.layers.residual import ResidualAttention, ResidualUnit
from attention_flax.layers.spatial import CoordAttention, SpatialAttention
from attention_flax.layers.transformer import SpatialTransformer, affine_grid, grid_sample

ATTENTIONS: dict[str, type[nn.Module]] = {
    "se": SqueezeExcite,
    "ese": EffectiveSE,
    "eca": ECA,
    "ge": GatherExcite,
    "spatial": SpatialAttention,
    "cbam": CBAM,
    "gc": GlobalContext,
    "coord": CoordAttention,
    "residual": ResidualAttention,
    "stn": SpatialTransformer,
}


def list_attentions() -> list[str]:
  """The registered attention names, sorted."""
  return sorted(ATTENTIONS)


def create_attention(name: str, /, **kwargs) -> nn.Module:
  """Builds the attention layer registered as ``name`` with ``kwargs`` as its fields.

  Raises:
    ValueError: ``name`` is not registered (the message lists the known names).
  """
  try:
    cls = ATTENTIONS[name.lower()]
  except (KeyError, AttributeError):
    raise ValueError(
        f"Unknown attention {name!r}; known names: {', '.join(list_attentions())}.") from None
  return cls(**kwargs)


__all__ = [
    "ATTENTIONS", "CBAM", "CoordAttention", "ECA", "EffectiveSE", "GatherExcite",
    "GlobalContext", "ResidualAttention", "ResidualUnit", "SpatialAttention",
    "SpatialTransformer", "SqueezeExcite", "TorchBatchNorm", "affine_grid", "create_attention",
    "get_act", "grid_sample", "list_attentions", "make_divisible",
]
