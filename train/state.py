"""What the trainer and the picture tools share: the training state and the model a config
builds (``config.model`` with ``config.model_kwargs``, checked against the model's fields).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct
from flax.training import train_state

# Model fields that model_kwargs may not set: the trainer gives num_classes; Flax owns
# parent and name.
_NOT_KWARGS = ("num_classes", "parent", "name")


class TrainState(train_state.TrainState):
  """step, params, opt_state (from flax) plus batch-norm statistics and the run's key.

  ``schedule`` (step -> learning rate), ``label_smoothing``, the per-channel
  ``image_mean`` / ``image_std`` that uint8 batches are normalised with
  (``train.device_augment.normalize_images``) and ``image_size``, the side that
  device-augmented batches are resized to (``train.steps.input_images``), are static:
  part of the compiled step, not of the checkpoint.
  """
  batch_stats: Any
  rng: jax.Array
  schedule: Callable[[Any], Any] = struct.field(pytree_node=False, default=None)
  label_smoothing: float = struct.field(pytree_node=False, default=0.0)
  image_mean: tuple[float, ...] = struct.field(pytree_node=False, default=(0.0,))
  image_std: tuple[float, ...] = struct.field(pytree_node=False, default=(1.0,))
  image_size: int = struct.field(pytree_node=False, default=0)


def state_to_tree(state: TrainState) -> dict[str, Any]:
  """The arrays of ``state`` that a checkpoint holds."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state, "rng": state.rng}


def model_fields(name: str) -> tuple[str, ...]:
  """The fields of the registered model ``name`` that ``config.model_kwargs`` may set:
  the dataclass fields of the module ``create_model(name)`` builds, but num_classes, parent
  and name. Sorted."""
  from attention_flax import models  # the registry's own error for an unknown name
  module = models.create_model(name, num_classes=1)  # a dataclass: nothing is initialised
  return tuple(sorted(f.name for f in dataclasses.fields(module)
                      if f.init and f.name not in _NOT_KWARGS))


def check_model_kwargs(name: str, keys: Iterable[str]) -> None:
  """Raises a one-line ValueError naming the valid keys when a key is not a field of
  model ``name``."""
  fields = model_fields(name)
  unknown = [k for k in keys if k not in fields]
  if unknown:
    close = difflib.get_close_matches(unknown[0], fields, n=1)
    hint = f' Did you mean "{close[0]}"?' if close else ""
    raise ValueError(
        f"Unknown model_kwargs key {unknown[0]!r} for model {name!r}.{hint} Its keys are: "
        f"{', '.join(fields)} (--config.model_kwargs.KEY=VALUE).")


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
  """``create_model(config.model)`` with config.model_kwargs; bf16 compute if half_precision."""
  from attention_flax import models
  overrides = config.model_kwargs.to_dict()
  if config.half_precision:
    overrides.setdefault("dtype", jnp.bfloat16)
  return models.create_model(config.model, num_classes=num_classes, **overrides)
