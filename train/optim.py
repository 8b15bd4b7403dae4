"""Learning-rate schedules and the optimiser, composed from optax's own pieces.

``make_schedule`` builds step -> learning rate from ``optax.linear_schedule`` (warm-up),
``optax.constant_schedule``, ``optax.piecewise_constant_schedule`` (step decay),
``optax.cosine_decay_schedule`` / ``optax.warmup_cosine_decay_schedule`` and
``optax.join_schedules``; ``make_optimizer`` chains clipping, weight decay and SGD or AdamW.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine")
DECAY_ON = ("kernels", "all")


def choice_error(kind: str, value: Any, choices: tuple[str, ...]) -> ValueError:
  """The error for an unknown ``config.<kind>``: names the choices and the flag."""
  return ValueError(f"Unknown {kind} {value!r}; choose one of: {', '.join(choices)} "
                    f"(--config.{kind}=...).")


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """config.num_train_steps when > 0, else num_epochs worth of steps."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def decay_boundaries(config: ml_collections.ConfigDict, steps_per_epoch: int
                     ) -> tuple[int, ...]:
  """The steps where step decay multiplies the rate: decay_steps, else decay_epochs."""
  return tuple(int(b) for b in config.decay_steps) or tuple(
      int(round(e * steps_per_epoch)) for e in config.decay_epochs)


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int
                  ) -> Callable[[Any], jax.Array]:
  """Step -> learning rate: constant, step decay or cosine, after an optional linear warm-up.

  Warm-up rises linearly from 0 at step 0 to ``learning_rate`` at step
  ``warmup_epochs * steps_per_epoch``. Step decay multiplies by ``decay_factor`` at each
  boundary (``decay_steps``, else ``decay_epochs`` * steps_per_epoch): the update of step b,
  counted from 0, is the first at the decayed rate, as PyTorch's MultiStepLR. Cosine falls
  from the peak at the end of warm-up to 0 at the last step.

  Raises:
    ValueError: an unknown schedule, or a decay boundary inside the warm-up.
  """
  schedule = _optax_schedule(config, steps_per_epoch)
  # Steps as float32: optax mixes Python floats with the step count, which the strict
  # dtype promotion rejects for int32 counts (exact up to 2**24 steps).
  return lambda step: schedule(jnp.asarray(step, jnp.float32))


def _optax_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int
                    ) -> Callable[[Any], jax.Array]:
  base, kind = float(config.learning_rate), config.schedule
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  total = total_steps(config, steps_per_epoch)
  if kind == "cosine":
    if not warmup:
      return optax.cosine_decay_schedule(base, max(total, 1))
    # decay_steps counts the warm-up too; the decay lasts at least one step.
    return optax.warmup_cosine_decay_schedule(0.0, base, warmup,
                                              warmup + max(total - warmup, 1))
  if kind == "step":
    boundaries = decay_boundaries(config, steps_per_epoch)
    early = [b for b in boundaries if b < warmup]
    if early:
      raise ValueError(f"The decay boundaries {early} fall inside the {warmup} warm-up steps; "
                       "set config.decay_steps / decay_epochs after config.warmup_epochs.")
    # Counted from the end of warm-up (join_schedules' convention); a repeated boundary
    # decays once per mention.
    counts = collections.Counter(b - warmup for b in boundaries)
    factor = float(config.decay_factor)
    main = optax.piecewise_constant_schedule(
        base, {b: factor ** n for b, n in counts.items()})
  elif kind == "constant":
    main = optax.constant_schedule(base)
  else:
    raise choice_error("schedule", kind, SCHEDULES)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def decay_mask(params: Any, on: str = "kernels") -> Any:
  """True for the weights that get weight decay (``config.weight_decay_on``).

  "kernels": kernels only (ndim > 1), never biases or norm scales and offsets; "all": every
  parameter, as ``torch.optim.SGD(model.parameters(), weight_decay=...)`` decays.
  """
  if on not in DECAY_ON:
    raise choice_error("weight_decay_on", on, DECAY_ON)
  return jax.tree.map(lambda p: on == "all" or p.ndim > 1, params)


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
  decays decoupled from the gradient statistics (``w -= lr * weight_decay * w``), as
  PyTorch's AdamW. ``config.weight_decay_on`` picks the decayed weights (:func:`decay_mask`):
  "kernels" (biases and norm parameters never decay) or "all".
  """
  mask = functools.partial(decay_mask, on=config.get("weight_decay_on", "kernels"))
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "sgd":
    if config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                           nesterov=bool(config.nesterov)))
  elif config.optimizer == "adamw":
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2,
                        weight_decay=config.weight_decay, mask=mask)
    parts.append(optax.GradientTransformation(adamw.init, _standard_promotion(adamw.update)))
  else:
    raise choice_error("optimizer", config.optimizer, OPTIMIZERS)
  return optax.chain(*parts)
