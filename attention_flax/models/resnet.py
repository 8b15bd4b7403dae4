"""ResNet v1 with a pluggable attention slot in every residual block.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385 (ImageNet stages: Table 1; CIFAR: Section 4.2, Table 6).
Attention modules sit where their papers put them, after the last batch norm of the
residual branch and before the addition: SENet https://arxiv.org/abs/1709.01507 ("se"),
CBAM https://arxiv.org/abs/1807.06521 ("cbam", "spatial"), ECA-Net
https://arxiv.org/abs/1910.03151 ("eca"), GCNet https://arxiv.org/abs/1904.11492 ("gc").
The "d" variants follow Bag of Tricks, https://arxiv.org/abs/1812.01187: a stem of three
3x3 convolutions (ResNet-C) and average-pool downsampling shortcuts (ResNet-D).

The stride sits on the bottleneck's 3x3 convolution (torchvision's "v1.5", timm's default).
Every padding is written out symmetrically, as PyTorch pads, so that converted
timm/torchvision weights sample the same pixels.

Naming: Flax submodule names are timm's state-dict module names with "." replaced by "_"
(``layer1_0/conv1``, ``layer2_0/downsample_0``, deep stem ``conv1_0``, ``conv1_1``, ...,
attention ``layer1_0/se``, classifier ``fc``). Convolutions are ``nn.Conv`` with kernels
(kh, kw, in, out); timm's are (out, in, kh, kw).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers import ATTENTIONS, create_attention
from attention_flax.layers.common import check_images, get_act, he_normal
from attention_flax.layers.norm import TorchBatchNorm, at_least_float32, batch_norm
from attention_flax.models.common import ModelEntry, check_model_images

Array = jax.Array
ModuleDef = Callable[..., nn.Module]

# PyTorch's nn.Linear default: uniform on +-1/sqrt(fan_in).
fc_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# PyTorch's BatchNorm2d defaults: momentum 0.1 (Flax's 0.9) and epsilon 1e-5.
DEFAULT_NORM = functools.partial(TorchBatchNorm, momentum=0.9, epsilon=1e-5)

STEMS = ("classic", "deep", "cifar")
DOWNSAMPLES = ("conv", "avg", "pad")


def padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric spatial padding of (k - 1) // 2 on every side, as PyTorch's padding=k//2.

  Flax's "SAME" pads (0, 1) for a stride-2 3x3 convolution on an even input, shifting the
  sampled pixels by one against PyTorch; explicit padding keeps weight parity.
  """
  p = (kernel_size - 1) // 2
  return ((p, p), (p, p))


def max_pool_3x3_s2(pool: Callable[..., Array], x: Array) -> Array:
  """PyTorch's MaxPool2d(3, stride 2, padding 1) with ``pool`` (``flax.linen.max_pool``'s
  signature): (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C). The padding is -inf, so the
  border never wins the max, as in PyTorch."""
  return pool(x, (3, 3), strides=(2, 2), padding=padding(3))


def avg_pool_2x2_ceil(x: Array, stride: int = 2) -> Array:
  """AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) on (N, H, W, C).

  Output size ceil((H - 2) / stride) + 1 (PyTorch's ceil-mode rule); on an odd size the last
  window hangs over the edge and is averaged over its real elements only.
  """
  def plan(size: int) -> tuple[int, np.ndarray]:
    """Padding after the edge and the real elements in each window along one axis."""
    out = -((2 - size) // stride) + 1
    if (out - 1) * stride >= size:  # PyTorch drops a window that starts past the edge.
      out -= 1
    starts = np.arange(out) * stride
    return (out - 1) * stride + 2 - size, np.minimum(starts + 2, size) - starts

  pad_h, count_h = plan(x.shape[1])
  pad_w, count_w = plan(x.shape[2])
  sums = jax.lax.reduce_window(
      x, np.zeros((), x.dtype), jax.lax.add, (1, 2, 2, 1), (1, stride, stride, 1),
      ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  counts = jnp.asarray(np.outer(count_h, count_w), x.dtype)
  return sums / counts[None, :, :, None]


def _fields_of(attn: str | Callable[..., nn.Module]) -> set[str] | None:
  """The dataclass fields of a registered name or module factory; None when unknown."""
  factory = ATTENTIONS.get(attn.lower()) if isinstance(attn, str) else attn
  while isinstance(factory, functools.partial):
    factory = factory.func
  fields = getattr(factory, "__dataclass_fields__", None)
  return set(fields) if fields is not None else None


def shortcut(x: Array, features: int, strides: int, down: str, conv: ModuleDef,
             norm: ModuleDef) -> Array:
  """The identity path of a block: (N, H, W, C) -> (N, H / strides, W / strides, features).

  Identity when neither size nor width changes; otherwise ``down`` picks the projection:
  "conv" 1x1 strided conv + BN (option B), "avg" 2x2 average pool then 1x1 conv + BN
  (ResNet-D), "pad" parameter-free subsampling with zero channels appended (option A).
  Must be called inside a compact method: it creates the block's ``downsample_*`` layers.
  """
  in_features = x.shape[-1]
  if strides == 1 and in_features == features:
    return x
  if down == "conv":
    x = conv(features, (1, 1), strides=strides, padding=padding(1), name="downsample_0")(x)
    return batch_norm(norm, x, name="downsample_1")
  if down == "avg":
    # timm keeps index 0 for the pool (an Identity when stride is 1), hence _1 and _2.
    if strides > 1:
      x = avg_pool_2x2_ceil(x, strides)
    x = conv(features, (1, 1), padding=padding(1), name="downsample_1")(x)
    return batch_norm(norm, x, name="downsample_2")
  if down == "pad":
    if features < in_features:
      raise ValueError(
          f"down='pad' (option A) can only widen: {in_features} -> {features} channels; "
          "use down='conv' to project to fewer channels.")
    # Subsampling picks the pixels a strided 1x1 convolution would see.
    x = x[:, ::strides, ::strides, :]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - in_features)))
  raise ValueError(f"Unknown down={down!r}; choose one of {DOWNSAMPLES}.")


class ResidualBlock(nn.Module):
  """Fields and tail shared by :class:`BasicBlock` and :class:`Bottleneck`.

  Attributes:
    features: block width (output channels = features * expansion).
    strides: stride of the block's strided convolution and of its shortcut.
    down: shortcut projection when the shape changes: "conv", "avg" or "pad".
    attn: None, a registered attention name or a module factory; runs on the residual
      branch after the last batch norm, before the addition (child ``se``).
    attn_kwargs: extra fields for the attention layer.
    zero_init_last: start the last BN scale at 0 so the block starts as its shortcut.
    conv, norm, act: layer factories (``norm`` without ``use_running_average``).
    tail: ``tail(y, shortcut, *, norm, attn, act, train)``, the end of the block,
      ``act(attn(norm(y)) + shortcut)``; None takes the block's default from
      :mod:`attention_flax.ops` (a channel gate folded into the norm; the same values).
      :func:`~attention_flax.models.common.plain_tail` applies the layers one by one.
  """
  expansion: ClassVar[int] = 1
  default_tail: ClassVar[Callable[..., Array]] = staticmethod(ops.residual_tail)

  features: int
  strides: int = 1
  down: str = "conv"
  attn: str | Callable[..., nn.Module] | None = None
  attn_kwargs: Mapping[str, Any] | None = None
  zero_init_last: bool = True
  conv: ModuleDef = ops.conv
  norm: ModuleDef = DEFAULT_NORM
  act: str | Callable[[Array], Array] = "relu"
  tail: Callable[..., Array] | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _layers(self, train: bool) -> tuple[ModuleDef, ModuleDef, Callable]:
    """The conv and norm factories in the block's dtypes, and the activation."""
    conv = functools.partial(self.conv, use_bias=False, kernel_init=he_normal,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    return conv, norm, get_act(self.act)

  def _end(self, x: Array, y: Array, conv: ModuleDef, norm: ModuleDef, train: bool,
           bn_name: str) -> Array:
    """act(ATTN(BN(y)) + shortcut(x)); y is the residual branch before its last BN."""
    attn = None
    if self.attn is not None:
      # attn_kwargs may override the dtypes (e.g. gates in float32 in a bfloat16 model).
      kwargs = {"dtype": self.dtype, "param_dtype": self.param_dtype,
                **dict(self.attn_kwargs or {})}
      attn = create_attention(self.attn, name="se", **kwargs)
    last_scale = nn.initializers.zeros_init() if self.zero_init_last else nn.initializers.ones
    bn = norm(name=bn_name, scale_init=last_scale)
    short = shortcut(x, self.features * self.expansion, self.strides, self.down, conv, norm)
    tail = self.tail or self.default_tail
    return tail(at_least_float32(y), short, norm=bn, attn=attn, act=get_act(self.act),
                train=train)


class BasicBlock(ResidualBlock):
  """Two 3x3 convolutions: conv-bn-act-conv-bn-ATTN-(+shortcut)-act.

  Maps (N, H, W, C) to (N, H / strides, W / strides, features).
  """
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    conv, norm, act = self._layers(train)
    y = conv(self.features, (3, 3), strides=self.strides, padding=padding(3), name="conv1")(x)
    y = act(batch_norm(norm, y, name="bn1"))
    y = conv(self.features, (3, 3), padding=padding(3), name="conv2")(y)
    return self._end(x, y, conv, norm, train, "bn2")


class Bottleneck(ResidualBlock):
  """1x1 reduce, 3x3 (strided), 1x1 expand: ...conv3-bn3-ATTN-(+shortcut)-act.

  Maps (N, H, W, C) to (N, H / strides, W / strides, 4 * features); ``features`` is the
  inner (bottleneck) width.
  """
  expansion: ClassVar[int] = 4
  default_tail: ClassVar[Callable[..., Array]] = staticmethod(ops.bottleneck_tail)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    conv, norm, act = self._layers(train)
    y = conv(self.features, (1, 1), padding=padding(1), name="conv1")(x)
    y = act(batch_norm(norm, y, name="bn1"))
    y = conv(self.features, (3, 3), strides=self.strides, padding=padding(3), name="conv2")(y)
    y = act(batch_norm(norm, y, name="bn2"))
    y = conv(self.features * self.expansion, (1, 1), padding=padding(1), name="conv3")(y)
    return self._end(x, y, conv, norm, train, "bn3")


class ResNet(nn.Module):
  """ResNet v1 classifier: stem, stages of residual blocks, global average pool, ``fc``.

  Takes (N, H, W, C) images and returns (N, num_classes) float32 logits. The output of
  stage i (from 1) is sown as ``intermediates/stage{i}``; attention layers sow their masks.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50 (He et al. Table 1).
    block: ``BasicBlock`` or ``Bottleneck``.
    stem: "classic" (7x7/2 conv + 3x3/2 max-pool), "deep" (3x3/2, 3x3, 3x3 convs of
      stem_width/2, stem_width/2, stem_width + max-pool; ResNet-C) or "cifar" (one 3x3
      conv, stride 1, no pool).
    down: shortcut projection: "conv" (option B), "avg" (ResNet-D) or "pad" (option A,
      parameter-free); None picks "pad" for the CIFAR stem, as the paper's CIFAR
      experiments, and "conv" otherwise.
    widths: per-stage block widths (inner width for bottlenecks).
    stem_width: stem output channels; None = widths[0].
    attn, attn_kwargs: attention layer of every block (see :class:`BasicBlock`).
    num_classes: logits of the ``fc`` head.
    zero_init_last: zero-initialise the last BN scale of every block (timm's default).
    tail: the end of every block (see :class:`ResidualBlock`); None: the block's default.
    stage_attn, stage_attn_kwargs, stage_attn_after: an attention module between stages
      (BAM's placement, Park et al. 2018): the output of stage i (from 1) passes through
      the child ``bam{i}`` (the BAM authors' name), built as ``stage_attn`` with
      ``stage_attn_kwargs`` and, where it has such fields, the model's ``conv``, ``norm``
      and dtypes, for each i in ``stage_attn_after``; None adds nothing.
    bn_momentum, bn_epsilon: Flax convention (0.9 == PyTorch's momentum 0.1).
    conv, norm, act: layer factories injected into stem and blocks. ``conv`` has
      ``flax.linen.Conv``'s signature (the default :data:`attention_flax.ops.conv` gives
      its values, faster); ``norm`` defaults to :class:`TorchBatchNorm` (PyTorch's
      unbiased running variance, as the attention layers' batch norms), so running
      statistics evolve as timm's; ``flax.linen.BatchNorm`` takes the same arguments and
      variable names.
    pool: the stem's max pool, ``flax.linen.max_pool``'s signature.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  stage_sizes: Sequence[int]
  block: type[nn.Module] = BasicBlock
  stem: str = "classic"
  down: str | None = None
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int | None = None
  attn: str | Callable[..., nn.Module] | None = None
  attn_kwargs: Mapping[str, Any] | None = None
  num_classes: int = 1000
  zero_init_last: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  conv: ModuleDef = ops.conv
  norm: ModuleDef = TorchBatchNorm
  act: str | Callable[[Array], Array] = "relu"
  pool: Callable[..., Array] = ops.max_pool
  tail: Callable[..., Array] | None = None
  stage_attn: str | Callable[..., nn.Module] | None = None
  stage_attn_kwargs: Mapping[str, Any] | None = None
  stage_attn_after: Sequence[int] = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check_config(self) -> str:
    """Validates the fields in Python; returns the resolved ``down``."""
    if self.stem not in STEMS:
      raise ValueError(f"Unknown stem={self.stem!r}; choose one of {STEMS}.")
    down = self.down or ("pad" if self.stem == "cifar" else "conv")
    if down not in DOWNSAMPLES:
      raise ValueError(f"Unknown down={self.down!r}; choose one of {DOWNSAMPLES} or None.")
    sizes, widths = tuple(self.stage_sizes), tuple(self.widths)
    if not sizes or len(sizes) != len(widths) or min(sizes) < 1:
      raise ValueError(f"stage_sizes {sizes} and widths {widths} must be of equal length "
                       "(one width per stage), with at least one block per stage.")
    if not hasattr(self.block, "expansion"):
      raise TypeError(f"block must be BasicBlock, Bottleneck or a module class with an "
                      f"'expansion' attribute; got {self.block!r}.")
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}.")
    after = tuple(self.stage_attn_after)
    if any(not isinstance(i, int) or not 1 <= i <= len(sizes) for i in after):
      raise ValueError(f"stage_attn_after names stages from 1 to {len(sizes)}; got {after}. "
                       "BAM's placement is after every stage but the last: (1, 2, 3).")
    return down

  def _stage_module(self, index: int, norm: ModuleDef) -> nn.Module:
    """The attention module after stage ``index`` (see ``stage_attn``)."""
    kwargs = {"conv": self.conv, "norm": norm, "dtype": self.dtype,
              "param_dtype": self.param_dtype}
    fields = _fields_of(self.stage_attn)
    if fields is not None:  # only the fields it has: a channel gate has no conv or norm
      kwargs = {k: v for k, v in kwargs.items() if k in fields}
    kwargs.update(self.stage_attn_kwargs or {})
    return create_attention(self.stage_attn, name=f"bam{index}", **kwargs)

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    check_model_images(x, type(self).__name__)
    down = self._check_config()
    block_norm = functools.partial(self.norm, momentum=self.bn_momentum,
                                   epsilon=self.bn_epsilon)
    conv = functools.partial(self.conv, use_bias=False, kernel_init=he_normal,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(block_norm, use_running_average=not train, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    act = get_act(self.act)
    stem_width = self.stem_width or self.widths[0]

    if self.stem == "classic":
      x = conv(stem_width, (7, 7), strides=2, padding=padding(7), name="conv1")(x)
      x = max_pool_3x3_s2(self.pool, act(batch_norm(norm, x, name="bn1")))
    elif self.stem == "deep":
      # timm's nn.Sequential indices: 0 conv, 1 bn, 2 act, 3 conv, 4 bn, 5 act, 6 conv.
      half = stem_width // 2
      x = conv(half, (3, 3), strides=2, padding=padding(3), name="conv1_0")(x)
      x = act(batch_norm(norm, x, name="conv1_1"))
      x = conv(half, (3, 3), padding=padding(3), name="conv1_3")(x)
      x = act(batch_norm(norm, x, name="conv1_4"))
      x = conv(stem_width, (3, 3), padding=padding(3), name="conv1_6")(x)
      x = max_pool_3x3_s2(self.pool, act(batch_norm(norm, x, name="bn1")))
    else:  # cifar: 32x32 inputs keep their resolution into the first stage.
      x = conv(stem_width, (3, 3), padding=padding(3), name="conv1")(x)
      x = act(batch_norm(norm, x, name="bn1"))

    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(num_blocks):
        x = self.block(
            features=width, strides=2 if i > 0 and j == 0 else 1, down=down,
            attn=self.attn, attn_kwargs=self.attn_kwargs,
            zero_init_last=self.zero_init_last, conv=self.conv, norm=block_norm,
            act=self.act, tail=self.tail, dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=f"layer{i + 1}_{j}")(x, train=train)
      if self.stage_attn is not None and i + 1 in tuple(self.stage_attn_after):
        x = self._stage_module(i + 1, block_norm)(x, train=train)
      self.sow("intermediates", f"stage{i + 1}", x)

    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=fc_kernel_init, name="fc")(x)
    return x.astype(jnp.float32)


# He et al. Table 1: blocks per stage of the ImageNet networks.
IMAGENET_DEPTHS: dict[int, tuple[tuple[int, ...], type[nn.Module]]] = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), Bottleneck),
    101: ((3, 4, 23, 3), Bottleneck),
    152: ((3, 8, 36, 3), Bottleneck),
}
# He et al. Section 4.2: 6n + 2 layers, n basic blocks in each of 3 stages of 16/32/64.
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
CIFAR_WIDTHS = (16, 32, 64)

_HE = "He et al. 2016, arXiv 1512.03385"
_SE = "Hu et al. 2018 (SENet), arXiv 1709.01507"
_CBAM = "Woo et al. 2018 (CBAM), arXiv 1807.06521"
_ECA = "Wang et al. 2020 (ECA-Net), arXiv 1910.03151"
_GC = "Cao et al. 2019 (GCNet), arXiv 1904.11492"
_TRICKS = "He et al. 2019 (Bag of Tricks), arXiv 1812.01187"


def imagenet_resnet(depth: int, **fields: Any) -> Callable[..., ResNet]:
  """The factory of an ImageNet ResNet-``depth`` with extra ResNet ``fields``."""
  stage_sizes, block = IMAGENET_DEPTHS[depth]
  return functools.partial(ResNet, stage_sizes=stage_sizes, block=block, **fields)


def cifar_resnet(depth: int, **fields: Any) -> Callable[..., ResNet]:
  """The factory of a CIFAR ResNet-``depth`` (depth = 6n + 2) with extra ResNet ``fields``."""
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, ...); got {depth}.")
  n = (depth - 2) // 6
  return functools.partial(ResNet, stage_sizes=(n, n, n), block=BasicBlock, stem="cifar",
                           widths=CIFAR_WIDTHS, **fields)


MODELS: dict[str, ModelEntry] = {}
for _d in IMAGENET_DEPTHS:
  MODELS[f"resnet{_d}"] = ModelEntry(imagenet_resnet(_d), 224,
                                     paper=f"{_HE}, Table 1 (ResNet-{_d})")
  MODELS[f"seresnet{_d}"] = ModelEntry(
      imagenet_resnet(_d, attn="se"), 224,
      paper=f"{_SE}, Table 2" if _d >= 50 else f"{_SE}, SE blocks on ResNet-{_d}")
MODELS["resnet50d"] = ModelEntry(
    imagenet_resnet(50, stem="deep", down="avg"), 224,
    paper=f"{_TRICKS}, Fig. 2 ResNet-C stem + ResNet-D shortcut")
MODELS["ecaresnet50d"] = ModelEntry(
    imagenet_resnet(50, stem="deep", down="avg", attn="eca"), 224,
    paper=f"{_ECA} on ResNet-50-D ({_TRICKS}); ECA-Net50 77.48% top-1")
for _d in (18, 50):
  MODELS[f"cbam_resnet{_d}"] = ModelEntry(imagenet_resnet(_d, attn="cbam"), 224,
                                          paper=f"{_CBAM}, Table 4 (ResNet{_d} + CBAM)")
MODELS["gcresnet50"] = ModelEntry(imagenet_resnet(50, attn="gc"), 224,
                                  paper=f"{_GC}, GC block in every bottleneck")
MODELS["sa_resnet50"] = ModelEntry(imagenet_resnet(50, attn="spatial"), 224,
                                   paper=f"{_CBAM}, spatial attention module alone")
# ResNet-20, option A, 10 classes, by hand: stem 3*16*9 + 2*16 = 464; stage 1: 3 blocks of
# 2*(16*16*9) + 4*16 = 4,672; stage 2: 16*32*9 + 32*32*9 + 4*32 = 13,952, then 2 * 18,560;
# stage 3: 32*64*9 + 64*64*9 + 4*64 = 55,552, then 2 * 73,984; fc 64*10 + 10 = 650.
# Total 269,722 (Table 6: 0.27M); option B adds 2,752 for two 1x1 projections + BN.
for _d in CIFAR_DEPTHS:
  MODELS[f"resnet{_d}"] = ModelEntry(cifar_resnet(_d), 32,
                                     paper=f"{_HE}, Table 6 (CIFAR-10 ResNet-{_d})")
  for _prefix, _attn, _cite in (("se", "se", _SE), ("cbam", "cbam", _CBAM),
                                ("eca", "eca", _ECA)):
    MODELS[f"{_prefix}_resnet{_d}"] = ModelEntry(
        cifar_resnet(_d, attn=_attn), 32,
        paper=f"{_cite} on {_HE}, Table 6 (CIFAR ResNet-{_d})")

# Tiny variants for fast forward-pass tests: two stages of one block each.
_TINY = dict(stage_sizes=(1, 1), block=BasicBlock, widths=(8, 16))
MODELS["test_resnet_tiny"] = ModelEntry(functools.partial(ResNet, **_TINY), 32,
                                        test_only=True)
for _attn in ("se", "ese", "eca", "ge", "spatial", "cbam", "gc", "coord"):
  MODELS[f"test_resnet_tiny_{_attn}"] = ModelEntry(
      functools.partial(ResNet, attn=_attn, **_TINY), 32, test_only=True)
# Bottleneck + ResNet-D: 26 px input reaches the stride-2 average pool at an odd 7x7.
MODELS["test_resnetd_tiny"] = ModelEntry(
    functools.partial(ResNet, stage_sizes=(1, 1), block=Bottleneck, widths=(4, 8),
                      stem="deep", down="avg", stem_width=16), 26, test_only=True)
MODELS["test_resnet_cifar_tiny"] = ModelEntry(
    functools.partial(ResNet, stage_sizes=(1, 1, 1), block=BasicBlock, widths=(4, 8, 16),
                      stem="cifar"), 8, test_only=True)
