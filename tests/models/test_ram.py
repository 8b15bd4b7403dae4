"""The Recurrent Attention Model: the REINFORCE estimator is unbiased, each part of the
hybrid loss trains only its own part (checked by value), the maps it sows, and that it
learns to classify translated digits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attention_flax import models
from attention_flax.layers.hard import gaussian_log_prob
from attention_flax.models.ram import RecurrentAttentionModel

INIT_KEY = jax.random.key(0, impl="rbg")


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, shape), jnp.float32)


def test_reinforce_estimator_is_unbiased():
  # Gaussian policy a ~ N(mu, s^2 I) in 2-D, reward r(a) = -|a - c|^2: the expected reward
  # is -|mu - c|^2 - 2 s^2, whose gradient in mu is -2 (mu - c). The score-function
  # estimate r(a) * d log pi(a) / d mu, with a baseline b subtracted (any constant keeps it
  # unbiased), averaged over many draws, must match within its standard error.
  mu, c, std, b = jnp.asarray([0.3, -0.2]), jnp.asarray([-0.5, 0.4]), 0.25, -0.6
  draws = 40_000
  noise = np.random.default_rng(0).standard_normal((draws, 2)).astype(np.float32)
  actions = jax.lax.stop_gradient(mu + std * jnp.asarray(noise))
  reward = -jnp.sum((actions - c) ** 2, axis=-1)
  score = jax.vmap(jax.grad(lambda m, a: gaussian_log_prob(a, m, std)), (None, 0))(mu, actions)
  estimates = np.asarray((reward - b)[:, None] * score)
  mean = estimates.mean(0)
  stderr = estimates.std(0, ddof=1) / np.sqrt(draws)
  analytic = np.asarray(-2.0 * (mu - c))
  assert np.all(stderr < 0.05 * np.abs(analytic))  # a test that can tell them apart
  assert np.all(np.abs(mean - analytic) < 4.0 * stderr), (mean, analytic, stderr)
  # The log-density itself, by hand.
  a = jnp.asarray([[0.1, 0.7]])
  want = -0.5 * float(jnp.sum(((a - mu) / std) ** 2)) - 2 * np.log(std) - np.log(2 * np.pi)
  np.testing.assert_allclose(float(gaussian_log_prob(a, mu, std)[0]), want, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  model = models.create_model("ram_digits_tiny", num_classes=10, std=0.05, num_glimpses=4)
  images = _images((6, 24, 24, 1), seed=1)
  labels = jnp.asarray([0, 1, 2, 3, 4, 5], jnp.int32)
  params = model.init(INIT_KEY, images)["params"]
  # The policy's output kernel starts at zero (every mean 0); a random one makes the means
  # differ, so that the hand-computed tanh derivative below is exercised.
  kernel = params["steps"]["locator"]["mean"]["kernel"]
  assert not np.any(np.asarray(kernel))
  params["steps"]["locator"]["mean"]["kernel"] = jax.random.normal(
      jax.random.PRNGKey(7), kernel.shape) / np.sqrt(kernel.shape[0])
  rng = jax.random.PRNGKey(3)

  def loss(p):
    return model.apply({"params": p}, images, labels, method="training_loss",
                       rngs={"dropout": rng})

  (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  _, inter = model.apply({"params": params}, images, labels, method="training_loss",
                         rngs={"dropout": rng}, mutable=["intermediates"])
  sown = {k: np.asarray(v[0], np.float64) for k, v in inter["intermediates"].items()}
  return model, images, labels, params, rng, aux, grads, sown


def test_classifier_gradient_is_the_cross_entropy_alone(tiny):
  model, _, labels, params, _, aux, grads, sown = tiny
  h_last = sown["hidden"][:, -1]  # (N, D)
  w = np.asarray(params["classifier"]["kernel"], np.float64)
  logits = h_last @ w + np.asarray(params["classifier"]["bias"], np.float64)
  np.testing.assert_allclose(np.asarray(aux["logits"]), logits, rtol=1e-4, atol=1e-5)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  delta = (p - np.eye(10)[np.asarray(labels)]) / len(p)  # d mean CE / d logits
  np.testing.assert_allclose(grads["classifier"]["kernel"], h_last.T @ delta, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(grads["classifier"]["bias"], delta.sum(0), rtol=1e-4, atol=1e-6)


def test_core_and_glimpse_gradients_are_the_cross_entropy_alone(tiny):
  model, images, labels, params, rng, _, grads, _ = tiny

  def cross_entropy(p):  # the same sampled glimpses (same rng): plain cross-entropy
    logits = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  ce_grads = jax.grad(cross_entropy)(params)
  for part in ("core", "glimpse"):
    for got, want in zip(jax.tree.leaves(grads["steps"][part]),
                         jax.tree.leaves(ce_grads["steps"][part])):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert float(optax.tree.norm(ce_grads["steps"]["locator"])) == 0.0
  assert float(optax.tree.norm(ce_grads["steps"]["baseline"])) == 0.0


def test_policy_and_baseline_gradients_by_hand(tiny):
  model, _, labels, params, _, aux, grads, sown = tiny
  h, loc, mean = sown["hidden"], sown["locations"], sown["means"]  # (N, T, .)
  n, t = loc.shape[:2]
  acted = t - 1
  # Location t + 1 is the sample drawn after glimpse t; with std 0.05 none was clipped.
  sample = loc[:, 1:]
  assert np.all(np.abs(sample) < 1.0)
  reward = (np.argmax(np.asarray(aux["logits"]), 1) == np.asarray(labels)).astype(np.float64)
  wb = np.asarray(params["steps"]["baseline"]["value"]["kernel"], np.float64)[:, 0]
  bb = float(params["steps"]["baseline"]["value"]["bias"][0])
  baseline = h[:, :acted] @ wb + bb  # (N, T - 1)
  advantage = reward[:, None] - baseline
  mu = mean[:, :acted]
  # d/d(pre-tanh) of -(1/N) sum_t A log N(sample; tanh(z), s^2): -A (sample - mu) / s^2 (1 - mu^2)
  dz = -(advantage[..., None] * (sample - mu) / model.std ** 2 * (1 - mu ** 2)) / n
  want_kernel = np.einsum("ntd,ntk->dk", h[:, :acted], dz)
  locator = grads["steps"]["locator"]["mean"]
  np.testing.assert_allclose(locator["kernel"], want_kernel, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(locator["bias"], dz.sum((0, 1)), rtol=1e-3, atol=1e-6)
  # Baseline: d mean((b - R)^2) = 2 (b - R) / (N (T - 1)).
  db = 2 * (baseline - reward[:, None]) / (n * acted)
  value = grads["steps"]["baseline"]["value"]
  np.testing.assert_allclose(value["kernel"][:, 0], np.einsum("nt,ntd->d", db, h[:, :acted]),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(value["bias"][0], db.sum(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(aux["baseline_loss"]), np.mean((baseline - reward[:, None]) ** 2),
                             rtol=1e-4)
  np.testing.assert_allclose(float(aux["reward"]), reward.mean())


def test_eval_follows_the_mean_and_sows_the_maps(tiny):
  model, images, _, params, _, _, _, _ = tiny
  assert model.maps == {"locations": "glimpse_location", "means": "policy_mean",
                        "patches": "glimpse_patches"}
  logits, inter = model.apply({"params": params}, images, mutable=["intermediates"])
  sown = {k: np.asarray(v[0]) for k, v in inter["intermediates"].items()}
  n, t = images.shape[0], model.num_glimpses
  assert sown["locations"].shape == (n, t, 2) and sown["means"].shape == (n, t, 2)
  assert sown["patches"].shape == (n, t, model.num_scales, model.glimpse_size,
                                   model.glimpse_size, 1)
  np.testing.assert_array_equal(sown["locations"][:, 0], 0.0)  # the first glimpse: centre
  np.testing.assert_allclose(sown["locations"][:, 1:], sown["means"][:, :-1], atol=1e-7)
  again = model.apply({"params": params}, images)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(again))


def test_samples_play_each_image_several_times(tiny):
  # samples=M is the single-episode loss of every image repeated M times (row i * M + e),
  # with the first episode's logits reported.
  model, images, labels, params, rng, _, _, _ = tiny
  many = model.clone(samples=3)
  loss, aux = many.apply({"params": params}, images, labels, method="training_loss",
                         rngs={"dropout": rng})
  want, want_aux = model.apply({"params": params}, jnp.repeat(images, 3, 0),
                               jnp.repeat(labels, 3, 0), method="training_loss",
                               rngs={"dropout": rng})
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(aux["reward"]), float(want_aux["reward"]))
  assert aux["logits"].shape == (len(images), 10)
  np.testing.assert_allclose(aux["logits"], want_aux["logits"][::3], rtol=1e-6)
  # The draws differ between the episodes of one image.
  _, inter = many.apply({"params": params}, images, labels, method="training_loss",
                        rngs={"dropout": rng}, mutable=["intermediates"])
  loc = np.asarray(inter["intermediates"]["locations"][0]).reshape(len(images), 3, -1, 2)
  assert np.all(np.abs(loc[:, 0, 1:] - loc[:, 1, 1:]).max(-1) > 0)


def test_bad_fields_have_clear_errors():
  x = jnp.zeros((1, 24, 24, 1), jnp.float32)
  with pytest.raises(ValueError, match="core must be one of"):
    RecurrentAttentionModel(core="gru").init(INIT_KEY, x)
  with pytest.raises(ValueError, match="num_glimpses >= 1"):
    RecurrentAttentionModel(num_glimpses=0).init(INIT_KEY, x)
  with pytest.raises(ValueError, match="samples >= 1"):
    RecurrentAttentionModel(samples=0).init(INIT_KEY, x)


def _digit_centres(images):
  """(N, H, W, 1) canvases holding one digit each -> (N, 2) (x, y) of the digit's centre of
  mass in the glimpses' [-1, 1] convention (pixel i of n has its centre at (2i + 1)/n - 1)."""
  w = np.asarray(images, np.float64)[..., 0]
  _, h, width = w.shape
  mass = w.sum((1, 2))
  row = (w.sum(2) * np.arange(h)).sum(1) / mass
  col = (w.sum(1) * np.arange(width)).sum(1) / mass
  return np.stack([(2 * col + 1) / width - 1, (2 * row + 1) / h - 1], axis=-1)


def test_digit_centres_by_hand():
  canvas = np.zeros((1, 8, 8, 1))
  canvas[0, 1, 2] = canvas[0, 1, 4] = 1.0  # centre of mass: row 1, column 3
  np.testing.assert_allclose(_digit_centres(canvas), [[(2 * 3 + 1) / 8 - 1,
                                                       (2 * 1 + 1) / 8 - 1]])


def test_ram_learns_to_classify_and_to_look_at_the_digit():
  # Translated digits: each 12 px digit alone at a random place of a 24 x 24 canvas. The
  # glimpses (6 px, and 12 px at half resolution) do not cover the canvas, so where they go
  # matters: after the first glimpse at the centre the policy must learn, from the 0/1
  # reward alone, to send the next ones to the digit.
  from train import datasets

  kw = dict(seed=0, image_size=24, digit_size=12, max_rotation=0.0, scale_range=(1.0, 1.0),
            clutter=0)
  train = datasets.distorted_digits_source("train", copies=8, **kw)
  test = datasets.distorted_digits_source("test", copies=1, **kw)
  x_train = train.images.astype(np.float32) / 255.0
  x_test = jnp.asarray(test.images.astype(np.float32) / 255.0)
  centres = _digit_centres(x_test)
  model = RecurrentAttentionModel(num_classes=10, num_glimpses=3, glimpse_size=6,
                                  num_scales=2, std=0.2, samples=8, patch_features=64,
                                  loc_features=32, glimpse_features=128, core_features=128)
  params = model.init(INIT_KEY, x_test[:1])["params"]
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels, key):
    grads, aux = jax.grad(lambda p: model.apply({"params": p}, images, labels,
                                                method="training_loss",
                                                rngs={"dropout": key}), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux["reward"]

  @jax.jit
  def evaluate(p):  # policy means: accuracy and where glimpses 2..T went
    logits, inter = model.apply({"params": p}, x_test, mutable=["intermediates"])
    hits = jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(test.labels))
    return hits, inter["intermediates"]["locations"][0][:, 1:]

  def distance(locations):  # mean distance from the later glimpses to the digit's centre
    return float(np.mean(np.linalg.norm(np.asarray(locations) - centres[:, None], axis=-1)))

  fixed_centre = float(np.mean(np.linalg.norm(centres, axis=-1)))  # never moving
  before, locations = evaluate(params)
  before, distance_before = float(before), distance(locations)
  rng = np.random.default_rng(0)
  key = jax.random.PRNGKey(0)
  rewards = []
  # optax's Adam mixes a weak float and the int32 step count, which strict promotion refuses.
  with jax.numpy_dtype_promotion("standard"):
    for i in range(600):
      idx = rng.integers(0, len(x_train), 64)
      params, opt_state, reward = step(params, opt_state, jnp.asarray(x_train[idx]),
                                       jnp.asarray(train.labels[idx]),
                                       jax.random.fold_in(key, i))
      rewards.append(float(reward))
  after, locations = evaluate(params)
  after, distance_after = float(after), distance(locations)
  assert before < 0.2 and after > 0.6, (before, after)  # chance: 0.1
  # The reward (training accuracy with sampled glimpses) rose too.
  assert np.mean(rewards[-50:]) > np.mean(rewards[:50]) + 0.3
  # The untrained policy looks at the centre (its output layer starts at zero); trained,
  # its glimpses land clearly nearer the digit than the centre is.
  assert fixed_centre > 0.3  # the digits are spread out: the centre is a poor guess
  np.testing.assert_allclose(distance_before, fixed_centre, rtol=1e-5)
  assert distance_after < 0.8 * fixed_centre, (distance_before, distance_after)


def test_flops_do_not_grow_with_the_image():
  model = models.create_model("ram_digits_tiny", num_classes=10)
  unrolled = model.clone(unroll=model.num_glimpses)  # the cost model counts a loop body once
  small, large = (models.flops(unrolled, (1, s, s, 1)) for s in (24, 48))
  assert small == pytest.approx(large, rel=1e-3)
  # By hand, multiply-adds of the dense layers per glimpse: patches (2 scales of 6 x 6) -> 16,
  # location -> 16, 16 -> 32 twice, core 32 -> 32 twice, policy 32 -> 2, baseline 32 -> 1;
  # then the classifier 32 -> 10 once. 2 FLOPs each; element-wise work comes on top.
  per_glimpse = 72 * 16 + 2 * 16 + 2 * 16 * 32 + 2 * 32 * 32 + 32 * 2 + 32
  dense = 2 * (model.num_glimpses * per_glimpse + 32 * 10)
  assert dense <= small * 1e9 <= 1.2 * dense, (small * 1e9, dense)
