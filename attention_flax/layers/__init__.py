"""Attention layers and their registry.

``create_attention(name, **kwargs)`` builds any layer by its short name; every layer reads
its channel count from its input, so ``create_attention("se")`` is complete.
``register_attention(name, factory)`` adds a layer of your own: it is then usable by name
here and as the ``attn`` of every model with an attention slot. ``list_attentions()``
gives the names.
"""

from __future__ import annotations

import functools
from typing import Callable

from flax import linen as nn

from attention_flax.layers.bam import BAM
from attention_flax.layers.channel import ECA, EffectiveSE, GatherExcite, SqueezeExcite
from attention_flax.layers.common import get_act, make_divisible
from attention_flax.layers.coord_variants import EfficientLocalAttn, SimpleCoordAttn, StripAttn
from attention_flax.layers.hybrid import CBAM, GlobalContext
from attention_flax.layers.nonlocal_attn import BilinearAttnTransform, NonLocal
from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.layers.residual import ResidualAttention, ResidualUnit
from attention_flax.layers.lambda_layer import LambdaLayer
from attention_flax.layers.self_attention import BottleneckAttn, HaloAttn
from attention_flax.layers.selective import SelectiveKernel
from attention_flax.layers.spatial import CoordAttention, SpatialAttention
from attention_flax.layers.split import SplitAttention
from attention_flax.layers.transformer import SpatialTransformer, affine_grid, grid_sample

ATTENTIONS: dict[str, Callable[..., nn.Module]] = {}


def register_attention(name: str, factory: Callable[..., nn.Module], *,
                       overwrite: bool = False) -> Callable[..., nn.Module]:
  """Makes ``factory`` (a module class or any callable returning a module, called with the
  layer's fields as keywords) buildable as ``name``. Returns ``factory``.

  Raises:
    ValueError: ``name`` is taken (pass ``overwrite=True`` to replace it) or not a
      lower-case identifier.
    TypeError: ``factory`` is not callable.
  """
  if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
    raise ValueError(f"Attention names are lower-case identifiers such as 'my_gate'; "
                     f"got {name!r}.")
  if not callable(factory):
    raise TypeError(f"register_attention needs a module class or factory; got {factory!r}.")
  if name in ATTENTIONS and not overwrite and ATTENTIONS[name] is not factory:
    raise ValueError(f"Attention {name!r} is already registered "
                     f"({ATTENTIONS[name]!r}); pass overwrite=True to replace it.")
  ATTENTIONS[name] = factory
  return factory


def list_attentions() -> list[str]:
  """The registered attention names, sorted."""
  return sorted(ATTENTIONS)


def create_attention(attn: str | Callable[..., nn.Module], /, **kwargs) -> nn.Module:
  """Builds the attention layer ``attn`` with ``kwargs`` as its fields (``name=`` too).

  ``attn`` is a registered name (case-insensitive) or a module factory, which is called
  with ``kwargs``.

  Raises:
    ValueError: ``attn`` is a name that is not registered (the message lists the names).
    TypeError: ``attn`` is neither a name nor callable.
  """
  if isinstance(attn, str):
    try:
      attn = ATTENTIONS[attn.lower()]
    except KeyError:
      raise ValueError(f"Unknown attention {attn!r}; known names: "
                       f"{', '.join(list_attentions())}, or pass a module factory.") from None
  if not callable(attn):
    raise TypeError(f"attn must be a registered attention name (see list_attentions()) or a "
                    f"module factory; got {attn!r}.")
  return attn(**kwargs)


register_attention("se", SqueezeExcite)
register_attention("ese", EffectiveSE)
register_attention("eca", ECA)
register_attention("ecam", functools.partial(ECA, use_mlp=True))
register_attention("ceca", functools.partial(ECA, padding="circular"))
register_attention("ge", GatherExcite)
register_attention("spatial", SpatialAttention)
register_attention("cbam", CBAM)
register_attention("lcbam", functools.partial(CBAM, light=True))
register_attention("gc", GlobalContext)
register_attention("gca", functools.partial(GlobalContext, fuse="add"))
register_attention("coord", CoordAttention)
register_attention("residual", ResidualAttention)
register_attention("stn", SpatialTransformer)
register_attention("sk", SelectiveKernel)
register_attention("nl", NonLocal)
register_attention("bat", BilinearAttnTransform)
register_attention("scoord", SimpleCoordAttn)
register_attention("ela", EfficientLocalAttn)
register_attention("strip", StripAttn)
register_attention("bottleneck", BottleneckAttn)
register_attention("halo", HaloAttn)
register_attention("lambda", LambdaLayer)
register_attention("bam", BAM)
register_attention("splat", SplitAttention)

__all__ = [
    "BottleneckAttn", "HaloAttn", "LambdaLayer",
    "ATTENTIONS", "BAM", "CBAM", "CoordAttention", "ECA", "EffectiveSE", "GatherExcite",
    "GlobalContext", "ResidualAttention", "ResidualUnit", "SpatialAttention",
    "SpatialTransformer", "SplitAttention", "SqueezeExcite", "TorchBatchNorm", "affine_grid", "create_attention",
    "get_act", "grid_sample", "list_attentions", "make_divisible", "register_attention",
    "SelectiveKernel",
    "BilinearAttnTransform", "EfficientLocalAttn", "NonLocal", "SimpleCoordAttn", "StripAttn",
]
