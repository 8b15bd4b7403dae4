"""Tests of train/trainer.py and the modules it is built from (train/steps.py, optim.py,
state.py): loss, weight-decay mask, optimiser numbers, every config's learning rate at its
warm-up and decay boundaries, eval sums, config and model_kwargs errors, one end-to-end run
on the embedded digits (compiled once per model), the non-finite stop, 2 devices == 1
device (subprocesses), and an import graph without trainer -> visualize."""

from __future__ import annotations

import ast
import glob
import importlib
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default as default_config
from train import checkpoint as ckpt_lib
from train import metrics as metrics_lib
from train import optim
from train import state as state_lib
from train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "test_resnet_cifar_tiny"  # 3 stages of one basic block, widths 4/8/16


def tiny_config(**overrides):
  """The default config shrunk to a tiny ResNet on 8x8 digits."""
  config = default_config.get_config()
  config.model = TINY
  config.data.image_size = 8
  config.batch_size = 16
  config.eval_batch_size = 120
  config.num_train_steps = 6
  config.warmup_epochs = 0.0
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.keep_checkpoints = 2
  config.progress_bar = False
  config.plot_curves = True
  for key, value in overrides.items():
    config[key] = value
  return config


def sgd_config(**overrides):
  config = tiny_config(schedule="constant", learning_rate=0.1, momentum=0.9, nesterov=False,
                       weight_decay=0.1, grad_clip_norm=0.0)
  for key, value in overrides.items():
    config[key] = value
  return config


# ----------------------------------------------------------------- loss and optimiser


def test_cross_entropy_by_hand():
  logits = jnp.array([[2.0, 1.0, 0.0]])
  labels = jnp.array([0])
  lse = math.log(math.e ** 2 + math.e + 1.0)  # 2.4076059...
  logp = [2.0 - lse, 1.0 - lse, -lse]
  plain = float(trainer.cross_entropy(logits, labels)[0])
  np.testing.assert_allclose(plain, -logp[0], rtol=1e-6)  # 0.4076059
  # Smoothing 0.3 over K = 3: targets (0.7 + 0.1, 0.1, 0.1).
  smooth = float(trainer.cross_entropy(logits, labels, 0.3)[0])
  np.testing.assert_allclose(smooth, -(0.8 * logp[0] + 0.1 * logp[1] + 0.1 * logp[2]),
                             rtol=1e-6)  # 0.7076059
  assert smooth > plain


def test_weight_decay_mask_excludes_biases_and_norm_params():
  from attention_flax import models
  model = models.create_model("test_resnet_tiny_se", num_classes=10)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 32, 32, 3)), train=False))
  mask = optim.decay_mask(variables["params"])
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  names = {path[-1].key: [] for path, _ in flat}
  for path, decays in flat:
    names[path[-1].key].append(decays)
  assert set(names) == {"kernel", "bias", "scale"}
  assert all(names["kernel"]) and not any(names["bias"]) and not any(names["scale"])
  # The SE block's 1x1 convs have biases, and they are excluded too.
  se_biases = [decays for path, decays in flat
               if any("fc1" in str(p) or "fc2" in str(p) for p in path)
               and path[-1].key == "bias"]
  assert se_biases and not any(se_biases)


def _two_updates(config, steps=2):
  params = {"w": jnp.ones((1, 1)), "b": jnp.ones((1,))}
  grads = {"w": jnp.full((1, 1), 0.5), "b": jnp.full((1,), 0.5)}
  tx = optim.make_optimizer(config, optim.make_schedule(config, 1))
  opt_state = tx.init(params)
  for _ in range(steps):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return float(params["w"][0, 0]), float(params["b"][0])


def test_sgd_momentum_weight_decay_by_hand():
  # PyTorch SGD: d = g + wd * w; buf = m * buf + d; w -= lr * buf (bias: no decay).
  # w: d1 = 0.6, w1 = 0.94; d2 = 0.5 + 0.094 = 0.594, buf = 0.54 + 0.594, w2 = 0.8266.
  # b: buf1 = 0.5, b1 = 0.95; buf2 = 0.95, b2 = 0.855.
  w, b = _two_updates(sgd_config())
  np.testing.assert_allclose([w, b], [0.8266, 0.855], rtol=1e-6)
  # Nesterov, one step: w -= lr * (d + m * buf) = 0.1 * (0.6 + 0.54) -> 0.886.
  w, b = _two_updates(sgd_config(nesterov=True), steps=1)
  np.testing.assert_allclose([w, b], [0.886, 1.0 - 0.1 * 0.95], rtol=1e-6)


def test_adamw_decoupled_decay_by_hand():
  # First Adam step moves by lr * sign(g); AdamW adds lr * wd * w for kernels only.
  config = sgd_config(optimizer="adamw", weight_decay=0.1)
  w, b = _two_updates(config, steps=1)
  np.testing.assert_allclose([w, b], [1.0 - 0.1 * (1.0 + 0.1), 0.9], rtol=1e-5)


def test_gradient_clipping_by_global_norm():
  config = sgd_config(momentum=0.0, weight_decay=0.0, grad_clip_norm=0.25)
  # Global norm of (0.5, 0.5) is 0.7071; clipped to 0.25 -> each 0.1768; lr 0.1.
  w, b = _two_updates(config, steps=1)
  np.testing.assert_allclose([w, b], [1.0 - 0.1 * 0.25 / math.sqrt(2)] * 2, rtol=1e-6)


# ------------------------------------------------------------------------- schedules


def _lrs(config, steps_per_epoch, steps):
  schedule = optim.make_schedule(config, steps_per_epoch)
  return [float(schedule(s)) for s in steps]


def test_step_schedule_divides_by_ten_at_boundaries():
  config = tiny_config(schedule="step", learning_rate=0.1, decay_steps=(3, 5))
  np.testing.assert_allclose(_lrs(config, 1, range(7)),
                             [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  # Epoch boundaries: 30 and 60 epochs of 10 steps -> steps 300 and 600.
  config = tiny_config(schedule="step", learning_rate=0.1, decay_epochs=(30, 60),
                       num_train_steps=0, num_epochs=90.0)
  np.testing.assert_allclose(_lrs(config, 10, [0, 299, 300, 599, 600, 899]),
                             [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_warmup_cosine_endpoints():
  config = tiny_config(schedule="cosine", learning_rate=0.4, warmup_epochs=2.0,
                       num_train_steps=10)
  lrs = _lrs(config, 1, [0, 1, 2, 6, 10, 12])
  # Linear from 0 to the peak at step 2, cosine to 0 at step 10 (half way at 6).
  np.testing.assert_allclose(lrs, [0.0, 0.2, 0.4, 0.2, 0.0, 0.0], atol=1e-7)
  assert _lrs(tiny_config(schedule="constant", learning_rate=0.3), 1, [0, 5]) == \
      pytest.approx([0.3, 0.3])


def _cosine(peak, warmup, total, step):
  """By hand: linear 0 -> peak over the warm-up, then peak/2 (1 + cos(pi t / T)) to 0."""
  if step < warmup:
    return peak * step / warmup
  progress = min(step - warmup, total - warmup) / (total - warmup)
  return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# Every config's schedule at the steps where it changes: step 0, the warm-up boundary
# (last warm-up step, the peak, the one after), the decay boundaries (last step before,
# first at the decayed rate) and the end. Steps per epoch as the trainer computes them
# (training examples // batch size); the learning rates worked out by hand.
_DIGITS = 1437 // 64  # 22: warm-up of 1 epoch; cosine to the last step
_STN = 11496 // 64  # 179: warm-up round(0.2 * 179) = 36 steps; 716 steps
CONFIG_SCHEDULES = {
    "default": (_DIGITS, {
        0: 0.0, 1: 0.1 / 22, 11: 0.05, 21: 0.1 * 21 / 22, 22: 0.1,
        23: _cosine(0.1, 22, 440, 23), 231: 0.05, 439: _cosine(0.1, 22, 440, 439),
        440: 0.0, 500: 0.0}),
    "digits_cbam": (_DIGITS, {
        0: 0.0, 21: 0.1 * 21 / 22, 22: 0.1, 99: 0.05, 175: _cosine(0.1, 22, 176, 175),
        176: 0.0}),
    "digits_attention": (_DIGITS, {
        0: 0.0, 21: 0.1 * 21 / 22, 22: 0.1, 121: 0.05, 220: 0.0}),
    # The default recipe cut to 6 epochs: 132 steps, warm-up 22, cosine midpoint at 77.
    "digits_naive_attention": (_DIGITS, {
        0: 0.0, 21: 0.1 * 21 / 22, 22: 0.1, 77: 0.05, 131: _cosine(0.1, 22, 132, 131),
        132: 0.0}),
    # No warm-up, cosine from the first step: 10 epochs of 359 steps of 32 = 3,590 steps;
    # 3 epochs of 179 steps of 64 = 537.
    "digits_ram": (11496 // 32, {
        0: 1e-3, 1: _cosine(1e-3, 0, 3590, 1), 1795: 5e-4, 3589: _cosine(1e-3, 0, 3590, 3589),
        3590: 0.0}),
    "digits_soft_hard": (_STN, {
        0: 1e-3, 1: _cosine(1e-3, 0, 537, 1), 268: _cosine(1e-3, 0, 537, 268),
        536: _cosine(1e-3, 0, 537, 536), 537: 0.0}),
    "digits_stn": (_STN, {
        0: 0.0, 18: 0.01, 35: 0.02 * 35 / 36, 36: 0.02, 37: _cosine(0.02, 36, 716, 37),
        376: 0.01, 715: _cosine(0.02, 36, 716, 715), 716: 0.0}),
    # He et al. sec. 4.2: 0.1, /10 at 32k and 48k.
    "cifar10_resnet20": (50_000 // 128, {
        0: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01, 48_000: 0.001, 63_999: 0.001}),
    # The same after one epoch (390 steps) of linear warm-up.
    "cifar10_se_resnet110": (50_000 // 128, {
        0: 0.0, 1: 0.1 / 390, 195: 0.05, 389: 0.1 * 389 / 390, 390: 0.1, 391: 0.1,
        31_999: 0.1, 32_000: 0.01, 47_999: 0.01, 48_000: 0.001, 63_999: 0.001}),
    "cifar10_attention92": (50_000 // 64, {
        0: 0.1, 63_999: 0.1, 64_000: 0.01, 95_999: 0.01, 96_000: 0.001, 159_999: 0.001}),
    # Epochs 30 and 60 of 5,004 steps (1,281,167 // 256).
    "imagenet_resnet50": (1_281_167 // 256, {
        0: 0.1, 150_119: 0.1, 150_120: 0.01, 300_239: 0.01, 300_240: 0.001,
        450_359: 0.001}),
    "imagenet_cbam_resnet50": (1_281_167 // 256, {
        0: 0.1, 150_119: 0.1, 150_120: 0.01, 300_240: 0.001}),
    # 0.6 /10 every 30 epochs of 1,251 steps (1,281,167 // 1024).
    "imagenet_seresnet50": (1_281_167 // 1024, {
        0: 0.6, 37_529: 0.6, 37_530: 0.06, 75_059: 0.06, 75_060: 0.006, 112_589: 0.006,
        112_590: 0.0006, 125_099: 0.0006}),
}


def test_every_config_has_its_schedule_checked():
  names = {os.path.splitext(os.path.basename(p))[0]
           for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))} - {"__init__"}
  assert names == set(CONFIG_SCHEDULES)


@pytest.mark.parametrize("name", sorted(CONFIG_SCHEDULES))
def test_config_schedules_by_hand(name):
  steps_per_epoch, want = CONFIG_SCHEDULES[name]
  config = importlib.import_module(f"configs.{name}").get_config()
  schedule = optim.make_schedule(config, steps_per_epoch)
  steps = sorted(want)
  # float32 arithmetic: within two roundings of the peak rate of the by-hand values.
  peak = float(config.learning_rate)
  np.testing.assert_allclose([float(schedule(s)) for s in steps], [want[s] for s in steps],
                             rtol=1e-6, atol=1e-7 * peak)
  # Jitted on the int32 step count the state carries: the same numbers.
  jitted = jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32))
  np.testing.assert_allclose(jitted, [want[s] for s in steps], rtol=1e-6, atol=1e-7 * peak)


def test_step_decay_after_warmup_and_repeated_boundaries():
  # Warm-up over 4 steps, then 0.2 /10 at 6 and, mentioned twice, /100 at 8.
  config = tiny_config(schedule="step", learning_rate=0.2, warmup_epochs=2.0,
                       decay_steps=(6, 8, 8), num_train_steps=10)
  np.testing.assert_allclose(_lrs(config, 2, range(11)),
                             [0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.02, 0.02, 2e-4, 2e-4, 2e-4],
                             rtol=1e-6, atol=1e-8)
  # A boundary at the end of warm-up decays at once; one inside it is refused.
  config = tiny_config(schedule="step", learning_rate=0.2, warmup_epochs=2.0,
                       decay_steps=(4,))
  np.testing.assert_allclose(_lrs(config, 2, [3, 4]), [0.15, 0.02], rtol=1e-6)
  with pytest.raises(ValueError, match=r"decay boundaries \[3\] fall inside the 4 warm-up"):
    optim.make_schedule(tiny_config(schedule="step", warmup_epochs=2.0, decay_steps=(3,)), 2)


def test_cosine_without_warmup_and_warmup_past_the_end():
  config = tiny_config(schedule="cosine", learning_rate=0.4, num_train_steps=8)
  np.testing.assert_allclose(_lrs(config, 1, [0, 2, 4, 8, 9]),
                             [0.4, 0.2 * (1 + math.cos(math.pi / 4)), 0.2, 0.0, 0.0],
                             rtol=1e-6, atol=1e-8)
  # Warm-up longer than the run: linear all the way (the decay would start after it).
  config = tiny_config(schedule="cosine", learning_rate=0.4, warmup_epochs=10.0,
                       num_train_steps=5)
  np.testing.assert_allclose(_lrs(config, 1, [0, 4, 9, 10, 11]), [0.0, 0.16, 0.36, 0.4, 0.0],
                             rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------ eval step


def test_eval_step_sums_only_real_examples():
  logits = jnp.array([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0],   # label 1: top-1
                      [0.0, 5.0, 4.0, 3.0, 2.0, 1.0],   # label 2: top-5 only
                      [0.0, 5.0, 4.0, 3.0, 2.0, 1.0],   # label 0: rank 6, neither
                      [9.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # padding: label 0, masked out
  state = trainer.TrainState.create(apply_fn=lambda variables, x, train: x, params={},
                                    tx=optax.identity(), batch_stats={},
                                    rng=jax.random.PRNGKey(0))
  batch = {"image": logits, "label": jnp.array([1, 2, 0, 0]),
           "mask": jnp.array([1.0, 1.0, 1.0, 0.0])}
  sums = jax.device_get(trainer.eval_step(state, batch))
  lse = float(jax.nn.logsumexp(logits[0]))
  assert (sums["correct_top1"], sums["correct_top5"], sums["count"]) == (1.0, 2.0, 3.0)
  np.testing.assert_allclose(sums["loss_sum"], (lse - 5.0) + (lse - 4.0) + (lse - 0.0),
                             rtol=1e-6)


# -------------------------------------------------------------------------- config


@pytest.mark.parametrize("key, value, message", [
    ("optimizer", "rmsprop", "choose one of: sgd, adamw"),
    ("schedule", "linear", "choose one of: constant, step, cosine"),
    ("model", "resnet_nope", "Unknown model 'resnet_nope'"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("label_smoothing", 1.0, "label_smoothing must be in"),
])
def test_validate_config_names_the_fix(key, value, message):
  config = tiny_config()
  config[key] = value
  with pytest.raises(ValueError, match=message):
    trainer.validate_config(config)


def test_model_kwargs_are_checked_against_the_model_fields():
  fields = state_lib.model_fields(TINY)
  # The dataclass fields of the ResNet that the registry builds, less those the trainer
  # or Flax set.
  assert {"down", "widths", "zero_init_last", "attn", "dtype"} <= set(fields)
  assert not {"num_classes", "name", "parent"} & set(fields)
  assert list(fields) == sorted(fields)
  config = tiny_config()
  config.model_kwargs = ml_collections.ConfigDict({"dwon": "conv"})
  with pytest.raises(ValueError) as err:
    trainer.validate_config(config)
  assert str(err.value) == (
      f"Unknown model_kwargs key 'dwon' for model '{TINY}'. Did you mean \"down\"? Its keys "
      f"are: {', '.join(fields)} (--config.model_kwargs.KEY=VALUE).")
  # A field is accepted and reaches the model: down="pad" (option A) has no projection
  # parameters, "conv" (option B) a 1x1 convolution + batch norm at each widening.
  counts = {}
  for down in ("pad", "conv"):
    config.model_kwargs = ml_collections.ConfigDict({"down": down})
    trainer.validate_config(config)
    model = trainer.build_model(config, 10)
    assert model.down == down
    variables = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 8, 8, 1)), train=False))
    counts[down] = sum(x.size for x in jax.tree.leaves(variables["params"]))
  # Widths 4 -> 8 -> 16: 1x1 kernels 4*8 + 8*16 and BN scale + bias 2 * (8 + 16).
  assert counts["conv"] - counts["pad"] == 4 * 8 + 8 * 16 + 2 * (8 + 16)


def test_batch_must_divide_over_devices(monkeypatch):
  monkeypatch.setattr(trainer.jax, "device_count", lambda: 2)
  with pytest.raises(ValueError, match="batch_size=15 must divide evenly over the 2 devices"):
    trainer.validate_config(tiny_config(batch_size=15))


def test_missing_dataset_is_a_clear_error(tmp_path):
  config = tiny_config()
  config.data.name = "tfds"
  config.data.tfds_name = "cifar10"
  config.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="python -m train.prepare cifar10"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_half_precision_computes_in_bf16_with_float32_params():
  config = tiny_config(half_precision=True)
  model = trainer.build_model(config, 10)
  assert model.dtype == jnp.bfloat16
  # Abstract evaluation traces init and a full step (strict promotion on) without compiling.
  state = jax.eval_shape(lambda: trainer.create_train_state(
      config, model, jax.random.PRNGKey(0), (8, 8, 1)))
  batch = {"image": jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32),
           "label": jax.ShapeDtypeStruct((4,), jnp.int32)}
  # flax's BatchNorm itself promotes bf16 inputs with float32 (jnp.promote_types), which
  # the suite-wide strict promotion rejects; this one trace runs under standard rules.
  with jax.numpy_dtype_promotion("standard"):
    new_state, step_metrics = jax.eval_shape(trainer.train_step, state, batch,
                                             jax.random.PRNGKey(1))
  dtypes = {x.dtype for x in jax.tree.leaves((new_state.params, new_state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert step_metrics["loss"].dtype == jnp.float32


def test_uint8_batches_are_normalised_in_the_step():
  # The pipeline's uint8 pixels (normalize_on_device) and the host-normalised floats give
  # the same step: the state carries data.mean / data.std into the compiled function.
  config = tiny_config()
  config.data.channels, config.data.mean, config.data.std = 3, (0.2, 0.5, 0.7), (0.3, 0.2, 0.4)
  model = trainer.build_model(config, 10)
  state = trainer.create_train_state(config, model, jax.random.PRNGKey(0), (8, 8, 3))
  assert (state.image_mean, state.image_std) == ((0.2, 0.5, 0.7), (0.3, 0.2, 0.4))
  pixels = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  host = (pixels.astype(np.float32) / np.float32(255) - np.float32(config.data.mean)
          ) / np.float32(config.data.std)
  labels = np.arange(16, dtype=np.int32) % 10
  rng = jax.random.PRNGKey(1)
  train_step, eval_step = jax.jit(trainer.train_step), jax.jit(trainer.eval_step)
  steps = [train_step(state, {"image": images, "label": labels}, rng)
           for images in (pixels, host)]
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(steps[0][1][key], steps[1][1][key], rtol=1e-5)
  chex.assert_trees_all_close(steps[0][0].params, steps[1][0].params, rtol=1e-5, atol=1e-6)
  evals = [eval_step(state, {"image": images, "label": labels})
           for images in (pixels, host)]
  chex.assert_trees_all_close(evals[0], evals[1], rtol=1e-5)
  # Against a model that ignored the mean/std: the loss is not the same.
  raw = train_step(state, {"image": pixels.astype(np.float32) / 255, "label": labels},
                   rng)[1]["loss"]
  assert abs(float(raw) - float(steps[0][1]["loss"])) > 1e-4


# ----------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """6 steps + a baseline model, checkpoint and eval at step 3: each model traces once."""
  workdir = str(tmp_path_factory.mktemp("digits_run"))
  config = tiny_config(compare_with="test_resnet_tiny")
  traces = {"train_step": 0, "eval_step": 0}

  def counted(name):
    original = getattr(trainer, name)
    def step(*args):
      traces[name] += 1  # Python runs only while jax traces
      return original(*args)
    return step

  chex.clear_trace_counter()
  with pytest.MonkeyPatch.context() as patch:
    # Two models; chex fails the run as soon as a third trace happens.
    patch.setattr(trainer, "train_step", chex.assert_max_traces(counted("train_step"), n=2))
    patch.setattr(trainer, "eval_step", counted("eval_step"))
    results = trainer.train_and_evaluate(config, workdir)
  return config, workdir, results, traces


def test_each_model_compiles_its_steps_once(digits_run):
  # 6 train steps with a checkpoint and an evaluation between them, and 2 evaluations,
  # per model: one trace of each step function per model.
  assert digits_run[3] == {"train_step": 2, "eval_step": 2}


def test_results_json(digits_run):
  config, workdir, results, _ = digits_run
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["steps"] == 6 and saved["model"] == TINY
  assert saved["eval_examples"] == 360  # the digits test split
  assert 0.0 <= saved["test_accuracy"] <= saved["test_top5"] <= 1.0
  assert saved["images_per_second"] > 0 and math.isfinite(saved["test_loss"])
  assert saved["baseline"]["model"] == "test_resnet_tiny" and saved["baseline"]["steps"] == 6
  assert saved == json.loads(json.dumps(results))
  lines = metrics_lib.format_results(results).splitlines()
  assert lines[0].startswith("baseline test_resnet_tiny: test_accuracy=")
  assert lines[-1].startswith(f"test_accuracy={results['test_accuracy']:.4f} (model={TINY}")


def test_metrics_lines(digits_run):
  config, workdir, _, _ = digits_run
  rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  # Logged every 2 steps and before the checkpoint + eval at step 3.
  assert [r["step"] for r in train] == [2, 3, 4, 6]
  assert [r["step"] for r in evals] == [3, 6]
  schedule = optim.make_schedule(config, 1437 // config.batch_size)
  for r in train:  # The last step of each line (step s used schedule(s - 1)).
    np.testing.assert_allclose(r["learning_rate"], float(schedule(r["step"] - 1)), rtol=1e-6)
    assert math.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0
  assert evals[-1]["count"] == 360


def test_config_checkpoints_and_plot(digits_run):
  config, workdir, _, _ = digits_run
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"] == TINY
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2,
                               metadata={}).all_steps() == [3, 6]
  with open(os.path.join(workdir, "curves.png"), "rb") as f:
    png = f.read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert os.path.exists(os.path.join(workdir, "baseline", "results.json"))
  # The picture of each evaluation, drawn by the trainer through train.overlay.
  assert sorted(os.listdir(os.path.join(workdir, "attention"))) == ["step_3.png", "step_6.png"]


@pytest.mark.parametrize("step, want", [(1, (False, False)), (3, (True, False)),
                                        (4, (False, False)), (6, (True, True)),
                                        (12, (False, False))])
def test_due_saves_and_evaluates_on_their_steps_before_the_last(step, want):
  # Every 3rd step saves, every 6th evaluates; the last step's are finish()'s.
  config = tiny_config(checkpoint_every_steps=3, eval_every_steps=6)
  assert trainer.due(config, step, 12) == want
  # eval_every_steps=0: evaluations only at the end.
  assert trainer.due(tiny_config(eval_every_steps=0), step, 12) == (want[0], False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # Warm-up makes step 1 run at lr 0 (finite); step 2 at 5e29 blows the parameters up.
  config = tiny_config(learning_rate=1e30, warmup_epochs=0.02, checkpoint_every_steps=1,
                       log_every_steps=100, eval_every_steps=0, plot_curves=False)
  with pytest.raises(metrics_lib.NonFiniteLossError, match=r"at step 2 .*learning_rate"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert issubclass(metrics_lib.NonFiniteLossError, FloatingPointError)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=1, metadata={})
  assert ckpt.all_steps() == [1]
  _, state = ckpt_lib.load_state(str(tmp_path / "checkpoints"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert not os.path.exists(tmp_path / "results.json")


# ----------------------------------------------------------------- several devices


def cli_env(cache_dir, devices=None):
  """Environment of a `python -m train` subprocess; a shared XLA cache saves compiles."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


TINY_FLAGS = [f"--config.model={TINY}", "--config.data.image_size=8",
              "--config.batch_size=16", "--config.eval_batch_size=120",
              "--config.num_train_steps=4", "--config.log_every_steps=1",
              "--config.eval_every_steps=0", "--config.checkpoint_every_steps=100",
              "--config.progress_bar=False", "--config.plot_curves=False",
              # A constant schedule keeps the compiled step independent of the run length, so
              # the runs of test_trainer.py and test_checkpoint.py share the XLA cache.
              "--config.schedule=constant", "--config.learning_rate=0.05",
              "--config.warmup_epochs=0"]


def test_two_devices_match_one(tmp_path_factory):
  # Also with the augmentation made in the step, its batch (images, windows, flips)
  # sharded over the two devices: the digits' padded crops are exact on both paths.
  cache = tmp_path_factory.getbasetemp() / "jax_cache"
  runs = {}
  for devices, on_device in ((1, False), (2, False), (2, True)):
    workdir = tmp_path_factory.mktemp(f"devices{devices}")
    flags = [*TINY_FLAGS, f"--config.data.augment_on_device={on_device}",
             "--config.data.augment.flip=True"]
    runs[devices, on_device] = (workdir, subprocess.Popen(
        [sys.executable, "-m", "train", f"--workdir={workdir}", *flags], cwd=ROOT,
        env=cli_env(cache, devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True))
  losses = {}
  for (devices, on_device), (workdir, proc) in runs.items():
    out, err = proc.communicate(timeout=540)
    assert proc.returncode == 0, err[-3000:]
    with open(workdir / "results.json") as f:
      assert json.load(f)["devices"] == devices
    rows = metrics_lib.read_metrics(str(workdir / "metrics.jsonl"))
    losses[devices, on_device] = [(r["step"], r["loss"], r["grad_norm"]) for r in rows
                                  if r["split"] == "train"]
  one = np.array(losses[1, False])
  assert one[:, 0].tolist() == [1, 2, 3, 4]
  np.testing.assert_allclose(np.array(losses[2, False]), one, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.array(losses[2, True]), one, rtol=1e-5, atol=1e-6)


def test_cpu_steps_compile_with_the_ops_compiler_options(monkeypatch):
  # compile_steps hands attention_flax.ops.compiler_options("cpu") to jax.jit (here a
  # value XLA rejects, to see that they arrive); {} compiles with XLA's defaults.
  config = tiny_config()
  model = trainer.build_model(config, 10)
  state = trainer.create_train_state(config, model, jax.random.PRNGKey(0), (8, 8, 1))
  batch = {"image": np.zeros((16, 8, 8, 1), np.float32), "label": np.zeros(16, np.int32)}
  mesh = trainer.make_mesh()
  bogus = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NONE"}
  asked = []
  monkeypatch.setattr(trainer.ops, "compiler_options",
                      lambda backend=None: asked.append(backend) or dict(bogus))
  train_fn, eval_fn = trainer.compile_steps(mesh)
  with pytest.raises(jax.errors.JaxRuntimeError, match="ynn_fusion_type"):
    train_fn.lower(state, batch, jax.random.PRNGKey(1)).compile()
  with pytest.raises(jax.errors.JaxRuntimeError, match="ynn_fusion_type"):
    eval_fn.lower(state, batch).compile()
  assert asked == ["cpu"]  # the mesh's platform
  monkeypatch.undo()
  # The real options and XLA's defaults take the same step, up to float rounding.
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((16, 8, 8, 1)).astype(np.float32),
           "label": np.arange(16, dtype=np.int32) % 10}
  # Each step gets its own copy of the state, which it donates.
  steps = [trainer.compile_steps(mesh, options)[0](jax.tree.map(jnp.copy, state), batch,
                                                   jax.random.PRNGKey(1))
           for options in (trainer.ops.compiler_options("cpu"), {})]
  assert np.isfinite(float(steps[1][1]["loss"]))
  np.testing.assert_allclose(steps[0][1]["loss"], steps[1][1]["loss"], rtol=1e-5)
  chex.assert_trees_all_close(steps[0][0].params, steps[1][0].params, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------- import graph


def _train_imports(path):
  """The train.* modules ``path`` imports, at the top or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("train.")}
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "train":
        found |= {f"train.{a.name}" for a in node.names}
      elif node.module.startswith("train."):
        found.add(node.module)
  return found


def _reachable(graph, start):
  seen, todo = set(), [start]
  while todo:
    for name in graph.get(todo.pop(), ()):
      if name not in seen:
        seen.add(name)
        todo.append(name)
  return seen


def test_trainer_never_imports_visualize():
  graph = {f"train.{os.path.splitext(os.path.basename(p))[0]}": _train_imports(p)
           for p in glob.glob(os.path.join(ROOT, "train", "*.py"))}
  assert "train.visualize" not in _reachable(graph, "train.trainer")
  # visualize builds on the trainer's side (the model from a config, the eval overlay)...
  assert {"train.state", "train.overlay"} <= graph["train.visualize"]
  # ...and nothing the trainer or visualize reaches imports in a circle.
  for name in ("train.trainer", "train.visualize", "train.__main__"):
    for module in _reachable(graph, name) | {name}:
      assert module not in _reachable(graph, module), f"{module} imports itself"
  # The same at run time, in a fresh interpreter.
  code = ("import json, sys, train.trainer, train.overlay; "
          "print(json.dumps(sorted(m for m in sys.modules if m.startswith('train.'))))")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  loaded = json.loads(done.stdout.strip().splitlines()[-1])
  assert "train.trainer" in loaded and "train.visualize" not in loaded, done.stderr[-2000:]
