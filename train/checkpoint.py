"""Checkpoints of a training run: orbax steps holding state, data position and metadata.

Each step directory under ``workdir/checkpoints`` holds three items:
  state: params, batch_stats, opt_state, step and rng (an orbax ``StandardSave`` pytree);
  data:  the grain iterator position, one JSON file per process (grain's own handler), so a
         resumed run sees exactly the batches an uninterrupted run would have seen;
  meta:  JSON naming the model, num_classes, image_shape and fingerprints of the
         architecture and of the optimiser state layout.
Orbax writes a step into a temporary folder and renames it when complete, so a run killed
mid-save leaves no step that a restart would pick up. ``restore`` reads ``meta`` first and
refuses a checkpoint of another model or optimiser with a message naming the difference,
instead of failing deep inside orbax on mismatched trees.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

# Metadata keys that must agree between a checkpoint and the run that resumes it.
COMPARED_KEYS = ("model", "num_classes", "image_shape", "fingerprint", "optimizer_fingerprint")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be resumed: corrupt, or from another model or optimiser."""


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of ``tree``: the restore target orbax fills in."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _jsonable(metadata: dict[str, Any]) -> dict[str, Any]:
  """Tuples become lists so that saved and fresh metadata compare equal after JSON."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in metadata.items()}


def run_metadata(config: Any, num_classes: int, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """What a checkpoint of ``config`` records and a resuming run must agree on.

  "fingerprint" hashes the architecture (model, model_kwargs, classes, image shape);
  "optimizer_fingerprint" hashes the choices that change the optimiser state's layout
  (optimizer, clipping on/off, and for SGD momentum and weight decay on/off), so a
  learning rate or a longer schedule may change between runs but a state tree may not.
  """
  def digest(obj):
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  arch = {"model": config.model, "model_kwargs": config.model_kwargs.to_dict(),
          "num_classes": int(num_classes), "image_shape": list(image_shape)}
  opt = {"optimizer": config.optimizer, "clip": bool(config.grad_clip_norm)}
  if config.optimizer == "sgd":  # AdamW's state has the same layout whatever its values.
    opt.update(momentum=bool(config.momentum), weight_decay=bool(config.weight_decay))
  return {"model": config.model, "num_classes": int(num_classes),
          "image_shape": list(image_shape), "fingerprint": digest(arch),
          "optimizer_fingerprint": digest(opt), "optimizer": config.optimizer}


class Checkpointer:
  """Saves and restores a run's state under ``directory`` (usually ``workdir/checkpoints``).

  Args:
    directory: where the numbered step folders live; created if missing.
    keep: how many of the newest steps to keep.
    metadata: JSON-serialisable facts about the run; the ``COMPARED_KEYS`` among them must
      match those of any checkpoint restored here.
  """

  def __init__(self, directory: str, *, keep: int, metadata: dict[str, Any]):
    self.directory = os.path.abspath(directory)
    self.metadata = _jsonable(metadata)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as err:  # orbax raises many types; all mean "unusable folder".
      raise CheckpointError(self._corrupt_message(self.directory, err)) from err

  @staticmethod
  def _corrupt_message(path: str, err: BaseException) -> str:
    return (f"Cannot read the checkpoint at {path} ({type(err).__name__}: {err}). It looks "
            f"incomplete or corrupt: start in a fresh --workdir, or delete {path} to fall "
            "back to an older step.")

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    """The newest complete step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None) -> None:
    """Starts saving ``state`` (a pytree of arrays) and the iterator position as ``step``.

    Arrays are copied to host before this returns, so the caller may donate ``state``
    to the next train step; the write itself finishes in the background. The iterator's
    position is read now, so call this before drawing the next batch.
    """
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave(dict(self.metadata, step=int(step)))}
    if data_iterator is not None:
      import grain  # Only the data iterator needs grain; keep the import local.
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def read_metadata(self, step: int) -> dict[str, Any]:
    """The ``meta`` item of ``step``; CheckpointError if it cannot be read."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(restored["meta"])
    except Exception as err:
      raise CheckpointError(self._corrupt_message(self.step_path(step), err)) from err

  def check_compatible(self, saved: dict[str, Any], step: int) -> None:
    """Raises CheckpointError naming every compared key where ``saved`` differs."""
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, this run {self.metadata.get(key)!r}"
             for key in COMPARED_KEYS if saved.get(key) != self.metadata.get(key)]
    if diffs:
      raise CheckpointError(
          f"The checkpoint at {self.step_path(step)} belongs to another run ("
          + "; ".join(diffs) + "). The model, its overrides, the image shape, the number of "
          "classes and the optimiser (optimizer, momentum, weight decay, clipping) must "
          "match to resume: use a fresh --workdir for this config.")

  def verify_latest(self) -> int | None:
    """Checks the newest step's metadata against this run (before any state is built).

    Returns that step, or None when the directory holds no checkpoint yet.
    """
    step = self.latest_step()
    if step is not None:
      self.check_compatible(self.read_metadata(step), step)
    return step

  def restore(self, state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
    """Restores ``step`` (default: the latest) into the structure and shardings of ``state``.

    ``data_iterator``, when given, is moved to the saved position in place. Returns the
    restored state pytree.

    Raises:
      CheckpointError: no checkpoint, a checkpoint of another run, or an unreadable one.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint to restore in {self.directory}.")
    self.check_compatible(self.read_metadata(step), step)
    items = {"state": ocp.args.StandardRestore(_abstract(state))}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:
      raise CheckpointError(self._corrupt_message(self.step_path(step), err)) from err
    return restored["state"]

  def wait(self) -> None:
    """Blocks until background writes are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_state(directory: str, step: int | None = None) -> tuple[int, Any]:
  """Reads the state pytree of ``step`` (default: the latest) without a template.

  For inspection and tests: arrays come back with the saved shapes and dtypes; nested
  optimiser states come back as plain containers. Returns (step, state).
  """
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"No checkpoint in {directory}.")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return step, restored["state"]
