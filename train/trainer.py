"""The training loop: state, optimiser, schedules, sharded jitted steps, train_and_evaluate.

Data parallel over every device of every process: a 1-D ``Mesh`` over a "data" axis,
batches sharded along it (``NamedSharding(mesh, P("data"))``) and the state replicated
(``P()``). Under ``jax.jit`` with those shardings XLA reduces gradients and batch-norm
statistics over the global batch, so N devices compute what one device would, up to the
order of summation. Each process feeds its own slice of the global batch
(``jax.make_array_from_process_local_data``); several hosts first join through
``jax.distributed.initialize`` (``python -m train`` does it; see train/__main__.py).

``train_step(state, batch, rng)`` is a pure function, jitted once with the state donated;
the rng is folded with the step so a resumed run draws the same numbers. Per-step metrics
stay on the device until a log point (see ``train.metrics``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from attention_flax import conv
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import device_augment
from train.device_augment import normalize_images  # noqa: F401  (importable from here too)
from train import metrics as metrics_lib

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine")


class TrainState(train_state.TrainState):
  """step, params, opt_state (from flax) plus batch-norm statistics and the run's key.

  ``schedule`` (step -> learning rate), ``label_smoothing``, the per-channel
  ``image_mean`` / ``image_std`` that uint8 batches are normalised with
  (:func:`normalize_images`) and ``image_size``, the side that device-augmented batches
  are resized to (:func:`input_images`), are static: part of the compiled step, not of
  the checkpoint.
  """
  batch_stats: Any
  rng: jax.Array
  schedule: Callable[[Any], Any] = struct.field(pytree_node=False, default=None)
  label_smoothing: float = struct.field(pytree_node=False, default=0.0)
  image_mean: tuple[float, ...] = struct.field(pytree_node=False, default=(0.0,))
  image_std: tuple[float, ...] = struct.field(pytree_node=False, default=(1.0,))
  image_size: int = struct.field(pytree_node=False, default=0)


def input_images(state: TrainState, batch: dict[str, jax.Array]) -> jax.Array:
  """The model's input from a batch and the state's image_size, image_mean and image_std
  (``train.device_augment.model_input``)."""
  return device_augment.model_input(batch, state.image_size, state.image_mean,
                                    state.image_std)


def state_to_tree(state: TrainState) -> dict[str, Any]:
  """The arrays of ``state`` that a checkpoint holds."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state, "rng": state.rng}


def _choice_error(kind: str, value: Any, choices: tuple[str, ...]) -> ValueError:
  return ValueError(f"Unknown {kind} {value!r}; choose one of: {', '.join(choices)} "
                    f"(--config.{kind}=...).")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the values the trainer reads, before any data is loaded or anything compiled.

  Raises:
    ValueError: an unknown model (the registry's message), optimizer or schedule, or a
      value out of range; each message names the key to change.
  """
  from attention_flax import models  # The registry's own error names close matches.
  models.model_info(config.model)
  if config.compare_with:
    models.model_info(config.compare_with)
  if config.optimizer not in OPTIMIZERS:
    raise _choice_error("optimizer", config.optimizer, OPTIMIZERS)
  if config.schedule not in SCHEDULES:
    raise _choice_error("schedule", config.schedule, SCHEDULES)
  for key in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints"):
    if int(config[key]) < 1:
      raise ValueError(f"config.{key} must be >= 1; got {config[key]}.")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("Set config.num_train_steps > 0 or config.num_epochs > 0.")
  for key in ("eval_every_steps", "grad_clip_norm", "weight_decay", "mock_data"):
    if config[key] < 0:
      raise ValueError(f"config.{key} must be >= 0; got {config[key]}.")
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ValueError(f"config.label_smoothing must be in [0, 1); got {config.label_smoothing}.")
  if config.nesterov and config.optimizer == "sgd" and config.momentum <= 0:
    raise ValueError("config.nesterov needs config.momentum > 0.")
  devices = jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % devices:
      raise ValueError(
          f"config.{key}={config[key]} must divide evenly over the {devices} devices "
          f"(each takes an equal slice); use a multiple of {devices}.")


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """config.num_train_steps when > 0, else num_epochs worth of steps."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int
                  ) -> Callable[[Any], jax.Array]:
  """Step -> learning rate: constant, step decay or cosine, after an optional linear warm-up.

  Step decay multiplies by ``decay_factor`` at each boundary (``decay_steps``, else
  ``decay_epochs`` * steps_per_epoch): the update of step b, counted from 0, is the first
  at the decayed rate, as PyTorch's MultiStepLR. Cosine falls from the peak at the end
  of warm-up to 0 at the last step. Warm-up scales linearly from 0 at step 0.
  """
  base = float(config.learning_rate)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  total = total_steps(config, steps_per_epoch)
  boundaries = tuple(config.decay_steps) or tuple(
      int(round(e * steps_per_epoch)) for e in config.decay_epochs)
  kind, factor = config.schedule, float(config.decay_factor)
  if kind not in SCHEDULES:
    raise _choice_error("schedule", kind, SCHEDULES)

  def schedule(step):
    step = jnp.asarray(step).astype(jnp.float32)
    if kind == "step":
      passed = sum((step >= b).astype(jnp.float32) for b in boundaries) if boundaries else 0.0
      lr = base * jnp.power(jnp.float32(factor), passed)
    elif kind == "cosine":
      progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
      lr = base * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      lr = jnp.full((), base, jnp.float32)
    if warmup > 0:
      lr = lr * jnp.minimum(1.0, step / warmup)
    return lr

  return schedule


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: kernels (ndim > 1), not biases or norm params."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _standard_promotion(update: Callable) -> Callable:
  """Runs an optax update under standard dtype promotion: Adam's bias correction raises a
  float to the int32 step count, which ``jax_numpy_dtype_promotion="strict"`` rejects."""
  def wrapped(updates, state, params=None):
    with jax.numpy_dtype_promotion("standard"):
      return update(updates, state, params)
  return wrapped


def make_optimizer(config: ml_collections.ConfigDict, schedule: Callable
                   ) -> optax.GradientTransformation:
  """Global-norm clipping (optional), then SGD with L2 weight decay or AdamW.

  SGD adds ``weight_decay * w`` to the gradient before momentum, as PyTorch's SGD; AdamW
  decays decoupled from the gradient statistics. Biases and norm parameters never decay.
  """
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "sgd":
    if config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                           nesterov=bool(config.nesterov)))
  elif config.optimizer == "adamw":
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2,
                        weight_decay=config.weight_decay, mask=decay_mask)
    parts.append(optax.GradientTransformation(adamw.init, _standard_promotion(adamw.update)))
  else:
    raise _choice_error("optimizer", config.optimizer, OPTIMIZERS)
  return optax.chain(*parts)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example softmax cross-entropy of (N, K) logits and (N,) integer labels.

  With smoothing a, the target is (1 - a) * one_hot + a / K.
  """
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def create_train_state(config: ml_collections.ConfigDict, model: Any, rng: jax.Array,
                       input_shape: tuple[int, int, int], *, steps_per_epoch: int = 1,
                       mesh: Mesh | None = None) -> TrainState:
  """Initialises ``model`` on zeros of (1, H, W, C) = (1, *input_shape), replicated on the mesh."""
  schedule = make_schedule(config, steps_per_epoch)
  tx = make_optimizer(config, schedule)
  init_rng, state_rng = jax.random.split(rng)
  # Initialisers draw from an "rbg" key derived from rng: XLA compiles its bit generator
  # several times faster than threefry's, which dominated start-up on CPUs.
  init_key = jax.random.wrap_key_data(jnp.tile(jax.random.key_data(init_rng), 2), impl="rbg")

  spec = data_lib.parse_data_config(config.data)

  def init(key):
    images = jnp.zeros((1, *input_shape), jnp.float32)
    variables = model.init({"params": key, "dropout": key}, images, train=False)
    state = TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx,
        batch_stats=variables.get("batch_stats", {}), rng=state_rng, schedule=schedule,
        label_smoothing=float(config.label_smoothing), image_mean=spec.mean,
        image_std=spec.std, image_size=int(input_shape[0]))
    # An explicit int32 step: a weakly typed one would recompile after a restore.
    return state.replace(step=jnp.zeros((), jnp.int32))

  mesh = mesh or make_mesh()
  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(init_key)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on a (global) batch {"image": (N, H, W, C), "label": (N,)}; uint8 images
  are normalised first with the state's image_mean / image_std, and a device-augmented
  batch is augmented first (:func:`input_images`).

  Returns the new state and scalar metrics: loss, accuracy, learning_rate, grad_norm,
  param_norm and "finite" (false once loss, gradients or parameters overflow).
  """
  rng = jax.random.fold_in(rng, state.step)
  images = input_images(state, batch)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        rngs={"dropout": rng}, mutable=["batch_stats"])
    logits = logits.astype(jnp.float32)
    loss = cross_entropy(logits, batch["label"], state.label_smoothing).mean()
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads,
                                    batch_stats=updates.get("batch_stats", state.batch_stats))
  grad_norm = optax.tree.norm(grads)
  param_norm = optax.tree.norm(new_state.params)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)),
      "learning_rate": jnp.asarray(state.schedule(state.step), jnp.float32),
      "grad_norm": grad_norm,
      "param_norm": param_norm,
      "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm),
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums over the real examples of a batch (``batch["mask"]`` = 1; padding = 0).

  Returns {"correct_top1", "correct_top5", "loss_sum", "count"}; top-5 is top-k with
  k = min(5, classes). The loss has no label smoothing. Images are prepared as in
  :func:`train_step`.
  """
  images = input_images(state, batch)
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          images, train=False).astype(jnp.float32)
  labels = batch["label"]
  mask = batch.get("mask")
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  _, topk = jax.lax.top_k(logits, min(5, logits.shape[-1]))
  top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
  return {"correct_top1": jnp.sum(top1 * mask), "correct_top5": jnp.sum(top5 * mask),
          "loss_sum": jnp.sum(cross_entropy(logits, labels) * mask), "count": jnp.sum(mask)}


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes), axis "data"."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def compile_steps(mesh: Mesh, compiler_options: dict[str, Any] | None = None
                  ) -> tuple[Callable, Callable]:
  """``train_step`` and ``eval_step`` jitted for the mesh: batch sharded, state replicated.

  ``compiler_options`` go to ``jax.jit``; by default ``conv.cpu_compiler_options()`` on a
  CPU mesh (XLA's own convolution kernels, see ``attention_flax.conv``) and none
  elsewhere; pass ``{}`` for XLA's defaults.
  """
  if compiler_options is None:
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    compiler_options = conv.cpu_compiler_options() if on_cpu else {}
  options = dict(compiler_options) or None
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  train_fn = jax.jit(train_step, in_shardings=(replicated, sharded, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=(0,),
                     compiler_options=options)
  eval_fn = jax.jit(eval_step, in_shardings=(replicated, sharded), out_shardings=replicated,
                    compiler_options=options)
  return train_fn, eval_fn


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a global batch -> global arrays sharded over "data"."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
  """``create_model(config.model)`` with config.model_kwargs; bf16 compute if half_precision."""
  from attention_flax import models
  overrides = config.model_kwargs.to_dict()
  if config.half_precision:
    overrides.setdefault("dtype", jnp.bfloat16)
  return models.create_model(config.model, num_classes=num_classes, **overrides)


def evaluate(eval_fn: Callable, state: TrainState, config: ml_collections.ConfigDict,
             mesh: Mesh) -> dict[str, float]:
  """Top-1, top-5 and loss over one pass of the eval split (padding excluded by the mask)."""
  totals, count = None, jax.process_count()
  keep_uint8 = data_lib.parse_data_config(config.data).normalize_on_device
  for batch in data_lib.eval_batches(config.data, batch_size=config.eval_batch_size // count,
                                     process_index=jax.process_index(), process_count=count,
                                     keep_uint8=keep_uint8):
    sums = eval_fn(state, shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f"The eval split {config.data.eval_split!r} yielded no batches.")
  totals = jax.device_get(totals)
  n = max(float(totals["count"]), 1.0)
  return {"accuracy": float(totals["correct_top1"]) / n, "top5": float(totals["correct_top5"]) / n,
          "loss": float(totals["loss_sum"]) / n, "count": int(totals["count"])}


def _write_attention_png(model, state: TrainState, config: ml_collections.ConfigDict,
                         workdir: str, step: int) -> str:
  """Draws what the model attends to on the first eval images: workdir/attention/step_N.png."""
  from train import visualize  # matplotlib is imported only when pictures are asked for.
  images = next(iter(data_lib.eval_batches(config.data, batch_size=config.eval_batch_size,
                                           augment_on_device=False)))
  variables = {"params": jax.device_get(state.params),
               "batch_stats": jax.device_get(state.batch_stats)}
  path = os.path.join(workdir, "attention", f"step_{step}.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return visualize.write_eval_overlay(model, variables, images["image"][:6], path)


def _train_one(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config.model into ``workdir`` (resuming its checkpoint), then evaluates it."""
  wall_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  info = data_lib.get_info(config.data)
  model = build_model(config, info.num_classes)
  mesh = make_mesh()
  primary, processes = jax.process_index() == 0, jax.process_count()
  steps_per_epoch = max(1, info.num_train // config.batch_size)
  last_step = total_steps(config, steps_per_epoch)
  ckpt = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
      metadata=ckpt_lib.run_metadata(config, info.num_classes, info.image_shape))
  resume = ckpt.verify_latest() is not None  # A foreign checkpoint fails before compiling.
  state = create_train_state(config, model, jax.random.PRNGKey(config.seed),
                             tuple(info.image_shape), steps_per_epoch=steps_per_epoch,
                             mesh=mesh)
  # uint8 sources stay uint8 up to the device (normalize_on_device): a quarter of the bytes.
  batches = iter(data_lib.train_dataset(
      config.data, batch_size=config.batch_size // processes, seed=config.seed,
      process_index=jax.process_index(), process_count=processes,
      keep_uint8=data_lib.parse_data_config(config.data).normalize_on_device))
  if resume:
    state = state.replace(**ckpt.restore(state_to_tree(state), batches))
  start = int(state.step)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  writer = metrics_lib.MetricWriter(workdir, enabled=primary, resume_step=start)
  progress = metrics_lib.Progress(last_step, start, enabled=config.progress_bar and primary,
                                  desc=config.model)
  train_fn, eval_fn = compile_steps(mesh)
  # A buffer of its own: the state's copy is donated at every step.
  rng = jax.device_put(jax.device_get(state.rng), NamedSharding(mesh, P()))
  throughput, pending, step = metrics_lib.Throughput(config.batch_size), [], start
  try:
    while step < last_step:
      state, step_metrics = train_fn(state, shard_batch(next(batches), mesh), rng)
      step += 1
      pending.append(step_metrics)
      progress.update()
      if step == start + 1:  # The first step compiles: time the steps after it.
        jax.block_until_ready(step_metrics)
        throughput.resume()
      else:
        throughput.count()
      save = step % config.checkpoint_every_steps == 0 and step < last_step
      run_eval = bool(config.eval_every_steps) and step % config.eval_every_steps == 0
      run_eval = run_eval and step < last_step
      if pending and (step % config.log_every_steps == 0 or save or run_eval
                      or step == last_step):
        # Fetching the metrics checks them, so no non-finite state is ever saved.
        summary = metrics_lib.summarize(pending, step - len(pending))
        summary["images_per_second"] = throughput.rate()
        writer.write(step, "train", summary)
        progress.show(step, summary)
        pending = []
      if save or run_eval:
        throughput.pause()
        if save:
          ckpt.save(step, state_to_tree(state), batches)
        if run_eval:
          writer.write(step, "eval", evaluate(eval_fn, state, config, mesh))
          if config.attention_png and primary:
            _write_attention_png(model, state, config, workdir, step)
        throughput.resume()
    throughput.pause()
    if ckpt.latest_step() != step:
      ckpt.save(step, state_to_tree(state), batches)
    final = evaluate(eval_fn, state, config, mesh)
    writer.write(step, "eval", final)
    if config.attention_png and primary:
      _write_attention_png(model, state, config, workdir, step)
  finally:
    progress.close()
    writer.close()
    ckpt.close()  # Finishes the last good save even when a non-finite loss stopped the run.
    batches.close()  # Stops the input pipeline's threads and worker processes now.
  results = {
      "model": config.model, "test_accuracy": final["accuracy"], "test_top5": final["top5"],
      "test_loss": final["loss"], "eval_examples": final["count"], "steps": int(step),
      "resumed_from_step": start, "images_per_second": throughput.rate(),
      "train_seconds": throughput.seconds, "wall_seconds": time.time() - wall_start,
      "num_params": int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
      "devices": jax.device_count(), "processes": processes,
  }
  if primary:
    metrics_lib.write_json(os.path.join(workdir, "results.json"), results)
    if config.plot_curves:
      metrics_lib.plot_curves(workdir)
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, checkpoints and evaluates ``config`` in ``workdir``; returns the results dict.

  With ``config.compare_with`` the named baseline is trained afterwards with the same
  settings in ``workdir/baseline`` and its results are added under "baseline".
  Re-running on a workdir with a checkpoint resumes it.
  """
  validate_config(config)
  mock = contextlib.nullcontext()
  if config.mock_data > 0:  # Smoke runs: random examples instead of a prepared dataset.
    import tensorflow_datasets as tfds
    mock = tfds.testing.mock_data(num_examples=config.mock_data)
  with mock:
    results = _train_one(config, workdir)
    if config.compare_with:
      baseline = config.copy_and_resolve_references()
      with baseline.unlocked():
        baseline.model, baseline.compare_with = config.compare_with, ""
        baseline.model_kwargs = ml_collections.ConfigDict()
      results["baseline"] = _train_one(baseline, os.path.join(workdir, "baseline"))
      if jax.process_index() == 0:
        metrics_lib.write_json(os.path.join(workdir, "results.json"), results)
  return results
