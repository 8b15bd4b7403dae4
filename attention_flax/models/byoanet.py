"""Self-attention ResNets: BoTNet, HaloNet and Lambda-ResNet on a ResNet-26-T trunk.

* Srinivas et al., "Bottleneck Transformers for Visual Recognition",
  https://arxiv.org/abs/2101.11605 (BoTNet: the 3x3 convolution of the last bottlenecks
  replaced by multi-head self-attention over the whole map).
* Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
  https://arxiv.org/abs/2103.12731 (HaloNet: blocked local attention with a halo).
* Bello, "LambdaNetworks: Modeling Long-Range Interactions Without Attention",
  https://arxiv.org/abs/2102.08602 (lambda layers, local position lambdas of size 9).

The networks are timm's ``botnet26t_256``, ``halonet26t`` and ``lambda_resnet26t``
(timm 1.0, ``timm/models/byoanet.py``), which share one trunk:

* stem "tiered": 3x3 conv-BN-ReLU of 24 (stride 2), 32 and 64 channels, then a 3x3/2 max
  pool (stride 4 in all);
* four stages of two blocks, output widths 256, 512, 1024, 2048, inner width a quarter,
  the first block of stages 2-4 strided. Stages 1-2 and the first block of stage 3 are
  bottlenecks (1x1, 3x3, 1x1); the second block of stage 3 and both of stage 4 are
  self-attention blocks, whose 3x3 convolution is the attention layer (stride 2 on the
  layer) followed by BN-ReLU ("post_attn");
* a block whose shape changes has a 1x1 strided conv + BN shortcut; the last BN of every
  block starts at zero scale;
* head: global average pool and a linear classifier.

The attention layers are those of :mod:`attention_flax.layers.self_attention` and
:mod:`attention_flax.layers.lambda_layer`: BoTNet's
``bottleneck`` (4 heads; its position tables fix the map, so ``botnet26t_256`` takes
256x256 images only), HaloNet's ``halo`` (8 heads, block 8, halo 2; H and W must be
multiples of 256) and ``lambda`` (4 heads, keys of 16, r = 9; H and W multiples of 32).

Flax names are timm's state-dict names with "." before an index replaced by "_" where
the index follows a name (``stem/conv1/conv``, ``stages_2/1/conv1_1x1/bn``,
``stages_2/1/self_attn/qkv``, ``stages_2/1/post_attn``, ``stages_1/0/shortcut/conv``,
``head/fc``), so :func:`attention_flax.convert.from_timm` maps timm weights one to one.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers import ATTENTIONS, create_attention
from attention_flax.layers.common import check_images, get_act, make_divisible
from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.layers.selective import ConvBnAct
from attention_flax.layers.spatial import norm_in_float32
from attention_flax.models.common import ModelEntry, check_model_images
from attention_flax.models.resnet import max_pool_3x3_s2

Array = jax.Array
ModuleDef = Callable[..., nn.Module]

BLOCK_KINDS = ("bottle", "self_attn")
# timm's ResNet-26-T plan: the kinds of the blocks of each stage.
RESNET26T_BLOCKS = (("bottle", "bottle"), ("bottle", "bottle"), ("bottle", "self_attn"),
                    ("self_attn", "self_attn"))


def _layer_class(attn: str | ModuleDef) -> Any:
  """The module class behind a registered name or a (partial of a) module class."""
  factory = ATTENTIONS.get(attn.lower()) if isinstance(attn, str) else attn
  while isinstance(factory, functools.partial):
    factory = factory.func
  return factory


def _layer_default(attn: str | ModuleDef, kwargs: Mapping[str, Any], field: str) -> Any:
  """The value of ``field`` the attention layer will have: from ``kwargs``, a partial's
  keywords, or the class default (None when it has no such field)."""
  if field in kwargs:
    return kwargs[field]
  factory = ATTENTIONS.get(attn.lower()) if isinstance(attn, str) else attn
  while isinstance(factory, functools.partial):
    if field in factory.keywords:
      return factory.keywords[field]
    factory = factory.func
  return getattr(factory, field, None)


class BottleneckBlock(nn.Module):
  """timm's byobnet ``BottleneckBlock``: conv1_1x1 -> conv2_kxk (3x3, strided) ->
  conv3_1x1 (no act) -> + shortcut -> act.

  Maps (N, H, W, C) to (N, ceil(H / strides), ceil(W / strides), features). Every conv is
  a conv-BN(-act) child (``conv``, ``bn``); the inner width is
  ``make_divisible(features * bottle_ratio)``. The shortcut (child ``shortcut``, 1x1
  strided conv + BN) exists when the shape changes, else it is the identity.

  Attributes:
    features: output channels.
    strides: stride of the 3x3 convolution and of the shortcut.
    bottle_ratio: inner width over output width.
    zero_init_last: start the BN scale of ``conv3_1x1`` at 0 (the block starts as its
      shortcut).
    conv, norm, act: layer factories (``norm`` without ``use_running_average``).
  """
  features: int
  strides: int = 1
  bottle_ratio: float = 0.25
  zero_init_last: bool = True
  conv: ModuleDef = ops.conv
  norm: ModuleDef = TorchBatchNorm
  act: str | Callable[[Array], Array] = "relu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _conv_bn(self, features: int, kernel_size: int, name: str, strides: int = 1,
               apply_act: bool = True, last: bool = False) -> ConvBnAct:
    norm = self.norm
    if last and self.zero_init_last:
      norm = functools.partial(norm, scale_init=nn.initializers.zeros_init())
    return ConvBnAct(features, kernel_size, strides=strides, apply_act=apply_act,
                     conv=self.conv, norm=norm, act=self.act, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name)

  def _width(self) -> int:
    return make_divisible(self.features * self.bottle_ratio)

  def _finish(self, x: Array, y: Array, train: bool) -> Array:
    """act(conv3_1x1(y) + shortcut(x))."""
    y = self._conv_bn(self.features, 1, "conv3_1x1", apply_act=False, last=True)(y, train)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = self._conv_bn(self.features, 1, "shortcut", strides=self.strides,
                        apply_act=False)(x, train)
    return get_act(self.act)(y + x.astype(y.dtype))

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    width = self._width()
    y = self._conv_bn(width, 1, "conv1_1x1")(x, train)
    y = self._conv_bn(width, 3, "conv2_kxk", strides=self.strides)(y, train)
    return self._finish(x, y, train)


class SelfAttnBlock(BottleneckBlock):
  """timm's byobnet ``SelfAttnBlock``: conv1_1x1 -> ATTN (strided) -> post_attn (BN, act)
  -> conv3_1x1 (no act) -> + shortcut -> act.

  Maps (N, H, W, C) to (N, H / strides, W / strides, features); H and W as the attention
  layer requires (even when strided). Fields as :class:`BottleneckBlock`, plus:

  Attributes:
    attn: the attention layer (child ``self_attn``): a registered name ("bottleneck",
      "halo", "lambda") or a module factory; it gets ``stride``, ``feat_size`` and,
      when it has such fields and ``attn_kwargs`` does not set them, the block's
      ``conv``, ``norm`` and dtypes.
    attn_kwargs: further fields of the attention layer.
    feat_size: (H, W) of the block's input, for layers whose position tables fix the map
      (BoTNet); None lets the layer take the size it is initialised on.
  """
  attn: str | ModuleDef = "bottleneck"
  attn_kwargs: Mapping[str, Any] | None = None
  feat_size: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    width = self._width()
    y = self._conv_bn(width, 1, "conv1_1x1")(x, train)
    kwargs = {"stride": self.strides, "feat_size": self.feat_size, "conv": self.conv,
              "norm": self.norm, "dtype": self.dtype, "param_dtype": self.param_dtype}
    fields = set(getattr(_layer_class(self.attn), "__dataclass_fields__", ("stride",)))
    kwargs = {k: v for k, v in kwargs.items() if k in fields}
    kwargs.update(self.attn_kwargs or {})
    y = create_attention(self.attn, name="self_attn", **kwargs)(y, train=train)
    y = get_act(self.act)(norm_in_float32(self.norm, y, train, self.param_dtype, "post_attn"))
    return self._finish(x, y, train)


class Stage(nn.Module):
  """A stage: the modules ``blocks`` (factories taking ``name``), applied in order as the
  children "0", "1", ... (timm's ``nn.Sequential`` indices). (N, H, W, C) in, the last
  block's output out."""
  blocks: Sequence[ModuleDef]

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for j, block in enumerate(self.blocks):
      x = block(name=str(j))(x, train=train)
    return x


class TieredStem(nn.Module):
  """timm's "tiered" stem: 3x3 conv-BN-act children ``conv1`` (stride 2), ``conv2``,
  ``conv3`` of ``widths``, then PyTorch's MaxPool2d(3, 2, padding 1) with ``pool``.
  (N, H, W, C) -> (N, ceil(H / 4), ceil(W / 4), widths[-1])."""
  widths: Sequence[int] = (24, 32, 64)
  conv: ModuleDef = ops.conv
  norm: ModuleDef = TorchBatchNorm
  act: str | Callable[[Array], Array] = "relu"
  pool: Callable[..., Array] = ops.max_pool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for i, width in enumerate(self.widths):
      x = ConvBnAct(width, 3, strides=2 if i == 0 else 1, conv=self.conv, norm=self.norm,
                    act=self.act, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"conv{i + 1}")(x, train)
    return max_pool_3x3_s2(self.pool, x)


class ClassifierHead(nn.Module):
  """Global average pool and the linear ``fc``: (N, H, W, C) -> (N, num_classes) float32."""
  num_classes: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                 dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
    return x.astype(jnp.float32)


class ByoaNet(nn.Module):
  """A ResNet of bottleneck and self-attention blocks (timm's ``ByobNet`` as configured
  for BoTNet, HaloNet and Lambda-ResNet; see the module docstring).

  Takes (N, H, W, C) images and returns (N, num_classes) float32 logits. The output of
  stage i (from 1) is sown as ``intermediates/stage{i}``; the attention layers sow their
  maps.

  Attributes:
    stage_blocks: per stage, the kind of each block, "bottle" or "self_attn".
    widths: per-stage output widths; strides: the stride of each stage's first block.
    bottle_ratio: inner width of every block over its output width.
    stem_widths: widths of the three stem convolutions.
    attn, attn_kwargs: the self-attention layer of the "self_attn" blocks (see
      :class:`SelfAttnBlock`).
    img_size: the input size (int or (H, W)) for layers with fixed position tables
      (BoTNet); the model refuses other sizes. None: any size the layers accept.
    num_classes: logits of the head.
    zero_init_last: zero-initialise the last BN scale of every block (timm's default).
    conv, norm, act, pool: layer factories (``norm`` defaults to :class:`TorchBatchNorm`,
      PyTorch's running-variance rule; ``pool`` has ``flax.linen.max_pool``'s signature).
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  stage_blocks: Sequence[Sequence[str]] = RESNET26T_BLOCKS
  widths: Sequence[int] = (256, 512, 1024, 2048)
  strides: Sequence[int] = (1, 2, 2, 2)
  bottle_ratio: float = 0.25
  stem_widths: Sequence[int] = (24, 32, 64)
  attn: str | ModuleDef = "bottleneck"
  attn_kwargs: Mapping[str, Any] | None = None
  img_size: int | Sequence[int] | None = None
  num_classes: int = 1000
  zero_init_last: bool = True
  conv: ModuleDef = ops.conv
  norm: ModuleDef = TorchBatchNorm
  act: str | Callable[[Array], Array] = "relu"
  pool: Callable[..., Array] = ops.max_pool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check(self, x: Array) -> tuple[int, int] | None:
    """Validates the fields and the image size; returns the fixed (H, W) or None."""
    module = type(self).__name__
    plan = tuple(tuple(kinds) for kinds in self.stage_blocks)
    if not plan or len(plan) != len(self.widths) or len(plan) != len(self.strides) or \
        any(not kinds for kinds in plan):
      raise ValueError(f"{module}: stage_blocks, widths and strides need one entry per "
                       f"stage and every stage a block; got {len(plan)}, "
                       f"{len(self.widths)} and {len(self.strides)} stages.")
    kinds = {k for stage in plan for k in stage}
    if not kinds <= set(BLOCK_KINDS):
      raise ValueError(f"{module}: unknown block kind(s) {sorted(kinds - set(BLOCK_KINDS))}; "
                       f"choose from {BLOCK_KINDS}.")
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}.")
    h, w = x.shape[1:3]
    fixed = None
    if self.img_size is not None:
      fixed = ((self.img_size,) * 2 if isinstance(self.img_size, int)
               else tuple(int(s) for s in self.img_size))
      if (h, w) != fixed:
        raise ValueError(
            f"{module} is built for {fixed[0]}x{fixed[1]} images (its attention's position "
            f"tables fix the map size) but got {h}x{w}; resize the images to "
            f"{fixed[0]}x{fixed[1]}, or create the model with img_size=({h}, {w}).")
    self._check_sizes(plan, h, w)
    return fixed

  def _check_sizes(self, plan: tuple[tuple[str, ...], ...], h: int, w: int) -> None:
    """Follows the map size through the network and refuses sizes an attention layer
    cannot take: odd maps into a strided one, maps not a multiple of a halo block."""
    kwargs = dict(self.attn_kwargs or {})
    block = _layer_default(self.attn, kwargs, "block_size") or 1
    multiple = 4 * math.prod(self.strides) * block
    sizes = [-(-h // 4), -(-w // 4)]  # the stem: two stride-2 steps, rounding up
    for i, (kinds, stride) in enumerate(zip(plan, self.strides)):
      for j, kind in enumerate(kinds):
        s = stride if j == 0 else 1
        if kind == "self_attn" and any(v % block or v % s for v in sizes):
          raise ValueError(
              f"{type(self).__name__}: the attention of block stages_{i}/{j} would see a "
              f"{sizes[0]}x{sizes[1]} map from {h}x{w} images, which it cannot take "
              f"(stride {s}, block size {block}); use images whose height and width are "
              f"multiples of {multiple}.")
        sizes = [-(-v // s) for v in sizes]

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    check_model_images(x, type(self).__name__)
    fixed = self._check(x)
    common = dict(conv=self.conv, norm=self.norm, act=self.act, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    x = TieredStem(widths=tuple(self.stem_widths), pool=self.pool, name="stem",
                   **common)(x, train=train)
    feat = None if fixed is None else (fixed[0] // 4, fixed[1] // 4)
    for i, (kinds, width, stride) in enumerate(zip(self.stage_blocks, self.widths,
                                                   self.strides)):
      blocks = []
      for j, kind in enumerate(kinds):
        s = stride if j == 0 else 1
        fields = dict(features=width, strides=s, bottle_ratio=self.bottle_ratio,
                      zero_init_last=self.zero_init_last, **common)
        if kind == "self_attn":
          blocks.append(functools.partial(SelfAttnBlock, attn=self.attn,
                                          attn_kwargs=self.attn_kwargs, feat_size=feat,
                                          **fields))
        else:
          blocks.append(functools.partial(BottleneckBlock, **fields))
        if feat is not None and s > 1:
          feat = (feat[0] // s, feat[1] // s)
      x = Stage(tuple(blocks), name=f"stages_{i}")(x, train=train)
      self.sow("intermediates", f"stage{i + 1}", x)
    return ClassifierHead(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="head")(x)


def resnet26t(attn: str, **fields: Any) -> Callable[..., ByoaNet]:
  """The factory of a ResNet-26-T with the self-attention layer ``attn`` in its last three
  blocks, plus any further :class:`ByoaNet` ``fields``."""
  return functools.partial(ByoaNet, attn=attn, **fields)


_BOT = "Srinivas et al. 2021 (BoTNet), arXiv 2101.11605"
_HALO = "Vaswani et al. 2021 (HaloNet), arXiv 2103.12731"
_LAMBDA = "Bello 2021 (LambdaNetworks), arXiv 2102.08602"

MODELS: dict[str, ModelEntry] = {
    "botnet26t_256": ModelEntry(
        resnet26t("bottleneck", img_size=256), 256,
        paper=f"{_BOT}; timm's BoT-ResNet-26-T, 256x256 only"),
    "halonet26t": ModelEntry(
        resnet26t("halo", attn_kwargs={"block_size": 8, "halo_size": 2}), 256,
        paper=f"{_HALO}; timm's HaloNet-26-T (block 8, halo 2)"),
    "lambda_resnet26t": ModelEntry(
        resnet26t("lambda", attn_kwargs={"r": 9}), 256,
        paper=f"{_LAMBDA}; timm's Lambda-ResNet-26-T (r = 9)"),
}
