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

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn


Array = jax.Array


class TorchBatchNorm(nn.Module):
  """Batch norm over the last (channel) axis of (N, H, W, C), or of any (..., C) array.

  Training (``use_running_average=False``): normalises with the batch mean and biased
  variance over every axis but the last, and, outside ``init``, updates
  ``mean <- momentum * mean + (1 - momentum) * batch_mean`` and the same for ``var`` with
  the unbiased batch variance (``unbiased_running_var=False`` gives Flax's biased rule).
  Evaluation: normalises with the running statistics. The statistics are computed in
  float32 whatever the input dtype, in one pass over the data (mean and mean square read
  together), shifted by the running mean: var = E[(x - s)^2] - E[x - s]^2 with s = the running mean (no gradient
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

  def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
    """Normalises ``x`` (..., C): ``x * mul + add`` per channel, in :meth:`output_dtype`."""
    mul, add, _ = self._affine(x, use_running_average, per_sample=False)
    return (x.astype(jnp.float32) * mul + add).astype(self.output_dtype(x.dtype))

  def fold(self, x: Array,
           use_running_average: bool | None = None) -> tuple[Array, Array, Array]:
    """The normalisation as numbers to fold into a later per-channel scale.

    Returns ``(mul, add, sample_mean)``: float32 (C,) with ``self(x) == x * mul + add``
    (before the cast to ``dtype``), and the float32 (N, C) mean of ``x`` over the axes
    between the first and the last (H and W of an image), so that the output's mean is
    ``sample_mean * mul + add``. Updates the running statistics as ``__call__`` does. In
    training the sums are taken per sample first, so that ``sample_mean`` comes from the
    same pass over ``x`` as the statistics: a caller that then scales the output by a
    per-sample channel gate ``s`` computed from that mean (SE, ECA) writes
    ``x * (mul * s) + add * s`` and never the normalised map.
    """
    return self._affine(x, use_running_average, per_sample=True)

  @nn.compact
  def _affine(self, x: Array, use_running_average: bool | None,
              per_sample: bool) -> tuple[Array, Array, Array | None]:
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
    inner_axes = tuple(range(1, x.ndim - 1))  # per sample: (N, ..., C) -> (N, C)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)

    sample_mean = None
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      if per_sample:
        sample_mean = jnp.mean(x32, axis=inner_axes)
    else:
      # Shifted by the running mean (no gradient through it): E[(x - s)^2] - E[x - s]^2
      # does not cancel when the mean is large against the spread.
      shift = jax.lax.stop_gradient(ra_mean.value)
      centred = x32 - shift
      if per_sample:
        per_image = jnp.mean(centred, axis=inner_axes)
        first = jnp.mean(per_image, axis=0)
        second = jnp.mean(jnp.mean(jnp.square(centred), axis=inner_axes), axis=0)
        sample_mean = shift + per_image
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

    # y = x * (scale / std) + (bias - mean * scale / std): one multiply-add per element.
    mul = jax.lax.rsqrt(var + jnp.float32(self.epsilon))
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
      mul = mul * scale.astype(jnp.float32)
    add = -mean * mul
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
      add = add + bias.astype(jnp.float32)
    return mul, add, sample_mean

  def output_dtype(self, input_dtype: Any) -> Any:
    """The dtype of the normalised output for an input of ``input_dtype``."""
    if self.dtype is not None:
      return self.dtype
    # The wider of the two, chosen explicitly: strict dtype promotion refuses to mix them.
    wider = jnp.finfo(input_dtype).bits >= jnp.finfo(self.param_dtype).bits
    return input_dtype if wider else self.param_dtype


def at_least_float32(x: Array) -> Array:
  """x, promoted to float32 when narrower (the input of every batch norm here)."""
  return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


def batch_norm(norm: Callable[..., nn.Module], x: Array, *, name: str, **kwargs: Any) -> Array:
  """Applies the child ``norm(name=name, **kwargs)`` to ``x`` promoted to at least float32.

  ``norm`` is a module factory (:class:`TorchBatchNorm`, ``flax.linen.BatchNorm`` or a
  ``functools.partial`` of one). Statistics of half-precision activations are computed in
  float32, and float32 statistics never meet a bfloat16 input (strict dtype promotion
  would refuse the mix). The output has the norm's ``dtype``.
  """
  if not callable(norm):
    raise TypeError(
        f"norm must be a module factory such as TorchBatchNorm or "
        f"functools.partial(flax.linen.BatchNorm, momentum=0.9, epsilon=1e-5); got {norm!r}.")
  return norm(name=name, **kwargs)(at_least_float32(x))
