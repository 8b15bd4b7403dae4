"""The lambda layer: Bello, "LambdaNetworks: Modeling Long-Range Interactions Without
Attention", https://arxiv.org/abs/2102.08602 -- a content lambda (softmax-normalised keys
times values) and a position lambda (a local 3-D convolution or a relative position table)
applied to every query.

Defaults and arithmetic reproduce timm's ``LambdaLayer`` (timm 1.0), with the conventions
of :mod:`attention_flax.layers.self_attention` (head-major projections, timm's relative
position indexing, one weight-conversion rule: the Flax path joined with dots is the timm
key).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers.common import check_images, check_layout
from attention_flax.layers.norm import TorchBatchNorm, batch_norm
from attention_flax.layers.self_attention import (_avg_pool_2x2, _check_stride, _fan_in_init,
                                                  _softmax, _trunc_normal, _widths)

Array = jax.Array
ModuleDef = Callable[..., nn.Module]


class LambdaLayer(nn.Module):
  """Lambda layer; Bello 2021, "LambdaNetworks", https://arxiv.org/abs/2102.08602.

  From one 1x1 projection: queries q (``num_heads`` heads of ``dim_head`` channels, batch
  normalised), keys k (``dim_head`` channels, softmax over the H * W positions) and values
  v (``dim_out // num_heads`` channels, batch normalised). The content lambda
  ``k^T v`` (dim_head, dim_v) is shared by all positions; the position lambda of each
  position is a local r x r convolution of the values (``r`` odd, timm's 3-D
  ``conv_lambda``, one filter per key channel, with bias) or, with ``r=None``, a
  relative position table over the whole map. Each head's output at a position is
  ``q . (content_lambda + position_lambda)``; heads are concatenated, then a 2x2 average
  pool when ``stride=2``. The intra-depth u is 1. As timm's ``LambdaLayer`` (which needs
  dim_out == C; any dim_out divisible by num_heads works here).

  Input (N, H, W, C); output (N, H', W', dim_out), H' = H or H // 2. ``dim_head`` (16)
  or, when None, ``make_divisible(dim_out * qk_ratio, 8) // num_heads``. With ``r=None`` the
  table fixes the map size: ``feat_size`` or the size ``init`` sees; another size raises a
  ValueError saying how to fix it.

  Variables and timm's state-dict keys (one rule: path with dots):
    * ``qkv/kernel`` (C, heads * dim_head + dim_head + dim_v) <- ``qkv.weight[:, :, 0, 0].T``
      (channels: q head-major, then k, then v).
    * ``norm_q``, ``norm_v``: params ``scale``/``bias`` <- ``weight``/``bias``, batch_stats
      ``mean``/``var`` <- ``running_mean``/``running_var``.
    * ``conv_lambda/kernel`` (r, r, 1, dim_head) <- ``conv_lambda.weight`` (dim_head, 1, r, r, 1)
      as ``w[..., 0].transpose(2, 3, 1, 0)``; ``conv_lambda/bias`` <- ``conv_lambda.bias``.
    * ``pos_emb`` (2H - 1, 2W - 1, dim_head) <- ``pos_emb`` (unchanged; ``r=None`` only).

  Batch norms are the ``norm`` factory (default :class:`TorchBatchNorm`, PyTorch's
  running-variance rule); ``train=True`` normalises with batch statistics and updates them.
  Sows ``"key_weights"`` (N, H, W, dim_head): the softmax of each key channel over the
  positions (each channel sums to 1 over H, W).

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).
  """
  maps: ClassVar[dict[str, str]] = {"key_weights": "key_weights"}

  dim_out: int | None = None
  feat_size: Sequence[int] | None = None
  stride: int = 1
  num_heads: int = 4
  dim_head: int | None = 16
  r: int | None = 9
  qk_ratio: float = 1.0
  qkv_bias: bool = False
  norm: ModuleDef = TorchBatchNorm
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    module = type(self).__name__
    check_images(x, module)
    check_layout(self, x, "qkv", "kernel")
    _check_stride(self.stride, module)
    n, h, w, c = x.shape
    m = h * w
    if self.r is not None and (self.r < 1 or self.r % 2 == 0):
      raise ValueError(f"{module}: r is the odd side of the local position lambda "
                       f"(timm's default 9), or None for a relative position table; got {self.r}.")
    if self.r is None and self.feat_size is not None and tuple(self.feat_size) != (h, w):
      raise ValueError(
          f"{module} (r=None) was built for feat_size={tuple(self.feat_size)} but got a "
          f"{h}x{w} input; resize the input, or build the layer with feat_size=({h}, {w}) "
          f"(or None to take the size from the input at init).")
    dim_out, dk, dv = _widths(module, c, self.dim_out, self.num_heads, self.dim_head,
                              self.qk_ratio)
    heads = self.num_heads
    qkv = nn.Dense(heads * dk + dk + dv, use_bias=self.qkv_bias, kernel_init=_fan_in_init(),
                   dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
    compute = qkv.dtype

    def norm(y, name):
      return batch_norm(self.norm, y, name=name, use_running_average=not train,
                        dtype=jnp.float32, param_dtype=self.param_dtype).astype(compute)

    q = norm(qkv[..., :heads * dk], "norm_q").reshape(n, m, heads, dk)
    k = qkv[..., heads * dk:heads * dk + dk].reshape(n, m, dk)
    v = norm(qkv[..., heads * dk + dk:], "norm_v")  # (N, H, W, dv)
    k = _softmax(k, (1,), compute)
    self.sow("intermediates", "key_weights", k.reshape(n, h, w, dk))
    content = jnp.einsum("nmk,nmv->nkv", k, v.reshape(n, m, dv))
    out = jnp.einsum("nmhk,nkv->nmhv", q, content)

    if self.r is not None:
      # timm's Conv3d(1, dk, (r, r, 1)) over (N, 1, H, W, dv): one r x r filter per key
      # channel, run on every value channel as a separate one-channel image.
      planes = v.transpose(0, 3, 1, 2).reshape(n * dv, h, w, 1)
      pad = self.r // 2
      lam = self.conv(dk, (self.r, self.r), padding=((pad, pad), (pad, pad)),
                      kernel_init=nn.initializers.truncated_normal(dk ** -0.5),
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      name="conv_lambda")(planes)  # (N * dv, H, W, dk)
      lam = lam.reshape(n, dv, m, dk).transpose(0, 2, 3, 1)  # (N, M, dk, dv)
      out = out + jnp.einsum("nmhk,nmkv->nmhv", q, lam.astype(q.dtype))
    else:
      table_shape = (2 * h - 1, 2 * w - 1, dk)
      if self.has_variable("params", "pos_emb"):
        made = tuple(self.get_variable("params", "pos_emb").shape)
        if made != table_shape:
          raise ValueError(
              f"{module} (r=None): the relative position table pos_emb {made} was made for "
              f"{(made[0] + 1) // 2}x{(made[1] + 1) // 2} inputs, not {h}x{w}; resize the "
              f"input, or init the layer on a {h}x{w} input.")
      table = self.param("pos_emb", _trunc_normal(0.02), table_shape, self.param_dtype)
      ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
      ys, xs = ys.reshape(-1), xs.reshape(-1)
      rel = table.astype(compute)[ys[None, :] - ys[:, None] + h - 1,
                                  xs[None, :] - xs[:, None] + w - 1]  # (M, M, dk): [i, j]
      lam = jnp.einsum("ijk,njv->nikv", rel, v.reshape(n, m, dv))
      out = out + jnp.einsum("nmhk,nmkv->nmhv", q, lam)

    out = out.reshape(n, h, w, heads * dv)
    return _avg_pool_2x2(out) if self.stride == 2 else out


__all__ = ["LambdaLayer"]
