"""Hard attention: the parts of the Recurrent Attention Model (Mnih et al. 2014, "Recurrent
Models of Visual Attention", https://arxiv.org/abs/1406.6247, sec. 3.1 and 4).

Unlike the soft attention layers of this package, these parts do not map a feature map to a
feature map, so they are not registered as attentions: they are the building blocks of
:class:`attention_flax.models.ram.RecurrentAttentionModel`, which sees an image only through
a few glimpses and chooses each next location by a random draw trained with REINFORCE.

* :class:`GlimpseNetwork`: g = ReLU(Linear(h_g) + Linear(h_l)), with h_g = ReLU(Linear(
  patches)) and h_l = ReLU(Linear(location)) (the paper's f_g, Fig. 1B).
* :class:`CoreNetwork`: the paper's ReLU RNN h_t = ReLU(Linear(h_{t-1}) + Linear(g_t)),
  or an LSTM (``kind="lstm"``).
* :class:`LocationNetwork`: a Gaussian policy over the next (x, y) location with a fixed
  standard deviation; its mean is tanh(Linear(h)), bounded to [-1, 1].
* :class:`BaselineNetwork`: b_t = Linear(h_t), the learned reward baseline.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax.glimpses import extract_glimpses

Array = jax.Array

CORE_KINDS = ("rnn", "lstm")


def gaussian_log_prob(x: Array, mean: Array, std: float) -> Array:
  """log N(x; mean, std^2 I) summed over the last axis: (..., D) -> (...)."""
  d = x.shape[-1]
  z = (x - mean) / std
  return -0.5 * jnp.sum(z * z, axis=-1) - d * (math.log(std) + 0.5 * math.log(2 * math.pi))


class GlimpseNetwork(nn.Module):
  """Glimpse sensor plus the two MLPs that merge what and where (Fig. 1B).

  Attributes:
    size, num_scales, scale: the sensor's patch side, patches per glimpse and growth factor
      (:func:`attention_flax.glimpses.extract_glimpses`).
    patch_features: width of h_g, the patches' hidden layer (128 in the paper).
    loc_features: width of h_l, the location's hidden layer (128).
    features: width of the glimpse feature g (256).
  """
  size: int = 8
  num_scales: int = 1
  scale: int = 2
  patch_features: int = 128
  loc_features: int = 128
  features: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: tuple[Array, Array], train: bool = False
               ) -> tuple[Array, Array]:
    """inputs = ((N, H, W, C) images, (N, 2) (x, y) locations in [-1, 1]) -> the
    (N, features) glimpse feature g and the (N, num_scales, size, size, C) patches it was
    computed from. ``train`` changes nothing."""
    images, locations = inputs
    patches = extract_glimpses(images, locations, self.size, self.num_scales, self.scale)
    dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    flat = patches.reshape(patches.shape[0], -1).astype(self.dtype)
    h_g = nn.relu(dense(self.patch_features, "patch")(flat))
    h_l = nn.relu(dense(self.loc_features, "where")(locations.astype(self.dtype)))
    g = nn.relu(dense(self.features, "what_out")(h_g) + dense(self.features, "where_out")(h_l))
    return g, patches


class CoreNetwork(nn.Module):
  """One step of the recurrent core.

  Attributes:
    features: width of the hidden state h (256 in the paper).
    kind: "rnn" (h_t = ReLU(Linear(h_{t-1}) + Linear(g_t)), the paper's core) or "lstm"
      (``flax.linen.LSTMCell``; the carry is then (c, h)).
  """
  features: int = 256
  kind: str = "rnn"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def initial_carry(self, batch: int) -> Any:
    """The zero state for ``batch`` images: h, or (c, h) for the LSTM."""
    zeros = jnp.zeros((batch, self.features), self.dtype)
    return (zeros, zeros) if self.kind == "lstm" else zeros

  @nn.compact
  def __call__(self, inputs: tuple[Any, Array], train: bool = False) -> tuple[Any, Array]:
    """inputs = (carry, (N, D) glimpse feature g) -> (new carry, (N, features) hidden
    state h). ``train`` changes nothing."""
    carry, g = inputs
    if self.kind not in CORE_KINDS:
      raise ValueError(f"CoreNetwork kind must be one of {CORE_KINDS}; got {self.kind!r}.")
    if self.kind == "lstm":
      carry, h = nn.LSTMCell(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="lstm")(carry, g)
      return carry, h
    h = nn.relu(nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="hidden")(carry)
                + nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="input")(g))
    return h, h


class LocationNetwork(nn.Module):
  """The Gaussian location policy: mean = tanh(Linear(h)), fixed ``std``.

  ``__call__(x, train)`` returns (mean, sample): with ``train`` the sample is
  mean + std * noise, the noise drawn from the "dropout" rng stream (which the trainer's
  train step provides); without it the sample is the mean itself. The sample is returned
  with its gradient stopped: the policy learns only through the log-probability of its
  samples (:func:`gaussian_log_prob`), never through where a glimpse was taken.

  The output layer's kernel starts at zero, so an untrained policy points every image at
  the centre (tanh of the bias, 0) instead of at an arbitrary spot set by the random
  weights; REINFORCE then moves it from there.
  """
  std: float = 0.2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    """(N, D) hidden state -> (N, 2) float32 mean in (-1, 1) and (N, 2) sample."""
    mean = jnp.tanh(nn.Dense(2, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=nn.initializers.zeros, name="mean")(x)
                    .astype(jnp.float32))
    if not train:
      return mean, jax.lax.stop_gradient(mean)
    noise = jax.random.normal(self.make_rng("dropout"), mean.shape, jnp.float32)
    return mean, jax.lax.stop_gradient(mean + self.std * noise)


class BaselineNetwork(nn.Module):
  """b = Linear(h): the expected reward from state h, (N, D) -> (N,) float32."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    b = nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype, name="value")(x)
    return b[..., 0].astype(jnp.float32)
