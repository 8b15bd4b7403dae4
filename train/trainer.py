"""The training loop: sharded jitted steps and ``train_and_evaluate`` in named phases.

Data parallel over every device of every process: a 1-D ``Mesh`` over a "data" axis,
batches sharded along it (``NamedSharding(mesh, P("data"))``) and the state replicated
(``P()``). Under ``jax.jit`` with those shardings XLA reduces gradients and batch-norm
statistics over the global batch, so N devices compute what one device would, up to the
order of summation. Each process feeds its own slice of the global batch
(``jax.make_array_from_process_local_data``); several hosts first join through
``jax.distributed.initialize`` (``python -m train`` does it; see train/__main__.py).

``train_step(state, batch, rng)`` is a pure function, jitted once with the state donated;
the rng is folded with the step so a resumed run draws the same numbers. Per-step metrics
stay on the device until a log point (see ``train.metrics``). A run goes through
:func:`setup`, :func:`train_loop`, :func:`finish` and :func:`report`. The step functions
are in ``train.steps``, schedules and the optimiser in ``train.optim``, the state and the
model in ``train.state``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from attention_flax import ops
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import metrics as metrics_lib
from train import optim
from train import workdir as workdir_lib
from train.errors import UserError
from train.compare import compared_dir, parse_compare_with  # noqa: F401 (re-exported)
# Importable from here too: the steps, the model and the state the trainer is built on.
from train.device_augment import normalize_images  # noqa: F401
from train.state import TrainState, build_model, check_model_kwargs, state_to_tree
from train.steps import cross_entropy, eval_step, input_images, train_step  # noqa: F401


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the values the trainer reads, before any data is loaded or anything compiled.

  Raises:
    ValueError: an unknown model (the registry's message), model_kwargs key, optimizer or
      schedule, or a value out of range; each message names the key to change.
  """
  from attention_flax import models  # The registry's own error names close matches.
  models.model_info(config.model)
  check_model_kwargs(config.model, config.model_kwargs.keys())
  for _, name, kwargs in parse_compare_with(config.compare_with):
    models.model_info(name)
    check_model_kwargs(name, kwargs.keys())
  if config.optimizer not in optim.OPTIMIZERS:
    raise optim.choice_error("optimizer", config.optimizer, optim.OPTIMIZERS)
  if config.schedule not in optim.SCHEDULES:
    raise optim.choice_error("schedule", config.schedule, optim.SCHEDULES)
  if config.get("weight_decay_on", "kernels") not in optim.DECAY_ON:
    raise optim.choice_error("weight_decay_on", config.weight_decay_on, optim.DECAY_ON)
  for key in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints"):
    if int(config[key]) < 1:
      raise ValueError(f"config.{key} must be >= 1; got {config[key]}.")
  for key in ("num_train_steps", "num_epochs", "warmup_epochs", "momentum"):
    if not config[key] >= 0:  # NaN fails too
      raise UserError(f"config.{key} must be >= 0; got {config[key]}"
                      + (" (0 trains for config.num_epochs)." if key == "num_train_steps"
                         else "."))
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("Set config.num_train_steps > 0 or config.num_epochs > 0.")
  if not config.learning_rate > 0:
    raise UserError(f"config.learning_rate must be > 0; got {config.learning_rate} (a "
                    "negative rate climbs the loss instead of descending it).")
  for key in ("decay_epochs", "decay_steps"):
    if any(not v >= 0 for v in config.get(key, ())):
      raise UserError(f"config.{key} must hold values >= 0; got {tuple(config[key])}.")
  if not config.get("decay_factor", 1.0) > 0:
    raise UserError(f"config.decay_factor must be > 0; got {config.decay_factor}.")
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


def create_train_state(config: ml_collections.ConfigDict, model: Any, rng: jax.Array,
                       input_shape: tuple[int, int, int], *, steps_per_epoch: int = 1,
                       mesh: Mesh | None = None) -> TrainState:
  """Initialises ``model`` on zeros of (1, H, W, C) = (1, *input_shape), replicated on the mesh."""
  schedule = optim.make_schedule(config, steps_per_epoch)
  tx = optim.make_optimizer(config, schedule)
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


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over ``devices``, axis "data". By default all devices of all processes,
  process 0's first: process p's devices then hold rows [p * B, (p + 1) * B) of a global
  batch, the rows ``train.data`` gives process p (B per process)."""
  if devices is None:  # a stable sort: each process's devices keep JAX's order
    devices = sorted(jax.devices(), key=lambda device: device.process_index)
  return Mesh(np.asarray(devices), ("data",))


def compile_steps(mesh: Mesh, compiler_options: dict[str, Any] | None = None
                  ) -> tuple[Callable, Callable]:
  """``train_step`` and ``eval_step`` jitted for the mesh: batch sharded, state replicated.

  ``compiler_options`` go to ``jax.jit``; by default ``attention_flax.ops.compiler_options``
  of the mesh's platform (on CPU, options that keep convolutions with XLA's own kernels;
  none elsewhere); pass ``{}`` for XLA's defaults.
  """
  if compiler_options is None:
    platforms = {d.platform for d in mesh.devices.flat}
    compiler_options = ops.compiler_options(platforms.pop()) if len(platforms) == 1 else {}
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


# ------------------------------------------------------------------ the phases of a run


@dataclasses.dataclass
class Run:
  """What the phases of one training run share: set up once, closed by :func:`close`."""
  config: ml_collections.ConfigDict
  workdir: str
  model: Any
  mesh: Mesh
  primary: bool  # process 0: writes the files
  start: int  # the step resumed from (0 for a fresh run)
  last_step: int
  batches: Iterator[dict[str, np.ndarray]]
  ckpt: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricWriter
  progress: metrics_lib.Progress
  throughput: metrics_lib.Throughput
  train_fn: Callable
  eval_fn: Callable
  wall_start: float
  lock: workdir_lib.WorkdirLock | None = None  # this run's hold on the workdir


def due(config: ml_collections.ConfigDict, step: int, last_step: int) -> tuple[bool, bool]:
  """(save, evaluate): whether ``step`` ends with a checkpoint and an evaluation. The last
  step's are :func:`finish`'s."""
  if step >= last_step:
    return False, False
  evaluate_now = bool(config.eval_every_steps) and step % config.eval_every_steps == 0
  return step % config.checkpoint_every_steps == 0, evaluate_now


def setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[Run, TrainState]:
  """Locks ``workdir`` (``train.workdir.WorkdirLock``; released by :func:`close`), then
  builds the model, mesh, state (resumed from ``workdir``'s checkpoint when it has one),
  input pipeline, writers and compiled steps; writes workdir/config.json.

  Raises:
    UserError: another run holds the workdir, or it is a file or cannot be written.
  """
  lock = workdir_lib.WorkdirLock(workdir, jax.process_index()).acquire()
  try:
    run, state = _build_run(config, workdir)
  except BaseException:
    lock.release()
    raise
  run.lock = lock
  return run, state


def _build_run(config: ml_collections.ConfigDict, workdir: str) -> tuple[Run, TrainState]:
  """:func:`setup` once the workdir is locked."""
  wall_start = time.time()
  info = data_lib.get_info(config.data)
  model = build_model(config, info.num_classes)
  mesh = make_mesh()
  primary, processes = jax.process_index() == 0, jax.process_count()
  steps_per_epoch = max(1, info.num_train // config.batch_size)
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
  start, last_step = int(state.step), optim.total_steps(config, steps_per_epoch)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  train_fn, eval_fn = compile_steps(mesh)
  run = Run(
      config=config, workdir=workdir, model=model, mesh=mesh, primary=primary, start=start,
      last_step=last_step, batches=batches, ckpt=ckpt,
      writer=metrics_lib.MetricWriter(workdir, enabled=primary, resume_step=start),
      progress=metrics_lib.Progress(last_step, start, desc=config.model,
                                    enabled=config.progress_bar and primary),
      throughput=metrics_lib.Throughput(config.batch_size), train_fn=train_fn,
      eval_fn=eval_fn, wall_start=wall_start)
  return run, state


def train_loop(run: Run, state: TrainState) -> tuple[TrainState, int]:
  """Steps from ``run.start`` to ``run.last_step``, logging, saving and evaluating on the
  way; returns the state and its step."""
  config, pending, step = run.config, [], run.start
  # A buffer of its own: the state's copy is donated at every step.
  rng = jax.device_put(jax.device_get(state.rng), NamedSharding(run.mesh, P()))
  while step < run.last_step:
    state, step_metrics = run.train_fn(state, shard_batch(next(run.batches), run.mesh), rng)
    step += 1
    pending.append(step_metrics)
    run.progress.update()
    if step == run.start + 1:  # The first step compiles: time the steps after it.
      jax.block_until_ready(step_metrics)
      run.throughput.resume()
    else:
      run.throughput.count()
    save, evaluate_now = due(config, step, run.last_step)
    if step % config.log_every_steps == 0 or save or evaluate_now or step == run.last_step:
      log_train(run, step, pending)
      pending = []
    if save or evaluate_now:
      run.throughput.pause()
      if save:
        run.ckpt.save(step, state_to_tree(state), run.batches)
      if evaluate_now:
        evaluate_and_draw(run, state, step)
      run.throughput.resume()
  run.throughput.pause()
  return state, step


def log_train(run: Run, step: int, pending: list[dict[str, jax.Array]]) -> None:
  """Writes one train line: the means of the steps in ``pending`` (ending at ``step``).
  Fetching the metrics checks them, so no non-finite state is ever saved."""
  summary = metrics_lib.summarize(pending, step - len(pending))
  summary["images_per_second"] = run.throughput.rate()
  run.writer.write(step, "train", summary)
  run.progress.show(step, summary)


def evaluate_and_draw(run: Run, state: TrainState, step: int) -> dict[str, float]:
  """Evaluates, writes the eval line and, with config.attention_png, the picture
  workdir/attention/step_N.png; returns the evaluation."""
  result = evaluate(run.eval_fn, state, run.config, run.mesh)
  run.writer.write(step, "eval", result)
  if run.config.attention_png and run.primary:
    from train import overlay  # matplotlib is imported only when pictures are asked for.
    overlay.write_attention_png(run.model, state, run.config, run.workdir, step)
  return result


def finish(run: Run, state: TrainState, step: int) -> dict[str, float]:
  """Saves the last step (unless saved already) and evaluates it; returns the evaluation."""
  if run.ckpt.latest_step() != step:
    run.ckpt.save(step, state_to_tree(state), run.batches)
  return evaluate_and_draw(run, state, step)


def close(run: Run) -> None:
  """Closes the writers, the checkpointer and the input pipeline; unlocks the workdir."""
  try:
    run.progress.close()
    run.writer.close()
    run.ckpt.close()  # Finishes the last good save even when a non-finite loss stopped it.
    run.batches.close()  # Stops the input pipeline's threads and worker processes now.
  finally:
    if run.lock is not None:
      run.lock.release()


def report(run: Run, state: TrainState, step: int, final: dict[str, float]) -> dict[str, Any]:
  """The results dict; process 0 writes it to workdir/results.json and draws the curves."""
  results = {
      "model": run.config.model, "test_accuracy": final["accuracy"],
      "test_top5": final["top5"], "test_loss": final["loss"], "eval_examples": final["count"],
      "steps": int(step), "resumed_from_step": run.start,
      "images_per_second": run.throughput.rate(), "train_seconds": run.throughput.seconds,
      "wall_seconds": time.time() - run.wall_start,
      "num_params": int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
      "devices": jax.device_count(), "processes": jax.process_count(),
  }
  bad_files = data_lib.bad_files(run.config.data)  # image folders: files left out
  if bad_files is not None:
    results["bad_files"] = bad_files
  if run.primary:
    metrics_lib.write_json(os.path.join(run.workdir, "results.json"), results)
    if run.config.plot_curves:
      metrics_lib.plot_curves(run.workdir)
  return results


def train_one(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config.model into ``workdir`` (resuming its checkpoint), then evaluates it."""
  run, state = setup(config, workdir)
  try:
    state, step = train_loop(run, state)
    final = finish(run, state, step)
  finally:
    close(run)
  return report(run, state, step, final)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, checkpoints and evaluates ``config`` in ``workdir``; returns the results dict.

  Each entry of ``config.compare_with`` (:func:`parse_compare_with`) is trained afterwards
  with the same settings and its own model_kwargs, in ``workdir/baseline`` when there is
  one entry, else in ``workdir/compared/<entry>`` (:func:`compared_dir`); results["compared"]
  maps each entry to its results and results["baseline"] holds the first entry's.
  Re-running on a workdir with a checkpoint resumes it.
  """
  validate_config(config)
  mock = contextlib.nullcontext()
  if config.mock_data > 0:  # Smoke runs: random examples instead of a prepared dataset.
    import tensorflow_datasets as tfds
    mock = tfds.testing.mock_data(num_examples=config.mock_data)
  with mock:
    results = train_one(config, workdir)
    entries = parse_compare_with(config.compare_with)
    for entry, name, kwargs in entries:
      other = config.copy_and_resolve_references()
      with other.unlocked():
        other.model, other.compare_with = name, ""
        other.model_kwargs = ml_collections.ConfigDict(kwargs)
      result = train_one(other, compared_dir(workdir, entry, len(entries) > 1))
      results.setdefault("baseline", result)
      results.setdefault("compared", {})[entry] = result
    if entries and jax.process_index() == 0:
      metrics_lib.write_json(os.path.join(workdir, "results.json"), results)
  return results
