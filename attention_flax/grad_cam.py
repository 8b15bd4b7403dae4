"""Grad-CAM: where a class's evidence lies in a layer's activations.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017, https://arxiv.org/abs/1610.02391.

:func:`grad_cam` needs the gradient of a logit with respect to a stage's activations
without editing the model: a method interceptor (``nn.intercept_methods``) adds a zero
perturbation to the output (or, when the stage is no module's output, the input) of the
module call that carries the stage, and the gradient with respect to that perturbation is
the gradient with respect to the activations. Works for any linen model, registered or not.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from attention_flax.inspect import (STAGE_PREFIX, _apply, _check_inputs, _entries, _flatten,
                                    _keyed)

Array = jax.Array


class _Site(struct.PyTreeNode):
  """Where a layer's activations enter the computation: the ``call``-th call of ``method``
  on the module at ``path``, on its output or on its first argument (``where``), reshaped
  from the activation's shape to ``shape`` there."""
  path: tuple[str, ...] = struct.field(pytree_node=False)
  method: str = struct.field(pytree_node=False)
  call: int = struct.field(pytree_node=False)
  where: str = struct.field(pytree_node=False)
  shape: tuple[int, ...] = struct.field(pytree_node=False)


def _record_calls(model, variables, images) -> tuple[Array, list[dict], dict]:
  """Runs the model once, noting every wrapped method call: path, input, output."""
  calls: list[dict] = []
  counts: dict[tuple, int] = {}

  def recorder(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    key = (path, context.method_name)
    record = {"path": path, "method": context.method_name, "call": counts.get(key, 0),
              "input": args[0] if args else None, "output": None}
    counts[key] = record["call"] + 1
    calls.append(record)  # Entry order: a parent comes before its children.
    record["output"] = next_fun(*args, **kwargs)
    return record["output"]

  with nn.intercept_methods(recorder):
    logits, inter = _apply(model, variables, images)
  return logits, calls, inter


def _same(a: Any, b: Array) -> bool:
  if a is b:
    return True
  if not isinstance(a, jax.Array) or a.shape != b.shape or a.dtype != b.dtype:
    return False
  return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _find_site(model, variables, images, layer: str) -> tuple[Array, _Site]:
  """(activations, site) for ``layer``: a sown stage name or a module path."""
  logits, calls, inter = _record_calls(model, variables, images)
  stages = {}
  for path, sown in _flatten(inter):
    if path[-1].startswith(STAGE_PREFIX):
      values = _entries(sown)
      for i, v in enumerate(values):
        stages[_keyed(path, i, len(values))] = v
  wanted = layer.strip("/")
  matches = [k for k in stages if k == wanted or k.endswith("/" + wanted)]
  if len(matches) > 1:
    raise ValueError(f"Layer {layer!r} is ambiguous: {matches}; pass the full path.")
  if matches:
    act = stages[matches[0]]
    # Prefer the call that produced the activation (the last such call), so that every
    # later use of it sees the perturbation.
    for c in reversed(calls):
      if _same(c["output"], act):
        return act, _Site(c["path"], c["method"], c["call"], "output", tuple(act.shape))
    # Otherwise the first call that consumes it, possibly flattened (a Dense head).
    for c in calls:
      x = c["input"]
      if isinstance(x, jax.Array) and x.size == act.size and x.shape[:1] == act.shape[:1]:
        if _same(x, act.reshape(x.shape)):
          return act, _Site(c["path"], c["method"], c["call"], "input", tuple(x.shape))
    raise ValueError(
        f"The sown stage {matches[0]!r} is neither the output nor the input of any module "
        "call, so its gradient cannot be taken there; pass the path of the module that "
        "produces it as `layer` instead.")
  path = tuple(p for p in wanted.split("/") if p)
  for c in reversed(calls):
    if c["path"] == path and c["method"] == "__call__" and isinstance(c["output"], jax.Array):
      return c["output"], _Site(path, "__call__", c["call"], "output", tuple(c["output"].shape))
  module_paths = sorted({"/".join(c["path"]) for c in calls if c["path"]})
  raise ValueError(
      f"Unknown layer {layer!r}: neither a sown stage ({', '.join(stages) or 'none'}) nor a "
      f"module path. Some module paths: {', '.join(module_paths[-12:])}.")


def _logits_with_delta(model, variables, images, site: _Site, delta: Array) -> Array:
  counts: dict[tuple, int] = {}

  def perturb(next_fun, args, kwargs, context):
    key = (tuple(context.module.path), context.method_name)
    index = counts.get(key, 0)
    counts[key] = index + 1
    if key != (site.path, site.method) or index != site.call:
      return next_fun(*args, **kwargs)
    d = delta.reshape(site.shape)
    if site.where == "input":
      return next_fun(args[0] + d.astype(args[0].dtype), *args[1:], **kwargs)
    out = next_fun(*args, **kwargs)
    return out + d.astype(out.dtype)

  with nn.intercept_methods(perturb):
    logits, _ = _apply(model, variables, images)
  return logits


def grad_cam(model: nn.Module, variables: Any, images: Array, layer: str,
             target: Any = None) -> Array:
  """Grad-CAM heat maps of ``layer`` for the ``target`` class of each image.

  With A the layer's (N, h, w, K) activations and y the target logit, the weight of
  channel k is the spatial mean of dy/dA_k; the map is ReLU(sum_k w_k A_k) (Selvaraju et
  al. eq. 1-2), resized bilinearly (half-pixel centres) to the input's H x W and divided
  by each image's maximum; an image whose map is all zero stays zero.

  Args:
    model, variables: as for :func:`attention_maps`; the model runs in inference mode.
    images: (N, H, W, C) floating images.
    layer: a sown stage ("stage3", "backbone/stage2") or a module path ("layer3_2");
      the activations must be (N, h, w, K).
    target: None (each image's top class), an int (one class for all), or (N,) ints.

  Returns:
    (N, H, W) float32 maps in [0, 1].
  """
  _check_inputs(model, variables, images, "grad_cam")
  if not isinstance(layer, str) or not layer.strip("/"):
    raise TypeError(f"grad_cam's layer must be a stage name or module path string, e.g. "
                    f"'stage3'; got {layer!r}.")
  act, site = _find_site(model, variables, images, layer)
  if act.ndim != 4:
    raise ValueError(f"Grad-CAM needs (N, h, w, K) activations; layer {layer!r} has shape "
                     f"{tuple(act.shape)}. Pick a convolutional stage or module.")
  n = images.shape[0]
  if target is not None:
    target = np.broadcast_to(np.asarray(target), (n,))
    if not np.issubdtype(target.dtype, np.integer):
      raise TypeError(f"grad_cam's target must be class indices (ints); got {target.dtype}.")
    target = jnp.asarray(target, jnp.int32)

  def score(delta, variables, images, target):
    logits = _logits_with_delta(model, variables, images, site, delta)
    if logits.ndim != 2:
      raise ValueError(f"grad_cam needs (N, classes) logits; the model returned shape "
                       f"{tuple(logits.shape)}.")
    logits = logits.astype(jnp.float32)
    if target is None:
      target = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)
    # Images are independent in inference mode, so one gradient of the sum gives each
    # image's own gradient.
    return jnp.sum(jnp.take_along_axis(logits, target[:, None], axis=1)), logits

  # One compiled forward and backward pass; the interceptor runs at trace time.
  grad_fn = jax.jit(jax.grad(score, has_aux=True))
  grads, logits = grad_fn(jnp.zeros_like(act), variables, images, target)
  if target is not None and int(jnp.max(target)) >= logits.shape[-1] or (
      target is not None and int(jnp.min(target)) < 0):
    raise ValueError(f"target classes must lie in [0, {logits.shape[-1]}); got "
                     f"{np.asarray(target)}.")
  grads = grads.astype(jnp.float32)
  return cam_from_gradients(act.astype(jnp.float32), grads, images.shape[1:3])


def cam_from_gradients(activations: Array, gradients: Array, size: tuple[int, int]) -> Array:
  """ReLU(sum_k mean_hw(dy/dA_k) A_k) of (N, h, w, K) arrays, resized to ``size`` = (H, W)
  and scaled to [0, 1] per image: (N, H, W) float32."""
  weights = jnp.mean(gradients, axis=(1, 2))  # (N, K)
  cam = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", activations, weights))
  n = cam.shape[0]
  cam = jax.image.resize(cam, (n, int(size[0]), int(size[1])), method="bilinear")
  cam = jnp.maximum(cam, 0.0)  # Bilinear weights are convex; this only removes -0.0 noise.
  peak = jnp.max(cam, axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


__all__ = ["cam_from_gradients", "grad_cam"]
