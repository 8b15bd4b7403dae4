"""attention_flax: image attention mechanisms as pure Flax linen modules.

Layers (``attention_flax.layers``) take NHWC images and keep their shape; models
(``attention_flax.models``) compose them into ResNets, Residual Attention Networks and
spatial-transformer classifiers. Every module sows the masks it applies into the
``intermediates`` collection.
"""

from attention_flax.layers import (
    ATTENTIONS,
    CBAM,
    ECA,
    CoordAttention,
    EffectiveSE,
    GatherExcite,
    GlobalContext,
    ResidualAttention,
    ResidualUnit,
    SpatialAttention,
    SpatialTransformer,
    SqueezeExcite,
    TorchBatchNorm,
    affine_grid,
    create_attention,
    grid_sample,
    list_attentions,
    make_divisible,
    register_attention,
)
from attention_flax import ops

__version__ = "0.1.0"

__all__ = [
    "ATTENTIONS", "CBAM", "CoordAttention", "ECA", "EffectiveSE", "GatherExcite",
    "GlobalContext", "ResidualAttention", "ResidualUnit", "SpatialAttention",
    "SpatialTransformer", "SqueezeExcite", "TorchBatchNorm", "affine_grid", "create_attention",
    "grid_sample", "list_attentions", "make_divisible", "ops", "register_attention",
]
