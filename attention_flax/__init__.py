"""attention_flax: image attention mechanisms as pure Flax linen modules.

Layers (``attention_flax.layers``) take NHWC images and keep their shape; models
(``attention_flax.models``) compose them into ResNets, Residual Attention Networks and
spatial-transformer classifiers. Every module sows the masks it applies into the
``intermediates`` collection.
"""

from attention_flax.layers import (
    ATTENTIONS,
    BottleneckAttn,
    HaloAttn,
    LambdaLayer,
    BAM,
    BilinearAttnTransform,
    CBAM,
    ECA,
    CoordAttention,
    EffectiveSE,
    EfficientLocalAttn,
    GatherExcite,
    GlobalContext,
    NonLocal,
    ResidualAttention,
    ResidualUnit,
    SelectiveKernel,
    SimpleCoordAttn,
    SpatialAttention,
    SpatialTransformer,
    SplitAttention,
    SqueezeExcite,
    StripAttn,
    TorchBatchNorm,
    affine_grid,
    create_attention,
    grid_sample,
    list_attentions,
    make_divisible,
    register_attention,
)
from attention_flax import ops
from attention_flax.glimpses import extract_glimpses

__version__ = "0.1.0"

__all__ = [
    "BottleneckAttn", "HaloAttn", "LambdaLayer",
    "ATTENTIONS", "BAM", "CBAM", "CoordAttention", "ECA", "EffectiveSE", "GatherExcite",
    "GlobalContext", "ResidualAttention", "ResidualUnit", "SpatialAttention",
    "SpatialTransformer", "SplitAttention", "SqueezeExcite", "TorchBatchNorm", "affine_grid", "create_attention",
    "grid_sample", "list_attentions", "make_divisible", "ops", "register_attention",
    "SelectiveKernel",
    "BilinearAttnTransform", "EfficientLocalAttn", "NonLocal", "SimpleCoordAttn", "StripAttn",
    "extract_glimpses",
]
