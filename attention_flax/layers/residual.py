"""Residual Attention: a bottom-up top-down soft mask that re-weights a trunk of units.

Wang et al., "Residual Attention Network for Image Classification", CVPR 2017,
https://arxiv.org/abs/1704.06904. The structure follows the authors' Caffe prototxts
(``Attention-56-deploy.prototxt`` / ``Attention-92-deploy.prototxt``).

Building block: the pre-activation bottleneck unit (BN-act-1x1, BN-act-3x3, BN-act-1x1).
Each unit owns the batch norm on its own input; the prototxt names that norm after the
tensor it normalises (e.g. ``pool1_3x3_s2/bn`` is the first unit's ``bn1``), so every
prototxt BN and convolution still has exactly one counterpart here. All convolutions are
convolutions from the ``conv`` factory (1x1 included) without bias; a Caffe/PyTorch kernel (O, I, kh, kw) maps onto the
Flax kernel ``w.transpose(2, 3, 1, 0)`` (kh, kw, I, O). Batch norms use momentum 0.9 and
epsilon 1e-5 (PyTorch's 0.1 and 1e-5), settable.

Deliberate differences from the Caffe definition:
* Max-pools are 3x3, stride 2, padding 1 (PyTorch style, output ``ceil(H / 2)``); Caffe
  used padding 0 in ceil mode, which gives the same sizes for even H but shifts the
  windows by one pixel.
* Up-sampling is bilinear with ``align_corners=False`` (half-pixel centres, the convention of
  ``jax.image.resize`` and of PyTorch's ``F.interpolate``) by default. The paper's Caffe
  ``Interp`` layer aligned the corner pixels (``align_corners=True``); that is available as
  an option for running converted weights. The default keeps every scale sampled at the
  same pixel centres whatever the size, and the mask is learnt, so the choice does not
  limit the model.
* The released Attention-92 prototxt replaces the sigmoid of some masks by TanH (seen in
  module ``AttentionC_2``); the paper and this module use a sigmoid, and ``gate`` selects
  any other.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.common import check_images, check_layout, get_act, he_normal
from attention_flax.layers.norm import TorchBatchNorm, batch_norm

Array = jax.Array

ModuleDef = Callable[..., nn.Module]


def _check_count(value: Any, name: str, minimum: int, owner: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{owner}.{name} must be an int >= {minimum}; got {value!r}.")
  return int(value)


def _corner_aligned_weights(size_in: int, size_out: int) -> np.ndarray:
  """The (size_out, size_in) matrix of 1-D linear interpolation that maps the first and
  last pixel centres onto each other (output pixel i samples i * (in - 1) / (out - 1))."""
  scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
  src = np.clip(np.arange(size_out, dtype=np.float64) * scale, 0.0, size_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = src - lo
  weights = np.zeros((size_out, size_in), np.float64)
  np.add.at(weights, (np.arange(size_out), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(size_out), hi), frac)
  return weights


def resize_bilinear(x: Array, size: Sequence[int], align_corners: bool = False) -> Array:
  """Bilinear resize of (N, H, W, C) images to (N, size[0], size[1], C).

  ``align_corners=False`` samples at half-pixel centres (``jax.image.resize``, PyTorch's
  ``F.interpolate`` default); ``True`` maps corner pixel centres onto each other (Caffe's
  ``Interp`` layer, PyTorch's ``UpsamplingBilinear2d``). Sizes are static, so the
  interpolation weights are built once at trace time; the result keeps ``x.dtype``.
  """
  check_images(x, "resize_bilinear")
  n, h, w, c = x.shape
  out_h, out_w = int(size[0]), int(size[1])
  if (out_h, out_w) == (h, w):
    return x
  if not align_corners:
    # Without antialiasing a down-scale is plain bilinear too, as in F.interpolate.
    return jax.image.resize(x, (n, out_h, out_w, c), "bilinear", antialias=False)
  rows = jnp.asarray(_corner_aligned_weights(h, out_h), x.dtype)
  cols = jnp.asarray(_corner_aligned_weights(w, out_w), x.dtype)
  return jnp.einsum("oh,nhwc,pw->nopc", rows, x, cols)


def _norm(module: nn.Module, name: str, x: Array, train: bool) -> Array:
  """``module.norm`` as the child ``name`` of ``module``, with its ``bn_momentum`` and
  ``bn_epsilon`` (by default :class:`TorchBatchNorm`, PyTorch's running-variance rule)."""
  return batch_norm(module.norm, x, name=name, use_running_average=not train,
                    momentum=module.bn_momentum, epsilon=module.bn_epsilon, dtype=module.dtype,
                    param_dtype=module.param_dtype)


class ResidualUnit(nn.Module):
  """The pre-activation bottleneck residual unit of the Residual Attention Network.

  ``y = conv3(act(bn3(conv2(act(bn2(conv1(a))))))) + shortcut`` with ``a = act(bn1(x))``;
  ``conv1`` is 1x1 to ``features // bottleneck_ratio`` channels, ``conv2`` 3x3 with the
  stride and one pixel of padding each side, ``conv3`` 1x1 back to ``features``. The
  shortcut is ``x`` itself when the shape is unchanged, else the 1x1 convolution
  ``shortcut`` (with the stride) of the pre-activated ``a``, as in the prototxt's
  ``branch2`` and in pre-activation ResNets.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    features: output channels; None keeps the input's.
    stride: spatial stride of the 3x3 convolution (and of the projection).
    bottleneck_ratio: ``features`` over the bottleneck width (4 in the paper).
    act: activation after each norm.
    bn_momentum, bn_epsilon: BatchNorm settings (PyTorch defaults in Flax terms).
    norm: the BatchNorm factory, called with ``use_running_average``, ``momentum``,
      ``epsilon``, ``dtype``, ``param_dtype`` and ``name`` (``flax.linen.BatchNorm`` also
      fits; its variables have the same names).
    conv: the convolution factory (``flax.linen.Conv``'s signature; the default
      :data:`attention_flax.ops.conv` gives its values, faster).
    dtype: compute dtype (None: Flax's promotion of input and parameters).
    param_dtype: parameter dtype.

  Input (N, H, W, C); output (N, ceil(H / stride), ceil(W / stride), features).
  """
  features: int | None = None
  stride: int = 1
  bottleneck_ratio: int = 4
  act: str | Callable = "relu"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  norm: ModuleDef = TorchBatchNorm
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "conv1", "kernel")
    name = type(self).__name__
    channels = x.shape[-1]
    features = channels if self.features is None else _check_count(
        self.features, "features", 1, name)
    stride = _check_count(self.stride, "stride", 1, name)
    ratio = _check_count(self.bottleneck_ratio, "bottleneck_ratio", 1, name)
    width = max(1, features // ratio)
    act = get_act(self.act)

    def conv(out, kernel, conv_stride, conv_name):
      pad = (kernel - 1) // 2
      return self.conv(out, (kernel, kernel), strides=(conv_stride, conv_stride),
                       padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype, kernel_init=he_normal, name=conv_name)

    pre = act(_norm(self, "bn1", x, train))
    y = conv(width, 1, 1, "conv1")(pre)
    y = act(_norm(self, "bn2", y, train))
    y = conv(width, 3, stride, "conv2")(y)
    y = act(_norm(self, "bn3", y, train))
    y = conv(features, 1, 1, "conv3")(y)
    if stride != 1 or features != channels:
      shortcut = conv(features, 1, stride, "shortcut")(pre)
    else:
      shortcut = x
    return y + shortcut.astype(y.dtype)


class ResidualAttention(nn.Module):
  """The Attention Module: ``(1 + M(x)) * T(x)`` between pre- and post-processing units.

  With ``u`` a :class:`ResidualUnit` keeping the width:

  * ``p`` units first (children ``pre1..``); their output ``x'`` feeds both branches.
  * Trunk ``T``: ``t`` units (``trunk1..``).
  * Soft mask ``M`` from ``x'``: ``levels`` times [max-pool 3x3/2, then ``r`` units
    (``down{level}_{j}``)], except that the lowest level has ``2 r`` units (the prototxt's
    two units at the bottom); a skip unit ``skip{level}`` taps every level but the lowest.
    Back up: for ``level = levels - 1 .. 1``, bilinear up-sampling to the skip's size, plus
    the skip, then ``r`` units (``up{level}_{j}``). A last up-sampling to the trunk's size,
    then BN-act-1x1 conv, BN-act-1x1 conv (children ``mask_bn1``, ``mask_conv1``,
    ``mask_bn2``, ``mask_conv2``; the convolutions have no bias, as in the prototxt) and
    ``gate`` give ``M``, sown as ``"residual_mask"`` (N, H, W, features). Only the skip
    branches are added on the way up: the pre-pool feature of a level is never added again.
  * Output ``(1 + M) * T`` through ``p`` more units (``post1..``). With ``naive=True`` the
    output is ``M * T`` instead, the paper's "naive attention learning" (Sec. 3.1 and
    Table 3), which it argues degrades deep features because masks in [0, 1] multiply
    up module after module; the trunk is sown as ``"trunk"`` so both can be checked.

  Prototxt names (module ``AttentionA_1`` etc.): ``pre1`` = ``trunk/res1``, ``trunk{i}`` =
  ``trunk/res{i+1}``, ``down{l}_{j}`` / ``skip{l}`` / ``up{l}_{j}`` = ``mask/down_sample/
  res{l}_{j}`` / ``mask/skip/res{l}`` / ``mask/up_sample/res{l}_{j}``, ``mask_bn1``,
  ``mask_conv1``, ``mask_bn2``, ``mask_conv2`` = ``mask/up_sample/interp_1/bn``,
  ``mask/linear_1``, ``mask/linear_1/bn``, ``mask/linear_2``, ``post1`` = ``branch1`` (its
  ``bn1`` is ``fusion/bn``).

  Up-sampling targets are the actual sizes of the tensors, so any H, W >= 1 works (odd
  sizes pool to ``ceil(H / 2)``). The paper's stages use ``levels`` 3, 2 and 1 for
  56x56, 28x28 and 14x14 features (down to 7x7 each time), with p, t, r = 1, 2, 1.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    p, t, r: units before/after, in the trunk, and between poolings of the mask.
    levels: number of max-poolings in the mask branch (>= 1).
    naive: output ``M * T`` (naive attention learning) instead of ``(1 + M) * T``.
    features: output channels; None keeps the input's (a change happens in ``pre1``).
    bottleneck_ratio: width ratio of every unit.
    align_corners: up-sampling convention (False: half-pixel centres; True: Caffe's).
    act: activation after each norm; gate: the mask's squashing function.
    bn_momentum, bn_epsilon, norm, conv: BatchNorm settings and the norm and convolution
      factories, as in ResidualUnit.
    pool: the mask branch's max pool, ``flax.linen.max_pool``'s signature.
    dtype, param_dtype: compute and parameter dtypes.

  Input (N, H, W, C); output (N, H, W, features).
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"residual_mask": "residual_mask"}

  p: int = 1
  t: int = 2
  r: int = 1
  levels: int = 3
  features: int | None = None
  bottleneck_ratio: int = 4
  naive: bool = False
  align_corners: bool = False
  act: str | Callable = "relu"
  gate: str | Callable = "sigmoid"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  norm: ModuleDef = TorchBatchNorm
  conv: ModuleDef = ops.conv
  pool: Callable[..., Array] = nn.max_pool
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "pre1" if self.p else "trunk1", "conv1", "kernel")
    name = type(self).__name__
    p = _check_count(self.p, "p", 0, name)
    t = _check_count(self.t, "t", 0, name)
    r = _check_count(self.r, "r", 1, name)
    levels = _check_count(self.levels, "levels", 1, name)
    channels = x.shape[-1]
    features = channels if self.features is None else _check_count(
        self.features, "features", 1, name)
    if features != channels and p == 0:
      raise ValueError(
          f"{name} changes the width ({channels} -> {features}) in its first pre-processing "
          "unit; with p=0 there is none. Use p >= 1, or features=None to keep the width.")

    def unit(unit_name, out=None):
      return ResidualUnit(features=out, bottleneck_ratio=self.bottleneck_ratio, act=self.act,
                          bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                          norm=self.norm, conv=self.conv, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=unit_name)

    for i in range(p):
      x = unit(f"pre{i + 1}", features)(x, train)

    trunk = x
    for i in range(t):
      trunk = unit(f"trunk{i + 1}")(trunk, train)

    # Bottom-up: pool, units; remember a skip branch at every level but the lowest.
    mask = x
    skips = []
    for level in range(1, levels + 1):
      # 3x3 stride 2, one pixel of (-inf) padding each side: ceil(H / 2), any H >= 1.
      mask = self.pool(mask, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
      for j in range(r if level < levels else 2 * r):
        mask = unit(f"down{level}_{j + 1}")(mask, train)
      if level < levels:
        skips.append(unit(f"skip{level}")(mask, train))
    # Top-down: up-sample to the skip's size, add the skip, units.
    for level in range(levels - 1, 0, -1):
      skip = skips[level - 1]
      mask = resize_bilinear(mask, skip.shape[1:3], self.align_corners) + skip
      for j in range(r):
        mask = unit(f"up{level}_{j + 1}")(mask, train)
    mask = resize_bilinear(mask, trunk.shape[1:3], self.align_corners)

    act = get_act(self.act)
    for k in (1, 2):
      mask = act(_norm(self, f"mask_bn{k}", mask, train))
      mask = self.conv(features, (1, 1), padding=((0, 0), (0, 0)), use_bias=False,
                       dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=he_normal,
                       name=f"mask_conv{k}")(mask)
    mask = get_act(self.gate)(mask).astype(trunk.dtype)
    self.sow("intermediates", "residual_mask", mask)

    # Attention residual learning: M in (0, 1) scales the trunk, never below T itself.
    # Naive attention learning multiplies by M alone.
    self.sow("intermediates", "trunk", trunk)
    y = mask * trunk if self.naive else (1 + mask) * trunk
    for i in range(p):
      y = unit(f"post{i + 1}")(y, train)
    return y
