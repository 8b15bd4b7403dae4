"""Self-attention over feature maps with relative position embeddings.

* Bottleneck attention (BoTNet): Srinivas et al., "Bottleneck Transformers for Visual
  Recognition", https://arxiv.org/abs/2101.11605 -- multi-head attention over every
  position of a fixed-size map, with 2-D relative position logits.
* Halo attention (HaloNet): Vaswani et al., "Scaling Local Self-Attention for Parameter
  Efficient Visual Backbones", https://arxiv.org/abs/2103.12731 -- each block of
  ``block_size`` x ``block_size`` queries attends to its block grown by ``halo_size``
  pixels on every side.
* The lambda layer, which shares this file's conventions, is in ``lambda_layer.py``.

Defaults and arithmetic reproduce timm's ``BottleneckAttn``, ``HaloAttn`` and
``LambdaLayer`` (timm 1.0), including the head-major channel layout of their projections
and timm's relative-to-absolute indexing of the position tables (after Bello et al.,
"Attention Augmented Convolutional Networks", https://arxiv.org/abs/1904.09925): for a
query at position ``i`` of an axis and a key at position ``j`` of that axis (``K`` keys
along it), the logit adds ``q . table[K - 1 + j - i]``.

The 1x1 projections are ``nn.Dense`` layers over the channel axis. timm weights convert by
one rule (spelled out per class): the Flax path joined with dots is the timm key
(``pos_embed/height_rel`` <-> ``pos_embed.height_rel``); a Dense ``kernel`` (I, O) is the
conv weight ``w[:, :, 0, 0].T``; position tables are copied unchanged; batch norms map
``scale``/``bias``/``mean``/``var`` to ``weight``/``bias``/``running_mean``/``running_var``.
All three take (N, H, W, C) images and return (N, H', W', dim_out), ``dim_out``
defaulting to C; with ``stride=2`` H' = H // 2 and W' = W // 2.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from attention_flax.layers.common import check_images, check_layout, make_divisible

Array = jax.Array
ModuleDef = Callable[..., nn.Module]


def _trunc_normal(std: float) -> Callable[..., Array]:
  """timm's ``trunc_normal_(t, std=std)``: a normal of std ``std`` cut at -2 and 2 (absolute)."""
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)
  return init


def _fan_in_init() -> Callable[..., Array]:
  """The projections' init (timm: truncated normal of std fan_in ** -0.5)."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _check_stride(stride: int, module: str) -> None:
  if stride not in (1, 2):
    raise ValueError(f"{module} supports stride 1 or 2 (a 2x2 average pool or strided "
                     f"queries); got stride={stride}.")


def _widths(module: str, channels: int, dim_out: int | None, num_heads: int,
            dim_head: int | None, qk_ratio: float) -> tuple[int, int, int]:
  """(dim_out, query/key width per head, value width per head) as timm derives them."""
  dim_out = dim_out or channels
  if num_heads < 1 or dim_out % num_heads:
    raise ValueError(f"{module}: dim_out ({dim_out}) must be a multiple of num_heads "
                     f"({num_heads}); change dim_out or num_heads.")
  dim_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
  return dim_out, dim_qk, dim_out // num_heads


def rel_logits_1d(q: Array, table: Array) -> Array:
  """Relative logits along one axis, in absolute key positions.

  Args:
    q: (..., L, d) queries at positions 0..L-1 of the axis.
    table: (2 * K - 1, d) embeddings of the relative offsets, K >= L keys along the axis.

  Returns:
    (..., L, K): ``out[..., i, j] = q[..., i, :] . table[K - 1 + j - i]``.
  """
  length, keys = q.shape[-2], (table.shape[0] + 1) // 2
  logits = q @ table.astype(q.dtype).T  # (..., L, 2K - 1)
  index = keys - 1 + np.arange(keys)[None, :] - np.arange(length)[:, None]  # (L, K)
  return logits[..., np.arange(length)[:, None], index]


def rel_logits_2d(q: Array, height_rel: Array, width_rel: Array) -> Array:
  """Relative position logits of a 2-D grid of queries over a 2-D grid of keys.

  Args:
    q: (..., h, w, d) queries.
    height_rel: (2 * kh - 1, d) embeddings of vertical offsets.
    width_rel: (2 * kw - 1, d) embeddings of horizontal offsets.

  Returns:
    (..., h, w, kh, kw): the height logit of the key row plus the width logit of the key
    column (timm's ``PosEmbedRel``).
  """
  logits_w = rel_logits_1d(q, width_rel)  # (..., h, w, kw)
  logits_h = rel_logits_1d(jnp.swapaxes(q, -2, -3), height_rel)  # (..., w, h, kh)
  logits_h = jnp.swapaxes(logits_h, -2, -3)  # (..., h, w, kh)
  return logits_h[..., :, None] + logits_w[..., None, :]


def _softmax(logits: Array, axes: tuple[int, ...], dtype: Any) -> Array:
  """Softmax over ``axes`` computed in float32, returned in ``dtype``."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=axes).astype(dtype)


def _avg_pool_2x2(x: Array) -> Array:
  """PyTorch's ``AvgPool2d(2, 2)``: 2x2 means at stride 2, a trailing odd row/column dropped."""
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)
  return (x.sum(axis=(2, 4)) * 0.25).astype(x.dtype)


class PosEmbedRel(nn.Module):
  """Relative position tables ``height_rel`` (2 * kh - 1, d) and ``width_rel``
  (2 * kw - 1, d), for queries over a (kh, kw) grid of keys; ``__call__(x)`` with queries
  x (..., h, w, d) returns the (..., h, w, kh, kw) logits of :func:`rel_logits_2d`.

  Tables start as timm's: truncated normal of std ``scale``. When applied with tables of
  another size than ``key_size`` it raises an error naming ``owner`` and the fix.
  """
  key_size: tuple[int, int]
  dim_head: int
  scale: float
  owner: str = "PosEmbedRel"
  fix: str = ""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = self.key_size
    for name, size in (("height_rel", kh), ("width_rel", kw)):
      if self.has_variable("params", name):
        made = self.get_variable("params", name).shape
        want = (2 * size - 1, self.dim_head)
        if tuple(made) != want:
          raise ValueError(
              f"{self.owner}: the relative position table {name} has shape {tuple(made)}, "
              f"made for {(made[0] + 1) // 2} positions along its axis, but this input needs "
              f"{want} ({size} positions). {self.fix}")
    height_rel = self.param("height_rel", _trunc_normal(self.scale), (2 * kh - 1, self.dim_head),
                            self.param_dtype)
    width_rel = self.param("width_rel", _trunc_normal(self.scale), (2 * kw - 1, self.dim_head),
                           self.param_dtype)
    return rel_logits_2d(x, height_rel, width_rel)


class BottleneckAttn(nn.Module):
  """Bottleneck (BoTNet) self-attention; Srinivas et al. 2021, https://arxiv.org/abs/2101.11605.

  Multi-head attention of every position over every position of the map:
  ``softmax(q k^T * scale + rel)`` applied to ``v`` (or ``(q k^T + rel) * scale`` with
  ``scale_pos_embed``), where ``rel`` are 2-D relative position logits (:class:`PosEmbedRel`)
  and ``scale = dim_head_qk ** -0.5``; then a 2x2 average pool when ``stride=2``. As timm's
  ``BottleneckAttn``.

  Input (N, H, W, C); output (N, H', W', dim_out) with H' = H, or H // 2 when stride 2.
  Widths: ``dim_out`` (default C) must be a multiple of ``num_heads``; values have
  ``dim_out // num_heads`` channels per head; queries and keys ``dim_head``, or
  ``make_divisible(dim_out * qk_ratio, 8) // num_heads`` when ``dim_head`` is None.

  The position tables fix the map size: ``feat_size`` (H, W), or, when None, the size of
  the input ``init`` sees. Applying the layer to another size raises a ValueError that
  says how to fix it (resize the input, or init for that size).

  Variables and timm's state-dict keys (one rule: path with dots):
    * ``qkv/kernel`` (C, 2 * heads * dim_head_qk + dim_out) <- ``qkv.weight[:, :, 0, 0].T``
      (output channels: all q heads, all k heads, all v heads; head-major within each);
      ``qkv/bias`` <- ``qkv.bias`` when ``qkv_bias``.
    * ``pos_embed/height_rel`` (2H - 1, dim_head_qk) <- ``pos_embed.height_rel``;
      ``pos_embed/width_rel`` (2W - 1, dim_head_qk) <- ``pos_embed.width_rel`` (unchanged).

  Sows ``"pixel_attention"`` (N, heads, H, W, H, W): ``a[n, h, y, x]`` is the (H, W) map of
  the weights with which query pixel (y, x) of head h attends (each sums to 1).

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).
  """
  maps: ClassVar[dict[str, str]] = {"pixel_attention": "pixel_attention"}

  dim_out: int | None = None
  feat_size: Sequence[int] | None = None
  stride: int = 1
  num_heads: int = 4
  dim_head: int | None = None
  qk_ratio: float = 1.0
  qkv_bias: bool = False
  scale_pos_embed: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    module = type(self).__name__
    check_images(x, module)
    check_layout(self, x, "qkv", "kernel")
    _check_stride(self.stride, module)
    n, h, w, c = x.shape
    if self.feat_size is not None and tuple(self.feat_size) != (h, w):
      raise ValueError(
          f"{module} was built for feat_size={tuple(self.feat_size)} but got a {h}x{w} input; "
          f"resize the input to {tuple(self.feat_size)}, or build the layer with "
          f"feat_size=({h}, {w}) (or None to take the size from the input at init).")
    dim_out, dqk, dv = _widths(module, c, self.dim_out, self.num_heads, self.dim_head,
                               self.qk_ratio)
    heads = self.num_heads
    scale = dqk ** -0.5
    qkv = nn.Dense(2 * heads * dqk + heads * dv, use_bias=self.qkv_bias,
                   kernel_init=_fan_in_init(), dtype=self.dtype, param_dtype=self.param_dtype,
                   name="qkv")(x)
    q = qkv[..., :heads * dqk].reshape(n, h, w, heads, dqk)
    k = qkv[..., heads * dqk:2 * heads * dqk].reshape(n, h, w, heads, dqk)
    v = qkv[..., 2 * heads * dqk:].reshape(n, h * w, heads, dv)
    q = q.transpose(0, 3, 1, 2, 4)  # (N, heads, H, W, d)
    logits = jnp.einsum("nhyxd,nuvhd->nhyxuv", q, k)
    rel = PosEmbedRel(
        key_size=(h, w), dim_head=dqk, scale=scale, owner=module,
        fix=(f"The tables fix the map size: resize the input to the size the layer was "
             f"initialised for, or init the layer on a {h}x{w} input."),
        param_dtype=self.param_dtype, name="pos_embed")(q)
    if self.scale_pos_embed:
      logits = (logits + rel) * scale
    else:
      logits = logits * scale + rel
    attn = _softmax(logits.reshape(n, heads, h * w, h * w), (-1,), v.dtype)
    self.sow("intermediates", "pixel_attention", attn.reshape(n, heads, h, w, h, w))
    out = jnp.einsum("nhqk,nkhd->nqhd", attn, v).reshape(n, h, w, heads * dv)
    return _avg_pool_2x2(out) if self.stride == 2 else out


class HaloAttn(nn.Module):
  """Halo (blocked local) self-attention; Vaswani et al. 2021, https://arxiv.org/abs/2103.12731.

  The map is cut into ``block_size`` x ``block_size`` blocks; the queries of a block attend
  to the keys of its window, the block grown by ``halo_size`` pixels on every side
  (``win = block_size + 2 * halo_size``; positions beyond the map are zero keys and
  values), with 2-D relative position logits over the window (:class:`PosEmbedRel`).
  ``softmax(q k^T * scale + rel)``, ``scale = dim_head_qk ** -0.5`` (or
  ``(q k^T + rel) * scale`` with ``scale_pos_embed``). As timm's ``HaloAttn``.

  ``stride=2``: when ``block_size`` is even and not ``avg_down``, queries are taken at every
  other pixel (a strided 1x1 ``q``), so each block has ``block_size // 2`` squared queries;
  otherwise the full-resolution output is average-pooled 2x2.

  Input (N, H, W, C) with H and W multiples of ``block_size``; output (N, H', W', dim_out),
  H' = H or H // 2. Widths as :class:`BottleneckAttn` (default 8 heads). ``feat_size`` is
  accepted and ignored (timm's argument compatibility with the other two layers).

  Variables and timm's state-dict keys (one rule: path with dots):
    * ``q/kernel`` (C, heads * dim_head_qk) <- ``q.weight[:, :, 0, 0].T``;
      ``kv/kernel`` (C, heads * (dim_head_qk + dim_head_v)) <- ``kv.weight[:, :, 0, 0].T``
      (per head: its keys, then its values); biases likewise when ``qkv_bias``.
    * ``pos_embed/height_rel`` and ``pos_embed/width_rel`` (2 * win - 1, dim_head_qk) <-
      ``pos_embed.height_rel`` / ``pos_embed.width_rel`` (unchanged).

  Sows ``"window_attention"`` (N, heads, H / block_size, W / block_size, b, b, win, win),
  b the number of query rows per block: entry ``[n, h, i, j, y, x]`` is the (win, win)
  weight map of query (y, x) of block (i, j) over its window, whose top-left pixel is
  ``(i * block_size - halo_size, j * block_size - halo_size)`` of the input.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).
  """
  maps: ClassVar[dict[str, str]] = {"window_attention": "window_attention"}

  dim_out: int | None = None
  feat_size: Sequence[int] | None = None
  stride: int = 1
  num_heads: int = 8
  dim_head: int | None = None
  block_size: int = 8
  halo_size: int = 3
  qk_ratio: float = 1.0
  qkv_bias: bool = False
  avg_down: bool = False
  scale_pos_embed: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    module = type(self).__name__
    check_images(x, module)
    check_layout(self, x, "q", "kernel")
    _check_stride(self.stride, module)
    n, h, w, c = x.shape
    bs, halo = self.block_size, self.halo_size
    if bs < 1 or halo < 0:
      raise ValueError(f"{module} needs block_size >= 1 and halo_size >= 0; "
                       f"got {bs} and {halo}.")
    if h % bs or w % bs:
      raise ValueError(f"{module}: the input's height and width ({h}x{w}) must be multiples "
                       f"of block_size={bs}; pad or crop the input, or pick a block_size "
                       f"dividing both.")
    dim_out, dqk, dv = _widths(module, c, self.dim_out, self.num_heads, self.dim_head,
                               self.qk_ratio)
    heads = self.num_heads
    scale = dqk ** -0.5
    win = bs + 2 * halo
    use_pool = self.stride == 2 and (self.avg_down or bs % 2 != 0)
    block_stride = 2 if self.stride == 2 and not use_pool else 1
    bq = bs // block_stride  # query rows (and columns) per block
    nh, nw = h // bs, w // bs

    xq = x[:, ::block_stride, ::block_stride] if block_stride > 1 else x
    q = nn.Dense(heads * dqk, use_bias=self.qkv_bias, kernel_init=_fan_in_init(),
                 dtype=self.dtype, param_dtype=self.param_dtype, name="q")(xq)
    q = q.reshape(n, nh, bq, nw, bq, heads, dqk).transpose(0, 5, 1, 3, 2, 4, 6)
    # q: (N, heads, nh, nw, bq, bq, dqk)
    kv = nn.Dense(heads * (dqk + dv), use_bias=self.qkv_bias, kernel_init=_fan_in_init(),
                  dtype=self.dtype, param_dtype=self.param_dtype, name="kv")(x)
    kv = jnp.pad(kv, ((0, 0), (halo, halo), (halo, halo), (0, 0)))
    rows = (np.arange(nh) * bs)[:, None] + np.arange(win)[None, :]  # (nh, win)
    cols = (np.arange(nw) * bs)[:, None] + np.arange(win)[None, :]  # (nw, win)
    kv = kv[:, rows][:, :, :, cols]  # (N, nh, win, nw, win, heads * (dqk + dv))
    kv = kv.reshape(n, nh, win, nw, win, heads, dqk + dv).transpose(0, 5, 1, 3, 2, 4, 6)
    k, v = kv[..., :dqk], kv[..., dqk:]  # (N, heads, nh, nw, win, win, d)

    logits = jnp.einsum("...yxd,...uvd->...yxuv", q, k)
    rel = PosEmbedRel(
        key_size=(win, win), dim_head=dqk, scale=scale, owner=module,
        fix="Init the layer with the block_size and halo_size it is applied with.",
        param_dtype=self.param_dtype, name="pos_embed")(q)
    if self.scale_pos_embed:
      logits = (logits + rel) * scale
    else:
      logits = logits * scale + rel
    attn = _softmax(logits, (-2, -1), v.dtype)  # (N, heads, nh, nw, bq, bq, win, win)
    self.sow("intermediates", "window_attention", attn)
    out = jnp.einsum("...yxuv,...uvd->...yxd", attn, v)  # (N, heads, nh, nw, bq, bq, dv)
    out = out.transpose(0, 2, 4, 3, 5, 1, 6).reshape(n, nh * bq, nw * bq, heads * dv)
    return _avg_pool_2x2(out) if use_pool else out


__all__ = ["BottleneckAttn", "HaloAttn", "PosEmbedRel", "rel_logits_1d",
           "rel_logits_2d"]
