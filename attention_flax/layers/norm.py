"""Batch normalisation with PyTorch's running-variance rule.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift", https://arxiv.org/abs/1502.03167.

Both Flax and PyTorch normalise a training batch with its biased variance (divided by n),
but they differ in what they fold into the running variance: ``flax.linen.BatchNorm`` keeps
the biased one, PyTorch's ``BatchNorm2d`` the unbiased one (divided by n - 1), where n is
the number of values per channel (N * H * W). On a 2x2 map of one image that is a factor of
4/3. :class:`TorchBatchNorm` takes PyTorch's rule, so a model trained here keeps the
running statistics a PyTorch/timm model would, and converted weights continue training the
same way. Its variables have ``flax.linen.BatchNorm``'s names and shapes (params ``scale``,
``bias``; batch_stats ``mean``, ``var``, all (C,)), so the two are interchangeable.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax.layers.common import accumulation_dtype

Array = jax.Array


class TorchBatchNorm(nn.Module):
  """Batch norm over the last (channel) axis of (N, H, W, C), or of any (..., C) array.

  Training (``use_running_average=False``): normalises with the batch mean and biased
  variance over every axis but the last, and, outside ``init``, updates
  ``mean <- momentum * mean + (1 - momentum) * batch_mean`` and the same for ``var`` with
  the unbiased batch variance (``unbiased_running_var=False`` gives Flax's biased rule).
  Evaluation: normalises with the running statistics. The statistics are computed in
  float32 whatever the input dtype, in one pass over the data (mean and mean square read
  together, about 20% faster training steps on CPU than two passes) but shifted by the
  running mean: var = E[(x - s)^2] - E[x - s]^2 with s = the running mean (no gradient
  through s; the value is the same for any s). Unshifted, ``E[x^2] - E[x]^2`` cancels
  badly when the mean is large against the spread; with s close to the batch mean, as
  the running mean is once training has started, it does not.

  Attributes:
    use_running_average: evaluation mode; may also be given at call time.
    momentum: Flax convention: 0.9 here is PyTorch's ``momentum=0.1``.
    epsilon: added to the variance (PyTorch's 1e-5).
    unbiased_running_var: store the n / (n - 1) corrected variance, as PyTorch does.
    dtype: output dtype; None = the wider of the input's and ``param_dtype``.
    param_dtype: dtype of ``scale`` and ``bias``; statistics are float32.
    use_scale, use_bias, scale_init, bias_init: the affine part, as in Flax.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  unbiased_running_var: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable[..., Array] = nn.initializers.ones
  bias_init: Callable[..., Array] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               fold: bool = False, fold_max: bool = False) -> Array | tuple[Array, ...]:
    """Normalises ``x``; with ``fold=True`` returns ``(mul, add, pooled)`` instead.

    ``mul`` and ``add`` are float32 (C,) with ``norm(x) == x * mul + add`` (the output
    before its cast to ``dtype``), and ``pooled`` is the float32 (N, C) mean of that
    output over the axes between the first and the last (H and W of an image). In
    training the statistics are then summed per sample first, so that ``pooled`` comes
    out of the same pass over ``x`` as the statistics. A caller that scales the output
    per sample and channel afterwards, as a channel gate does, applies
    ``x * (mul * s) + add * s`` without the normalised array ever being written.

    ``fold_max=True`` (with ``fold``) adds a fourth, the (N, C) maximum of the output over
    the same axes, from the same pass: ``mul * max(x) + add`` where ``mul > 0``,
    ``mul * min(x) + add`` where ``mul < 0``. Its derivatives are those of the maximum of
    the normalised output (:func:`affine_max`), ties included.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    if x.ndim < 2:
      raise ValueError(
          f"TorchBatchNorm expects (..., C) with at least one batch axis, e.g. (N, H, W, C); "
          f"got shape {x.shape}. Add a batch axis with x[None].")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"TorchBatchNorm expects floating input; got {x.dtype}. "
                      "Cast first, e.g. x.astype(jnp.float32).")
    features = x.shape[-1]
    reduce_axes = tuple(range(x.ndim - 1))
    # With fold, the per-sample sums come first: (N, ..., C) -> (N, C), then over N.
    inner_axes = tuple(range(1, x.ndim - 1))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)

    if fold_max and not fold:
      raise ValueError("TorchBatchNorm: fold_max=True needs fold=True.")
    sample_mean = None
    if fold_max:
      top, bottom = extrema(x32, inner_axes)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      if fold:
        sample_mean = jnp.mean(x32, axis=inner_axes)
    else:
      shift = jax.lax.stop_gradient(ra_mean.value)
      centred = x32 - shift
      if fold:
        per_sample = jnp.mean(centred, axis=inner_axes)
        first = jnp.mean(per_sample, axis=0)
        second = jnp.mean(jnp.mean(jnp.square(centred), axis=inner_axes), axis=0)
        sample_mean = shift + per_sample
      else:
        first = jnp.mean(centred, axis=reduce_axes)
        second = jnp.mean(jnp.square(centred), axis=reduce_axes)
      mean = shift + first
      var = jnp.maximum(second - jnp.square(first), 0.0)
      if not self.is_initializing():
        count = math.prod(x.shape[:-1])
        # PyTorch stores the unbiased estimate; n == 1 (which PyTorch refuses in training)
        # keeps the biased one rather than dividing by zero.
        correction = count / (count - 1) if self.unbiased_running_var and count > 1 else 1.0
        keep = jnp.float32(self.momentum)
        ra_mean.value = keep * ra_mean.value + (1 - keep) * mean
        ra_var.value = keep * ra_var.value + (1 - keep) * (var * jnp.float32(correction))

    # One multiply-add per element: y = x * (scale / std) + (bias - mean * scale / std).
    mul = jax.lax.rsqrt(var + jnp.float32(self.epsilon))
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
      mul = mul * scale.astype(jnp.float32)
    add = -mean * mul
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
      add = add + bias.astype(jnp.float32)
    if fold:
      pooled = sample_mean * mul + add
      if fold_max:
        return mul, add, pooled, affine_max(mul, top, bottom, sample_mean) + add
      return mul, add, pooled
    y = x32 * mul + add
    return y.astype(self.output_dtype(x.dtype))

  def output_dtype(self, input_dtype: Any) -> Any:
    """The dtype of the normalised output for an input of ``input_dtype``."""
    if self.dtype is not None:
      return self.dtype
    # The wider of the two, chosen explicitly: strict dtype promotion refuses to mix them.
    wider = jnp.finfo(input_dtype).bits >= jnp.finfo(self.param_dtype).bits
    return input_dtype if wider else self.param_dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def extrema(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
  """``(jnp.max(x, axes), jnp.min(x, axes))`` with the same derivatives (shared equally
  among tied entries), whose reverse mode keeps only ``x``, the two results and how many
  entries tie for each: JAX's own rule for ``jnp.max`` stores a full-size array marking
  the maxima. The forward pass counts the ties (on CPU in one fused pass over ``x`` for
  both extremes); the backward pass marks the extremes again element by element, in the
  pass where a batch norm's gradient reads ``x`` anyway, with no reduction of its own.
  Being a ``jax.custom_vjp``, it has no forward mode (``jax.jvp``, ``jax.jacfwd``): a
  CBAM ResNet differentiated that way needs ``fold_gate=False`` (and a plain ``nn.Conv``,
  see ``attention_flax.conv``)."""
  return jnp.max(x, axis=axes), jnp.min(x, axis=axes)


def _tie_counts_fused(x: Array, top: Array, bottom: Array,
                      axes: tuple[int, ...]) -> tuple[Array, Array]:
  # One variadic reduction, which XLA:CPU fuses with the comparisons; two plain sums would
  # each go to its reduction library, which needs the comparison written out first.
  acc = accumulation_dtype(x.dtype)
  zero = jnp.zeros((), acc)
  hits = tuple((x == jnp.expand_dims(v, axes)).astype(acc) for v in (top, bottom))
  return jax.lax.reduce(hits, (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), axes)


def _tie_counts_plain(x: Array, top: Array, bottom: Array,
                      axes: tuple[int, ...]) -> tuple[Array, Array]:
  acc = accumulation_dtype(x.dtype)
  return tuple(jnp.sum(x == jnp.expand_dims(v, axes), axis=axes, dtype=acc)
               for v in (top, bottom))


def _extrema_fwd(x, axes):
  top, bottom = extrema(x, axes)
  counts = jax.lax.platform_dependent(
      x, top, bottom, cpu=functools.partial(_tie_counts_fused, axes=axes),
      default=functools.partial(_tie_counts_plain, axes=axes))
  return (top, bottom), (x, top, bottom, *counts)


def _extrema_bwd(axes, residuals, cotangents):
  x, top, bottom, top_count, bottom_count = residuals
  zero = jnp.zeros((), x.dtype)
  grad = zero
  for value, count, d in ((top, top_count, cotangents[0]),
                          (bottom, bottom_count, cotangents[1])):
    share = jnp.expand_dims((d.astype(count.dtype) / count).astype(x.dtype), axes)
    grad = grad + jnp.where(x == jnp.expand_dims(value, axes), share, zero)
  return (grad,)


extrema.defvjp(_extrema_fwd, _extrema_bwd)


@jax.custom_jvp
def affine_max(mul: Array, top: Array, bottom: Array, mean: Array) -> Array:
  """``max(x * mul)`` over a pooled axis from ``top = max(x)``, ``bottom = min(x)`` and
  ``mean = mean(x)`` over it, for a per-channel ``mul`` (C,) and (N, C) statistics.

  The value is ``mul * top`` where ``mul > 0``, ``mul * bottom`` where ``mul < 0`` and 0
  where ``mul == 0``. So are the derivatives, with one exception that matters: where
  ``mul == 0`` every entry of ``x * mul`` ties, and the maximum's derivative, shared
  equally among tied entries (JAX's and PyTorch's ``amax``), is ``mean`` with respect to
  ``mul``. A block whose last batch norm starts at zero scale (``zero_init_last``) has
  exactly that at initialisation.
  """
  return jnp.where(mul > 0, mul * top, jnp.where(mul < 0, mul * bottom, 0.0))


@affine_max.defjvp
def _affine_max_jvp(primals, tangents):
  mul, top, bottom, mean = primals
  d_mul, d_top, d_bottom, _ = tangents  # the mean only enters the derivative
  positive, negative = mul > 0, mul < 0
  slope = jnp.where(positive, top, jnp.where(negative, bottom, mean))
  tangent = (slope * d_mul + jnp.where(positive, mul, 0.0) * d_top
             + jnp.where(negative, mul, 0.0) * d_bottom)
  return affine_max(mul, top, bottom, mean), tangent
