"""The Recurrent Attention Model, RAM (Mnih et al. 2014, "Recurrent Models of Visual
Attention", https://arxiv.org/abs/1406.6247).

Hard attention: the model never sees the whole image. At each of ``num_glimpses`` steps it
reads a retina-like glimpse (``num_scales`` patches of ``glimpse_size`` pixels, each
``glimpse_scale`` times wider than the last) at location l_t, updates a recurrent state
h_t, and draws the next location from a Gaussian policy around tanh(Linear(h_t)). The
first glimpse is taken at the image centre, (0, 0) (with ``random_start``, at a uniformly
random location while training, as the paper does). After the last glimpse a linear
classifier reads h_T. The parts are the layers of :mod:`attention_flax.layers.hard`; the
glimpse loop is one ``flax.linen.scan``.

Training (:meth:`RecurrentAttentionModel.training_loss`, which the trainer's train step uses
instead of plain cross-entropy) is the paper's hybrid loss: the classifier's cross-entropy
(which trains the glimpse, core and classifier networks) plus REINFORCE for the location
policy with reward 1 for a correct final answer and 0 otherwise, minus a learned baseline
b_t (sec. 3.2: -(R - b_t) * log pi(l_{t+1} | h_t), summed over steps), plus the baseline's
squared error (R - b_t)^2. Each image is played ``samples`` times with independent draws
(the paper's M episodes per image, sec. 3.2), which the REINFORCE average runs over. The policy and the baseline read h_t with its gradient stopped,
so each term trains only its own part; the sampled locations carry no gradient. At
evaluation (``train=False``) the glimpses follow the policy's mean.

Sown into "intermediates" (declared in ``maps``): ``locations`` (N, T, 2), the (x, y) of
every glimpse in [-1, 1] (``attention_flax.glimpses`` convention); ``means`` (N, T, 2), the
policy's mean after each glimpse (the last one is not used); ``patches``
(N, T, num_scales, size, size, C). Also ``hidden`` (N, T, D), the core's states (not a map).

FLOPs per image depend on the glimpses, not on the image size: T times the glimpse, core,
location and baseline networks, plus the classifier once. The glimpse loop is unrolled by
default (``unroll=True``), so ``attention_flax.models.flops`` counts every glimpse: the
compiler's cost model counts a rolled loop's body once.

Published test error (%), Table 2 of the paper: 60 x 60 cluttered translated MNIST, RAM
with 8 glimpses of 12 x 12 at 3 scales 5.23 against 7.83 for a convolutional network;
100 x 100, RAM with 8 glimpses at 4 scales 10.83 against 16.51.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax.layers.hard import (CORE_KINDS, BaselineNetwork, CoreNetwork,
                                        GlimpseNetwork, LocationNetwork, gaussian_log_prob)
from attention_flax.models.common import ModelEntry, check_model_images

Array = jax.Array

PAPER = "Mnih et al. 2014, Recurrent Models of Visual Attention, arXiv:1406.6247"


class GlimpseStep(nn.Module):
  """One step of the glimpse loop: glimpse at l_t, update h, choose l_{t+1}."""
  glimpse_size: int
  num_scales: int
  glimpse_scale: int
  std: float
  core: str
  patch_features: int
  loc_features: int
  glimpse_features: int
  core_features: int
  train: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry: tuple[Any, Array], images: Array) -> tuple[Any, dict[str, Array]]:
    state, location = carry
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    g, patches = GlimpseNetwork(self.glimpse_size, self.num_scales, self.glimpse_scale,
                                self.patch_features, self.loc_features,
                                self.glimpse_features, name="glimpse", **kw)((images, location))
    state, h = CoreNetwork(self.core_features, self.core, name="core", **kw)((state, g))
    # Policy and baseline learn from their own losses only: h reaches them as a constant.
    h_const = jax.lax.stop_gradient(h)
    mean, sample = LocationNetwork(self.std, name="locator", **kw)(h_const, train=self.train)
    baseline = BaselineNetwork(name="baseline", **kw)(h_const)
    outputs = {"location": location, "mean": mean, "sample": sample, "baseline": baseline,
               "patches": patches, "hidden": h.astype(jnp.float32)}
    return (state, jnp.clip(sample, -1.0, 1.0)), outputs


class RecurrentAttentionModel(nn.Module):
  """RAM: a classifier that looks at ``num_glimpses`` glimpses chosen by a learned policy.

  Attributes:
    num_classes: logits of the classifier after the last glimpse.
    num_glimpses: T, the glimpses per image (the first one at the centre).
    glimpse_size: the side of every patch of a glimpse, in pixels.
    num_scales: patches per glimpse; patch k covers glimpse_size * glimpse_scale**k pixels.
    glimpse_scale: the growth factor between a glimpse's patches.
    std: the location policy's fixed standard deviation (in [-1, 1] units).
    core: "rnn" (the paper's ReLU RNN) or "lstm".
    patch_features, loc_features, glimpse_features: widths of the glimpse network's
      what, where and merged layers (128, 128, 256 in the paper).
    core_features: width of the recurrent state (256).
    random_start: while training, take the first glimpse at a uniformly random location
      instead of the centre (the "dropout" rng stream); evaluation always starts at the
      centre.
    samples: M, the episodes per image in :meth:`training_loss` (sec. 3.2: the gradient
      estimate averages M rollouts of each image with independent locations). One 0/1
      reward per image is a very noisy signal for the policy; several episodes per image
      cut its variance M-fold. Evaluation plays each image once.
    unroll: steps of the glimpse loop per loop iteration (``flax.linen.scan``'s
      ``unroll``); True (the default) unrolls all of them, which FLOP counts need.
  """
  num_classes: int = 10
  num_glimpses: int = 6
  glimpse_size: int = 12
  num_scales: int = 3
  glimpse_scale: int = 2
  std: float = 0.2
  core: str = "rnn"
  patch_features: int = 128
  loc_features: int = 128
  glimpse_features: int = 256
  core_features: int = 256
  random_start: bool = False
  samples: int = 1
  unroll: int | bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  maps: ClassVar[dict[str, str]] = {"locations": "glimpse_location", "means": "policy_mean",
                                    "patches": "glimpse_patches"}

  def _check(self, images: Array) -> None:
    check_model_images(images, type(self).__name__)
    if self.core not in CORE_KINDS:
      raise ValueError(f"RecurrentAttentionModel core must be one of {CORE_KINDS}; got "
                       f"{self.core!r} (--config.model_kwargs.core=rnn).")
    if self.num_glimpses < 1 or self.std <= 0 or self.samples < 1:
      raise ValueError(f"RecurrentAttentionModel needs num_glimpses >= 1, std > 0 and "
                       f"samples >= 1; got num_glimpses={self.num_glimpses}, std={self.std}, "
                       f"samples={self.samples}.")

  @nn.compact
  def rollout(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """(N, H, W, C) images -> (N, num_classes) float32 logits and the loop's outputs, each
    (T, N, ...): location, mean, sample, baseline, patches, hidden. Sows the maps."""
    self._check(images)
    scan = nn.scan(GlimpseStep, variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True}, in_axes=nn.broadcast,
                   length=self.num_glimpses, unroll=self.unroll)
    step = scan(self.glimpse_size, self.num_scales, self.glimpse_scale, self.std, self.core,
                self.patch_features, self.loc_features, self.glimpse_features,
                self.core_features, train=train, dtype=self.dtype,
                param_dtype=self.param_dtype, name="steps")
    n = images.shape[0]
    zeros = jnp.zeros((n, self.core_features), self.dtype)
    state = (zeros, zeros) if self.core == "lstm" else zeros
    start = jnp.zeros((n, 2), jnp.float32)
    if train and self.random_start:
      start = jax.random.uniform(self.make_rng("dropout"), (n, 2), jnp.float32, -1.0, 1.0)
    (_, _), ys = step((state, start), images)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="classifier")(ys["hidden"][-1].astype(self.dtype))
    batch_first = lambda v: jnp.swapaxes(v, 0, 1)
    self.sow("intermediates", "locations", batch_first(ys["location"]))
    self.sow("intermediates", "means", batch_first(ys["mean"]))
    self.sow("intermediates", "patches", batch_first(ys["patches"]))
    self.sow("intermediates", "hidden", batch_first(ys["hidden"]))
    return logits.astype(jnp.float32), ys

  def __call__(self, images: Array, train: bool = False) -> Array:
    """(N, H, W, C) images -> (N, num_classes) float32 logits. With ``train`` the glimpse
    locations are sampled (rng stream "dropout"); without, they follow the policy's mean."""
    return self.rollout(images, train)[0]

  def training_loss(self, images: Array, labels: Array, *, train: bool = True
                    ) -> tuple[Array, dict[str, Array]]:
    """The hybrid loss of a batch: cross-entropy + REINFORCE + baseline squared error.

    Args:
      images: (N, H, W, C) floating images.
      labels: (N,) integer classes.
      train: sample the locations (rng stream "dropout"); False follows the mean, for
        which the policy term is zero in expectation only.

    Returns:
      (scalar loss, aux) with aux = {"logits": (N, K), "cross_entropy", "reinforce",
      "baseline_loss", "reward"} (scalars: means over the N * ``samples`` episodes;
      reward = accuracy of the sampled glimpses; logits: each image's first episode).
    """
    n = images.shape[0]
    if self.samples > 1:  # episode e of image i is row i * samples + e
      images = jnp.repeat(images, self.samples, axis=0)
      labels = jnp.repeat(labels, self.samples, axis=0)
    logits, ys = self.rollout(images, train)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    cross_entropy = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
    reward = jax.lax.stop_gradient(
        (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))  # (N,)
    # Step t's action is the location of glimpse t + 1: the last step chooses none.
    acted = self.num_glimpses - 1
    if acted == 0:
      reinforce = baseline_loss = jnp.zeros((), jnp.float32)
    else:
      log_pi = gaussian_log_prob(ys["sample"][:acted], ys["mean"][:acted], self.std)
      baseline = ys["baseline"][:acted]  # (T - 1, N)
      advantage = reward[None] - jax.lax.stop_gradient(baseline)
      reinforce = -jnp.mean(jnp.sum(advantage * log_pi, axis=0))
      baseline_loss = jnp.mean((baseline - reward[None]) ** 2)
    loss = cross_entropy + reinforce + baseline_loss
    logits = logits.reshape(n, self.samples, -1)[:, 0]
    return loss, {"logits": logits, "cross_entropy": cross_entropy, "reinforce": reinforce,
                  "baseline_loss": baseline_loss, "reward": jnp.mean(reward)}


ram_digits = functools.partial(RecurrentAttentionModel, num_classes=10)
# Tiny variant for the test suite.
ram_digits_tiny = functools.partial(
    RecurrentAttentionModel, num_classes=10, num_glimpses=3, glimpse_size=6, num_scales=2,
    patch_features=16, loc_features=16, glimpse_features=32, core_features=32)

MODELS: dict[str, ModelEntry] = {
    "ram_digits": ModelEntry(ram_digits, input_size=60, in_channels=1,
                             paper=PAPER + " (RAM, translated / cluttered MNIST, Tables 1-2)"),
    "ram_digits_tiny": ModelEntry(ram_digits_tiny, input_size=24, in_channels=1, paper=PAPER,
                                  test_only=True),
}
