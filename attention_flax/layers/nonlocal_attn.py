"""Non-local attention: every position attends to every other one, or through blocks.

* Non-local block (embedded Gaussian): Wang et al., "Non-local Neural Networks", CVPR 2018,
  https://arxiv.org/abs/1711.07971.
* Bilinear attentional transform (BAT): Chi et al., "Non-Local Neural Networks With Grouped
  Bilinear Attentional Transforms", CVPR 2020,
  https://openaccess.thecvf.com/content_CVPR_2020/html/Chi_Non-Local_Neural_Networks_With_Grouped_Bilinear_Attentional_Transforms_CVPR_2020_paper.html

Defaults reproduce timm's ``NonLocalAttn`` (``"nl"``) and ``BatNonLocalAttn`` (``"bat"``),
timm 1.0, and the Flax module names follow timm's state-dict names, so
:func:`attention_flax.convert.convert_variables` maps a timm module's weights directly.
Batch norms come from the ``norm`` field (default
:class:`~attention_flax.layers.norm.TorchBatchNorm`: PyTorch's momentum, epsilon and
unbiased running variance, so train-mode statistics evolve as timm's) and compute in
float32 whatever ``dtype`` is; 1x1 convolutions come from the ``conv`` field (default
:data:`attention_flax.ops.conv`). The attention is computed in ``dtype`` with its softmax
(or normalisation) in float32, and the result is added to the input in the input's dtype.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.common import (check_images, check_layout, get_act,
                                          he_normal, make_divisible)
from attention_flax.layers.norm import TorchBatchNorm, batch_norm

Array = jax.Array
ModuleDef = Callable[..., nn.Module]


def _width(channels: int, rd_ratio: float, rd_divisor: int, rd_channels: int | None) -> int:
  """timm's reduced width: ``rd_channels``, or ``make_divisible(C * rd_ratio, rd_divisor)``
  (at least ``rd_divisor``)."""
  if rd_channels is not None:
    if rd_channels < 1:
      raise ValueError(f"rd_channels must be >= 1, got {rd_channels}.")
    return int(rd_channels)
  if rd_ratio <= 0.0:
    raise ValueError(f"rd_ratio must be positive, got {rd_ratio}.")
  return make_divisible(channels * rd_ratio, rd_divisor)


class NonLocal(nn.Module):
  """Embedded Gaussian non-local block: ``x + bn(z(softmax(t p^T * s) g))``.

  Wang et al., "Non-local Neural Networks", https://arxiv.org/abs/1711.07971 (sec. 3.2,
  embedded Gaussian with the dot-product scaling of timm's ``NonLocalAttn``).

  Three 1x1 convolutions with bias map the input C -> C' (children ``t`` (theta), ``p``
  (phi), ``g``); every query position q weighs every key position k by
  ``softmax_k(t_q . p_k * s)`` over the H * W positions, with ``s = C ** -0.5`` (timm's
  ``use_scale``: the input width C, not C') or 1; the weighted sum of ``g`` is mapped back
  C' -> C (child ``z``, 1x1 with bias), batch-normalised (child ``norm``) and added to the
  input. As in timm, the convolutions start He-normal (fan-out) with zero biases and the
  batch norm's scale and bias start at zero, so a fresh block is the identity.

  C' is ``rd_channels`` or ``make_divisible(C * rd_ratio, rd_divisor)`` (timm: 1/8, at
  least 8). Input and output (N, H, W, C); sows ``"nl_attention"`` (N, H * W, H * W), the
  softmax weights with rows the query positions (row-major ``h * W + w``) and columns the
  key positions (each row sums to one): ``nl_attention[n, q].reshape(H, W)`` is where
  query pixel q looks. Memory grows as (H * W)^2 per image.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    use_scale: scale the dot products by ``C ** -0.5``.
    rd_ratio, rd_divisor, rd_channels: the embedding width C' (see above).
    norm: factory of ``norm``, called with ``use_running_average``, ``dtype``,
      ``param_dtype``, ``scale_init``, ``bias_init`` and ``name``.
    conv: factory of the 1x1 convolutions (``flax.linen.Conv``'s signature).
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"nl_attention": "pixel_attention"}

  use_scale: bool = True
  rd_ratio: float = 1.0 / 8
  rd_divisor: int = 8
  rd_channels: int | None = None
  norm: ModuleDef = TorchBatchNorm
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "t", "kernel")
    n, height, width, channels = x.shape
    inner = _width(channels, self.rd_ratio, self.rd_divisor, self.rd_channels)

    def conv(features: int, name: str) -> nn.Module:
      return self.conv(features, kernel_size=(1, 1), use_bias=True, kernel_init=he_normal,
                       bias_init=nn.initializers.zeros, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)

    positions = height * width
    theta = conv(inner, "t")(x).reshape(n, positions, inner)
    phi = conv(inner, "p")(x).reshape(n, positions, inner)
    g = conv(inner, "g")(x).reshape(n, positions, inner)
    scores = jnp.einsum("nqc,nkc->nqk", theta, phi)
    if self.use_scale:
      scores = scores * jnp.asarray(channels ** -0.5, scores.dtype)
    # The softmax runs in float32 so that low-precision scores still give weights summing
    # to one.
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    self.sow("intermediates", "nl_attention", weights)
    y = jnp.einsum("nqk,nkc->nqc", weights.astype(g.dtype), g).reshape(n, height, width, inner)
    y = conv(channels, "z")(y)
    y = batch_norm(self.norm, y, name="norm", use_running_average=not train,
                   dtype=jnp.float32, param_dtype=self.param_dtype,
                   scale_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
    return x + y.astype(x.dtype)


class _ConvNormAct(nn.Module):
  """timm's ``ConvNormAct`` with a 1x1 kernel: ``act(bn(conv(x)))``, children ``conv`` (no
  bias) and ``bn``. (N, H, W, C) -> (N, H, W, features)."""
  features: int
  norm: ModuleDef = TorchBatchNorm
  act: str | Callable = "relu"
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = self.conv(self.features, kernel_size=(1, 1), use_bias=False, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="conv")(x)
    y = batch_norm(self.norm, y, name="bn", use_running_average=not train, dtype=jnp.float32,
                   param_dtype=self.param_dtype)
    return get_act(self.act)(y.astype(x.dtype if self.dtype is None else self.dtype))


class _BlockTransform(nn.Module):
  """The core of BAT (timm's inner ``BilinearAttnTransform``): ``P x Q`` per channel group.

  (N, H, W, C) -> (N, H, W, C) with H and W multiples of ``block_size`` (b) and C of
  ``groups``. Returns ``(y, p, q)``: p (N, groups, b, b) mixes row blocks (rows sum to
  one), q (N, groups, b, b) column blocks (columns sum to one).
  """
  block_size: int
  groups: int
  norm: ModuleDef = TorchBatchNorm
  act: str | Callable = "relu"
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array, Array]:
    n, height, width, channels = x.shape
    b, groups = self.block_size, self.groups
    th, tw = height // b, width // b

    def conv_norm_act(features: int, name: str) -> _ConvNormAct:
      return _ConvNormAct(features, norm=self.norm, act=self.act, conv=self.conv,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def mixer(kernel: tuple[int, int], name: str) -> nn.Module:
      return self.conv(b * b * groups, kernel_size=kernel, padding="VALID", use_bias=True,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    out = conv_norm_act(groups, "conv1")(x, train)
    # Max over each block of rows (all columns) and each block of columns (all rows):
    # PyTorch's adaptive max pooling to (b, 1) and (1, b) on sizes divisible by b.
    rows = jnp.max(out.reshape(n, b, th * width, groups), axis=2)[:, :, None, :]
    cols = jnp.max(out.reshape(n, height, b, tw, groups), axis=(1, 3))[:, None, :, :]
    p = nn.sigmoid(mixer((b, 1), "conv_p")(rows).astype(jnp.float32)).reshape(n, groups, b, b)
    q = nn.sigmoid(mixer((1, b), "conv_q")(cols).astype(jnp.float32)).reshape(n, groups, b, b)
    p = p / jnp.sum(p, axis=3, keepdims=True)
    q = q / jnp.sum(q, axis=2, keepdims=True)
    # P = kron(p, I_th) acting on rows, Q = kron(q, I_tw) on columns, per channel group:
    # y[i*th + a, l*tw + c] = sum_jk p[i, j] x[j*th + a, k*tw + c] q[k, l].
    dtype = x.dtype if self.dtype is None else self.dtype
    xb = x.astype(dtype).reshape(n, b, th, b, tw, groups, channels // groups)
    y = jnp.einsum("ngij,njakbgc,ngkl->nialbgc", p.astype(dtype), xb, q.astype(dtype))
    y = y.reshape(n, height, width, channels)
    return conv_norm_act(channels, "conv2")(y, train), p, q


class BilinearAttnTransform(nn.Module):
  """BAT non-local block: ``x + dropout(conv2(P conv1(x) Q))`` with learned block transforms.

  Chi et al., "Non-Local Neural Networks With Grouped Bilinear Attentional Transforms",
  CVPR 2020; timm's ``BatNonLocalAttn``.

  ``conv1`` (1x1 conv C -> C', BN, ReLU; children ``conv1/conv``, ``conv1/bn``) reduces the
  width to C' = ``rd_channels`` or ``make_divisible(C * rd_ratio, rd_divisor)``. The
  transform (child ``ba``) splits the rows and the columns into ``block_size`` (b) blocks:
  a 1x1 conv-BN-ReLU C' -> ``groups`` (``ba/conv1``) is max-pooled per row block and per
  column block, a (b, 1) resp. (1, b) convolution with bias (``ba/conv_p``, ``ba/conv_q``)
  maps each pooled strip to ``groups`` b x b matrices, sigmoid, normalised to sum to one
  (p over its columns, q over its rows). Every channel of group i is then mixed as
  ``P_i x Q_i`` with ``P_i = kron(p_i, I)`` (row block j of the input feeds row block k of
  the output with weight p_i[k, j], the same row inside each block) and ``Q_i`` alike on
  columns; ``ba/conv2`` (1x1 conv-BN-ReLU C' -> C') and ``conv2`` (C' -> C) follow, then
  channel dropout (timm's ``Dropout2d``, training only; needs a ``"dropout"`` rng when
  ``drop_rate > 0``) and the residual sum.

  H and W must be multiples of ``block_size`` and C' of ``groups``. Input and output
  (N, H, W, C); sows ``"bat_transforms"`` (N, groups, 2, b, b): ``[:, :, 0]`` is p (output
  row block x input row block) and ``[:, :, 1]`` is q transposed (output column block x
  input column block), each row summing to one.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    block_size: blocks per axis (timm: 7, for 7 x 7 or 14 x 14 ... maps).
    groups: channel groups with their own transforms (timm: 2).
    rd_ratio, rd_divisor, rd_channels: the inner width C' (timm: 1/4, divisor 8).
    drop_rate: probability of zeroing a whole channel of the branch in training (timm 0.2).
    act: activation after every batch norm.
    norm: factory of the batch norms (``bn`` children), called with
      ``use_running_average``, ``dtype``, ``param_dtype`` and ``name``.
    conv: factory of the convolutions (``flax.linen.Conv``'s signature).
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"bat_transforms": "block_transform"}

  block_size: int = 7
  groups: int = 2
  rd_ratio: float = 0.25
  rd_divisor: int = 8
  rd_channels: int | None = None
  drop_rate: float = 0.2
  act: str | Callable = "relu"
  norm: ModuleDef = TorchBatchNorm
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    name = type(self).__name__
    check_images(x, name)
    check_layout(self, x, "conv1", "conv", "kernel")
    _, height, width, channels = x.shape
    b = self.block_size
    if not isinstance(b, int) or b < 1:
      raise ValueError(f"{name} needs a positive integer block_size; got {b!r}.")
    if height % b or width % b:
      raise ValueError(
          f"{name} splits H and W into block_size={b} blocks, so both must be multiples of "
          f"{b}; got H={height}, W={width}. Resize or crop the input (e.g. to "
          f"{max(b, height // b * b)} x {max(b, width // b * b)}) or pass a block_size that "
          "divides both.")
    inner = _width(channels, self.rd_ratio, self.rd_divisor, self.rd_channels)
    if not isinstance(self.groups, int) or self.groups < 1 or inner % self.groups:
      raise ValueError(
          f"{name} splits its {inner} inner channels into groups={self.groups!r}; groups "
          "must be a positive divisor of the inner width (rd_channels).")
    if not 0.0 <= self.drop_rate < 1.0:
      raise ValueError(f"{name} drop_rate must be in [0, 1); got {self.drop_rate}.")
    common = dict(norm=self.norm, act=self.act, conv=self.conv, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    y = _ConvNormAct(inner, name="conv1", **common)(x, train)
    y, p, q = _BlockTransform(b, self.groups, name="ba", **common)(y, train)
    self.sow("intermediates", "bat_transforms",
             jnp.stack([p, jnp.swapaxes(q, -1, -2)], axis=2))
    y = _ConvNormAct(channels, name="conv2", **common)(y, train)
    y = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2), deterministic=not train,
                   name="dropout")(y)
    return x + y.astype(x.dtype)
