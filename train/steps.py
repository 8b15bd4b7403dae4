"""The pure step functions the trainer jits: ``train_step(state, batch, rng)`` and
``eval_step(state, batch)``, with the loss and the input preparation they share.

A batch is {"image": (N, H, W, C), "label": (N,)} (eval batches also "mask": 1 for real
examples, 0 for padding); uint8 images are normalised inside the step with the state's
image_mean / image_std, and device-augmented batches are augmented there
(``train.device_augment``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train import device_augment
from train.state import TrainState


def input_images(state: TrainState, batch: dict[str, jax.Array]) -> jax.Array:
  """The model's input from a batch and the state's image_size, image_mean and image_std
  (``train.device_augment.model_input``)."""
  return device_augment.model_input(batch, state.image_size, state.image_mean,
                                    state.image_std)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example softmax cross-entropy of (N, K) logits and (N,) integer labels.

  With smoothing a, the target is (1 - a) * one_hot + a / K.
  """
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def has_training_loss(state: TrainState) -> bool:
  """Whether the state's model brings its own loss: a ``training_loss`` method on the module
  whose ``apply`` is ``state.apply_fn`` (a bound ``model.apply``, as the trainer builds it).

  Such a method is called as ``training_loss(images, labels, *, train=True)`` and returns
  (scalar loss, aux): aux["logits"] (N, K) gives the accuracy metric, every other entry is
  a scalar metric logged under its name. Label smoothing does not apply to it.
  """
  model = getattr(state.apply_fn, "__self__", None)
  return callable(getattr(type(model), "training_loss", None))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on a (global) batch {"image": (N, H, W, C), "label": (N,)}; uint8 images
  are normalised first with the state's image_mean / image_std, and a device-augmented
  batch is augmented first (:func:`input_images`).

  Returns the new state and scalar metrics: loss, accuracy, learning_rate, grad_norm,
  param_norm and "finite" (false once loss, gradients or parameters overflow). A model with
  its own ``training_loss`` (:func:`has_training_loss`) is trained on that loss instead of
  cross-entropy, and its aux metrics are added.
  """
  rng = jax.random.fold_in(rng, state.step)
  images = input_images(state, batch)
  own_loss = has_training_loss(state)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    if own_loss:
      (loss, aux), updates = state.apply_fn(
          variables, images, batch["label"], train=True, method="training_loss",
          rngs={"dropout": rng}, mutable=["batch_stats"])
      aux = dict(aux)
      return loss.astype(jnp.float32), (aux.pop("logits").astype(jnp.float32), aux, updates)
    logits, updates = state.apply_fn(variables, images, train=True, rngs={"dropout": rng},
                                     mutable=["batch_stats"])
    logits = logits.astype(jnp.float32)
    loss = cross_entropy(logits, batch["label"], state.label_smoothing).mean()
    return loss, (logits, {}, updates)

  (loss, (logits, aux, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
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
  metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
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
