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

import errno
import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from train import errors

# Metadata keys that must agree between a checkpoint and the run that resumes it.
COMPARED_KEYS = ("model", "num_classes", "image_shape", "fingerprint", "optimizer_fingerprint")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be resumed: corrupt, or from another model or optimiser."""


class CorruptCheckpointError(CheckpointError):
  """A step that cannot be read (cut short, garbled, or missing an item)."""


def _permission_cause(err: BaseException) -> OSError | None:
  """The permission error (EACCES, EPERM, EROFS) in ``err``'s chain of causes, if any."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, PermissionError) or (
        isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
      return err
    err = err.__cause__ or err.__context__
  return None


def _read_error(path: str, err: BaseException) -> CheckpointError:
  """The error for a checkpoint that could not be read or written: a permission problem
  named as such, else :class:`CorruptCheckpointError`."""
  denied = _permission_cause(err)
  if denied is not None:
    return CheckpointError(
        f"No permission to access {denied.filename or path} ({denied.strerror or denied}); "
        "give this user read and write access to the workdir (chmod -R u+rw) or choose "
        "another --workdir.")
  text = " ".join(str(err).split())[:300]
  return CorruptCheckpointError(
      f"Cannot read the checkpoint at {path} ({type(err).__name__}: {text}); it looks "
      "incomplete or corrupt")


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
    self._warned: set[int] = set()  # unreadable steps already reported
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as err:  # orbax raises many types; all mean "unusable folder".
      error = _read_error(self.directory, err)
      if isinstance(error, CorruptCheckpointError):
        error = CheckpointError(f"{error}: move {self.directory} aside or start in a fresh "
                                "--workdir.")
      raise error from err

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
      raise _read_error(self.step_path(step), err) from err

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
    """Checks the newest readable step's metadata against this run (before any state is
    built); newer steps that cannot be read are skipped with a one-line warning.

    Returns that step, or None when the directory holds no checkpoint yet.

    Raises:
      CheckpointError: the step belongs to another run, a permission problem, or no step
        is left that can be read.
    """
    skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        saved = self.read_metadata(step)
      except CorruptCheckpointError as err:
        self._skip(step, err, skipped)
        continue
      self.check_compatible(saved, step)
      return step
    if skipped:
      raise self._none_left(skipped)
    return None

  def _skip(self, step: int, err: BaseException, skipped: list[int]) -> None:
    skipped.append(step)
    if step not in self._warned:
      self._warned.add(step)
      errors.warn(f"{err}; skipped it, trying the next older checkpoint.")

  def _none_left(self, skipped: list[int]) -> CheckpointError:
    return CorruptCheckpointError(
        f"No readable checkpoint left in {self.directory}: steps "
        f"{', '.join(map(str, skipped))} are incomplete or corrupt (warnings above); move "
        f"{self.directory} aside to start over, or use a fresh --workdir.")

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable step folders to <step>.corrupt (orbax ignores such names), so
    the resumed run can save those steps again; nothing is deleted."""
    if jax.process_index() == 0:
      for step in steps:
        target, n = f"{self.step_path(step)}.corrupt", 1
        while os.path.exists(target):
          n += 1
          target = f"{self.step_path(step)}.corrupt{n}"
        os.rename(self.step_path(step), target)
        errors.warn(f"moved the unreadable checkpoint {self.step_path(step)} to {target}.")
    self._manager.reload()

  def restore(self, state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
    """Restores ``step`` (default: the newest readable one) into the structure and
    shardings of ``state``.

    Without ``step``, a step that cannot be read is skipped with a one-line warning and the
    next older one is tried; the skipped folders are renamed ``<step>.corrupt`` once an
    older step is restored (nothing is deleted). ``data_iterator``, when given, is moved to
    the saved position in place. Returns the restored state pytree.

    Raises:
      CheckpointError: no checkpoint, a checkpoint of another run, a permission problem,
        or (with ``step`` given, or when every step fails) an unreadable one.
    """
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise CheckpointError(f"No checkpoint to restore in {self.directory}.")
    skipped: list[int] = []
    for candidate in steps:
      try:
        restored = self._restore_step(candidate, state, data_iterator)
      except CorruptCheckpointError as err:
        if step is not None:
          raise CorruptCheckpointError(f"{err}: start in a fresh --workdir, or move "
                                       f"{self.step_path(step)} aside.") from err
        self._skip(candidate, err, skipped)
        continue
      if skipped:
        self._set_aside(skipped)
      return restored
    raise self._none_left(skipped)

  def _restore_step(self, step: int, state: Any, data_iterator: Any) -> Any:
    self.check_compatible(self.read_metadata(step), step)
    items = {"state": ocp.args.StandardRestore(_abstract(state))}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:
      raise _read_error(self.step_path(step), err) from err
    return restored["state"]

  def wait(self) -> None:
    """Blocks until background writes are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _on_one_device(manager: Any, step: int) -> Any:
  """The saved state's shapes and dtypes, placed on this process's first device: a state
  saved by several devices or processes then reads on one (orbax refuses the saved
  placement when those devices are gone)."""
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                      manager.item_metadata(step)["state"])


def load_state(directory: str, step: int | None = None) -> tuple[int, Any]:
  """Reads the state pytree of ``step`` (default: the newest readable one) without a
  template; an unreadable newer step is skipped with a one-line warning.

  For inspection, pictures and tests: arrays come back with the saved shapes and dtypes;
  nested optimiser states come back as plain containers. Returns (step, state).

  Raises:
    CheckpointError: no checkpoint, a permission problem, or no readable one.
  """
  directory = os.path.abspath(directory)
  try:
    manager = ocp.CheckpointManager(directory,
                                    options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_handlers={"state": ocp.StandardCheckpointHandler()})
  except Exception as err:
    raise _read_error(directory, err) from err
  try:
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise CheckpointError(f"No checkpoint in {directory}.")
    skipped = []
    for candidate in steps:
      path = os.path.join(directory, str(candidate))
      try:
        restored = manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_on_one_device(manager, candidate))))
      except Exception as err:
        error = _read_error(path, err)
        if step is not None or not isinstance(error, CorruptCheckpointError):
          raise error from err
        skipped.append(candidate)
        errors.warn(f"{error}; skipped it, trying the next older checkpoint.")
        continue
      return candidate, restored["state"]
    raise CorruptCheckpointError(
        f"No readable checkpoint left in {directory}: steps {', '.join(map(str, skipped))} "
        "are incomplete or corrupt (warnings above).")
  finally:
    manager.close()
