"""The end of a residual block with its channel gate folded into the last batch norm.

A block ends ``act(attn(bn(y)) + shortcut)``. When ``attn`` is a gate computed from pooled
statistics of its input (it declares ``pools``, ``("mean",)`` or ``("mean", "max")``,
and has ``gate_from_pooled``) and ``bn`` can ``fold``, :func:`residual_tail` takes those
statistics from the norm's own statistics pass and applies
``bn(y) * gate == y * (mul * gate) + add * gate`` per sample and channel, so the
normalised map is never written, pooled and scaled in passes of its own. A gate with a
second stage (CBAM's spatial gate) declares ``after_gate(y, train)``, applied to the
gated map. The values are those of the plain tail up to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax.ops.fusion import materialize
from attention_flax.ops.stats import affine_max, extrema

Array = jax.Array


def _at_least_float32(x: Array) -> Array:
  return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


def foldable(norm: nn.Module, attn: nn.Module | None) -> bool:
  """Whether :func:`residual_tail` folds ``attn`` into ``norm``."""
  pools = getattr(attn, "pools", None)
  return (attn is not None and hasattr(norm, "fold") and hasattr(attn, "gate_from_pooled")
          and pools in (("mean",), ("mean", "max")))


def residual_tail(y: Array, shortcut: Array, *, norm: nn.Module, attn: nn.Module | None,
                  act: Callable[[Array], Array], train: bool) -> Array:
  """``act(attn(norm(y)) + shortcut)``, the gate folded into ``norm`` where it can be.

  Args:
    y: the residual branch before its last batch norm, (N, H, W, C).
    shortcut: the block's identity path, (N, H, W, C).
    norm: the (bound) last batch norm of the branch.
    attn: the (bound) attention layer, or None.
    act: the block's output activation.
    train: training mode (batch statistics, updated running statistics).
  """
  y = _at_least_float32(y)
  if not foldable(norm, attn):
    y = norm(y)
    if attn is not None:
      y = attn(y, train=train)
    return act(y + shortcut)
  out_dtype = norm.output_dtype(y.dtype)
  if attn.pools == ("mean", "max"):
    top, bottom = extrema(y.astype(jnp.float32), tuple(range(1, y.ndim - 1)))
  mul, add, mean = norm.fold(y)
  pools = [mean * mul + add]
  if attn.pools == ("mean", "max"):
    pools.append(affine_max(mul, top, bottom, mean) + add)
  gate = attn.gate_from_pooled(*(p.astype(out_dtype) for p in pools)).astype(jnp.float32)
  y = (y * (mul * gate) + add * gate).astype(out_dtype)
  if hasattr(attn, "after_gate"):
    # The gated map, read by the second stage's pools, product and gradients, is written
    # once on CPU instead of recomputed inside each of them.
    y = attn.after_gate(materialize(y), train=train)
  return act(y + shortcut)


def bottleneck_tail(y: Array, shortcut: Array, **kwargs: Any) -> Array:
  """:func:`residual_tail`, its output computed once on CPU rather than inside each later
  block's fusions (:func:`~attention_flax.ops.fusion.materialize`)."""
  return materialize(residual_tail(y, shortcut, **kwargs))
