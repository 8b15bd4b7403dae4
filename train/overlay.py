"""The picture a training run draws at each evaluation: what the model attends to on its
first eval images (``workdir/attention/step_N.png``, ``config.attention_png``).

Imported by the trainer (lazily: matplotlib comes with it) and by ``train.visualize``, which
re-exports :func:`write_eval_overlay` beside its full set of pictures; it imports neither.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from attention_flax import grad_cam as gc
from attention_flax import inspect as ins
from attention_flax import plot
from train import data as data_lib

_JITTED: dict[Any, Any] = {}


def maps_fn(model: Any):
  """``attention_maps`` of ``model`` compiled once per model (models hash by fields)."""
  try:
    return _JITTED.setdefault(model, jax.jit(lambda v, x: ins.attention_maps(model, v, x)))
  except TypeError:  # an unhashable user module: compile without caching
    return jax.jit(lambda v, x: ins.attention_maps(model, v, x))


def write_eval_overlay(model: Any, variables: Any, images: Any, path: str) -> str:
  """One small PNG of what ``model`` attends to on ``images`` (the first 6 are drawn).

  Picks the deepest spatial maps when the model has any (masks overlaid on the inputs;
  for per-channel masks, whose channel mean is often flat, the most varied channel of
  each), the glimpse path of a hard-attention model, else the STN panel, else the channel-gate strips; a model that sows no attention
  gets a Grad-CAM of its last stage. Map extraction is one jitted call, compiled once per
  model. Returns ``path``.
  """
  images = jnp.asarray(images, jnp.float32)[:6]
  maps = maps_fn(model)(variables, images)
  glimpses = ins.by_kind(maps, "glimpse_location")
  if glimpses:  # hard attention: the glimpse path
    from attention_flax import plot_glimpses
    plot_glimpses.plot_glimpses(images, next(iter(glimpses.values())).value,
                                plot_glimpses.model_glimpse_sides(model), path=path)
    return path
  views = ins.spatial_views(
      {k: m for k, m in maps.items() if ins.view_of(m) != "per_channel"})
  views.update(ins.channel_views(maps, k=1))
  if views:
    names = list(views)[-3:]
    plot.plot_overlays(images, {k: views[k] for k in names}, path=path)
    return path
  thetas, outputs = ins.by_kind(maps, "stn_theta"), ins.by_kind(maps, "stn_output")
  if thetas and outputs:
    plot.plot_stn(images, next(iter(thetas.values())).value,
                  next(iter(outputs.values())).value, path=path)
    return path
  gates = ins.by_view(maps, "gate")
  if gates:
    plot.plot_channel_gates({k: m.value for k, m in list(gates.items())[-3:]}, path=path)
    return path
  stages = [k for k, v in ins.features(model, variables, images).items() if v.ndim == 4]
  if not stages:
    raise ValueError("write_eval_overlay: the model sows neither attention maps nor "
                     "'stage{i}' features; nothing to draw.")
  plot.plot_grad_cam(images, gc.grad_cam(model, variables, images, stages[-1]), path=path)
  return path


def write_attention_png(model: Any, state: Any, config: ml_collections.ConfigDict,
                        workdir: str, step: int) -> str:
  """:func:`write_eval_overlay` of ``state``'s params and batch_stats on the first eval
  images of ``config.data``, to workdir/attention/step_<step>.png; returns the path."""
  batch = next(iter(data_lib.eval_batches(config.data, batch_size=config.eval_batch_size,
                                          augment_on_device=False)))
  variables = {"params": jax.device_get(state.params),
               "batch_stats": jax.device_get(state.batch_stats)}
  path = os.path.join(workdir, "attention", f"step_{step}.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return write_eval_overlay(model, variables, batch["image"][:6], path)
