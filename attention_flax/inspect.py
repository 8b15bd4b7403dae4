"""Reading what a model attends to: sown attention maps, stage features and Grad-CAM.

Grad-CAM: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017, https://arxiv.org/abs/1610.02391.

Every attention layer of ``attention_flax.layers`` sows what it applies into the
``intermediates`` collection and declares those names in its ClassVar ``maps`` (sown
name -> kind); the models sow their stage outputs as ``stage{i}``. :func:`attention_maps`
and :func:`features` run the model once with that collection mutable and return the sown
arrays keyed by their module path ("layer1_0/se/channel_gate"). A layer of your own is
found the same way: declare ``maps = {"my_gate": "channel_gate"}`` on its class (with a
kind of :data:`MAP_KINDS`, or a kind of your own, which is then drawn by its shape; see
:func:`view_of`); no list here needs editing.
:func:`grad_cam` needs the gradient of a logit with respect to a stage's activations
without editing the model: a method interceptor (``nn.intercept_methods``) adds a zero
perturbation to the output (or, when the stage is no module's output, the input) of the
module call that carries the stage, and the gradient with respect to that perturbation is
the gradient with respect to the activations. Works for any linen model, registered or not.
"""

from __future__ import annotations

import functools
import importlib
import inspect as _pyinspect
import pkgutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct
from flax.core import unfreeze

from attention_flax import layers as _layers
from attention_flax.models.common import check_model_images

Array = jax.Array

# The vocabulary of kinds and how each is read: "gate" (N, 1, 1, C) channel scales;
# "mask" (N, H, W, 1); "per_channel" (N, H, W, C), a mask per channel; "coord" a pair
# (N, H, 1, C) and (N, 1, W, C) (sown as coord_gate_h / coord_gate_w); "weights" a softmax
# over positions, (N, H, W, 1); "theta" an (N, 2, 3) affine matrix; "image" a warped input.
KIND_VIEWS: dict[str, str] = {
    "channel_gate": "gate",
    "spatial_mask": "mask",
    "residual_mask": "per_channel",
    "coord_gate": "coord",
    "context_weights": "weights",
    "gather_gate": "per_channel",
    "stn_theta": "theta",
    "stn_output": "image",
}
MAP_KINDS = tuple(KIND_VIEWS)
# Kinds whose values are gates or masks in [0, 1] (sigmoid-like or softmax weights).
GATE_KINDS = ("channel_gate", "spatial_mask", "residual_mask", "coord_gate",
              "context_weights", "gather_gate")
# Kinds whose maps vary per channel and position, (N, h, w, C).
PER_CHANNEL_KINDS = tuple(k for k, v in KIND_VIEWS.items() if v == "per_channel")
# Views drawn as overlays on the input (see spatial_views).
SPATIAL_VIEWS = ("mask", "per_channel", "coord", "weights")
STAGE_PREFIX = "stage"


@struct.dataclass
class AttentionMap:
  """One sown map. ``value`` is an array (a pytree leaf), ``kind`` and ``path`` are static,
  so a dict of these passes through ``jax.jit``.

  Attributes:
    value: the array as sown, e.g. (N, 1, 1, C) for a channel gate, (N, H, W, 1) for a
      spatial mask, (N, 2, 3) for an STN theta.
    kind: the kind its layer declares for it (``maps``): one of :data:`MAP_KINDS`, or a
      layer's own kind.
    path: the '/'-joined key, module path then sown name ("layer1_0/se/channel_gate").
  """
  value: Array
  kind: str = struct.field(pytree_node=False)
  path: str = struct.field(pytree_node=False)


# --------------------------------------------------------------------------- declarations


def declared_maps(factory: Any) -> dict[str, str]:
  """The maps ``factory`` declares, {sown name: kind}: its ``maps`` attribute, looked up
  on the class a ``functools.partial`` wraps; {} when it declares none (a plain function,
  or a ``maps`` that is not a mapping, such as a field counting feature maps).

  Raises:
    TypeError: ``maps`` is a mapping whose names or kinds are not strings.
  """
  while isinstance(factory, functools.partial):
    factory = factory.func
  maps = getattr(factory, "maps", None)
  if not isinstance(maps, Mapping):
    return {}
  if not all(isinstance(k, str) and isinstance(v, str) for k, v in maps.items()):
    raise TypeError(f"{factory!r} declares maps={dict(maps)!r}; it must map each sown name "
                    f"(a string) to its kind (a string such as {MAP_KINDS[0]!r}).")
  return dict(maps)


@functools.lru_cache(maxsize=None)
def _library_layers() -> tuple[type, ...]:
  """Every layer class defined in ``attention_flax.layers`` that declares maps, registered
  or not (CBAM's child CBAMChannel is not)."""
  found = []
  for info in pkgutil.iter_modules(_layers.__path__, _layers.__name__ + "."):
    module = importlib.import_module(info.name)
    for obj in vars(module).values():
      if (isinstance(obj, type) and issubclass(obj, nn.Module)
          and obj.__module__ == module.__name__ and declared_maps(obj)):
        found.append(obj)
  return tuple(found)


def map_kinds() -> dict[str, str]:
  """Sown name -> kind, read now from the ``maps`` declarations of every registered
  attention (``attention_flax.layers.ATTENTIONS``, in registration order, so layers
  registered later count) and of the library's unregistered layers.

  :func:`attention_maps` asks the sowing module itself first; this table is its fallback
  for modules that sow without declaring. A name declared with two kinds keeps the first.
  """
  kinds: dict[str, str] = {}
  for factory in (*_layers.ATTENTIONS.values(), *_library_layers()):
    for name, kind in declared_maps(factory).items():
      kinds.setdefault(name, kind)
  return kinds


def view_of(m: AttentionMap) -> str | None:
  """How ``m`` is drawn: the view of its kind in :data:`KIND_VIEWS`; for a kind outside
  the vocabulary, by its shape: (N, 1, 1, C) "gate", (N, H, W, 1) "mask", (N, H, W, C)
  "per_channel"; None for other shapes (such maps are returned but not drawn)."""
  view = KIND_VIEWS.get(m.kind)
  if view is not None:
    return view
  shape = tuple(jnp.shape(m.value))
  if len(shape) != 4:
    return None
  if shape[1:3] == (1, 1):
    return "gate"
  return "mask" if shape[3] == 1 else "per_channel"


def by_view(maps: Mapping[str, AttentionMap], view: str) -> dict[str, AttentionMap]:
  """The maps drawn as ``view`` (see :func:`view_of`), order kept: ``by_view(maps,
  "gate")`` gives every channel gate, a user kind of gate shape too."""
  return {k: m for k, m in maps.items() if view_of(m) == view}


def spatial_kinds(maps: Mapping[str, AttentionMap]) -> list[str]:
  """The kinds among ``maps`` that have a spatial view (:data:`SPATIAL_VIEWS`), in the
  order they first appear."""
  kinds: list[str] = []
  for m in maps.values():
    if view_of(m) in SPATIAL_VIEWS and m.kind not in kinds:
      kinds.append(m.kind)
  return kinds


# --------------------------------------------------------------------------- maps


def _accepts_train(model: nn.Module) -> bool:
  try:
    params = _pyinspect.signature(model.__call__).parameters
  except (TypeError, ValueError):
    return False
  return "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_inputs(model: Any, variables: Any, images: Any, fn: str) -> None:
  if not isinstance(model, nn.Module):
    raise TypeError(f"{fn} expects a flax.linen Module as `model`; got {type(model).__name__}. "
                    "Build one with attention_flax.models.create_model(name).")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError(f"{fn} expects the model's variables, a mapping with a 'params' entry "
                    "(e.g. {'params': state.params, 'batch_stats': state.batch_stats}).")
  check_model_images(images, fn)


def _apply(model: nn.Module, variables: Any, images: Array, train: bool = False,
           **kwargs: Any) -> tuple[Array, dict]:
  """Runs the model with ``intermediates`` mutable; returns (output, intermediates)."""
  mutable = ["intermediates"] + (["batch_stats"] if train and "batch_stats" in variables else [])
  # Models without a `train` argument (user modules) are called with the images alone.
  extra = {"train": train} if _accepts_train(model) else {}
  out, state = model.apply(variables, images, mutable=mutable, **extra, **kwargs)
  return out, unfreeze(state).get("intermediates", {})


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
  """(path, sown tuple) pairs, in the order the model sowed them."""
  items = []
  for key, value in tree.items():
    if isinstance(value, Mapping):
      items.extend(_flatten(value, prefix + (str(key),)))
    else:
      items.append((prefix + (str(key),), value))
  return items


def _entries(sown: Any) -> list[Any]:
  """The values sown under one name: a tuple, one item per call (shared modules sow more)."""
  return list(sown) if isinstance(sown, (tuple, list)) else [sown]


def _keyed(path: tuple[str, ...], index: int, count: int) -> str:
  key = "/".join(path)
  return key if count == 1 else f"{key}:{index}"


def attention_maps(model: nn.Module, variables: Any, images: Array, *, train: bool = False
                   ) -> dict[str, AttentionMap]:
  """Every attention map ``model`` sows on ``images``, keyed by module path.

  A sown value is a map when the module that sowed it declares its name in ``maps``
  (the library's layers and any user layer, registered or passed as a factory), or,
  for a module declaring nothing, when :func:`map_kinds` knows the name. Other sown
  values (stage features, a user's own intermediates) are left out.

  Args:
    model: any linen module.
    variables: its variables ({"params": ..., "batch_stats": ...}).
    images: (N, H, W, C) floating images, preprocessed as for training.
    train: run in training mode (batch statistics of this batch; the updated running
      statistics are discarded).

  Returns:
    {"layer1_0/se/channel_gate": AttentionMap(value, "channel_gate", path), ...} in the
    order the layers ran. A module called k > 1 times gets keys "path:0" ... "path:k-1".
    Pure: jit it with ``jax.jit(functools.partial(attention_maps, model))`` (a jitted
    call returns the dict with its keys sorted, as jax orders every dict it returns).
  """
  _check_inputs(model, variables, images, "attention_maps")
  declared: dict[tuple[str, ...], dict[str, str]] = {}

  def note_declarations(next_fun, args, kwargs, context):
    # Runs at trace time: which module sits at each path, and what it declares.
    path = tuple(context.module.path)
    if path not in declared:
      declared[path] = declared_maps(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(note_declarations):
    _, inter = _apply(model, variables, images, train)
  fallback = map_kinds()
  maps: dict[str, AttentionMap] = {}
  for path, sown in _flatten(inter):
    kind = declared.get(path[:-1], {}).get(path[-1]) or fallback.get(path[-1])
    if kind is None:
      continue
    values = _entries(sown)
    for i, value in enumerate(values):
      key = _keyed(path, i, len(values))
      maps[key] = AttentionMap(value=value, kind=kind, path=key)
  return maps


def features(model: nn.Module, variables: Any, images: Array, *, train: bool = False
             ) -> dict[str, Array]:
  """The stage outputs the model sows (``stage{i}``), keyed by path ("stage3",
  "backbone/stage2"); each (N, h, w, C) for convolutional stages."""
  _check_inputs(model, variables, images, "features")
  _, inter = _apply(model, variables, images, train)
  out: dict[str, Array] = {}
  for path, sown in _flatten(inter):
    if not path[-1].startswith(STAGE_PREFIX):
      continue
    values = _entries(sown)
    for i, value in enumerate(values):
      out[_keyed(path, i, len(values))] = value
  return out


def by_kind(maps: Mapping[str, AttentionMap], kind: str) -> dict[str, AttentionMap]:
  """The maps of one kind, order kept."""
  return {k: m for k, m in maps.items() if m.kind == kind}


def spatial_views(maps: Mapping[str, AttentionMap]) -> dict[str, Array]:
  """One (N, h, w) float32 map per spatially varying attention, for overlays.

  By view (:func:`view_of`): a mask (spatial_mask, or a user kind of shape (N, H, W, 1))
  as it is; a per-channel mask (residual_mask, gather_gate, or a user kind of shape
  (N, H, W, C)): its mean over channels; context_weights: divided by each image's
  maximum (softmax weights sum to 1, so their scale shrinks with h * w); coordinate
  attention: the gate it applies, mean over channels of a_h * a_w, keyed
  "<module>/coord_gate". Channel gates and STN entries are left out.
  """
  views: dict[str, Array] = {}
  coord: dict[str, dict[str, Array]] = {}
  for key, m in maps.items():
    view = view_of(m)
    if view not in SPATIAL_VIEWS:
      continue
    v = jnp.asarray(m.value).astype(jnp.float32)
    if view == "mask":
      views[key] = v[..., 0]
    elif view == "per_channel":
      views[key] = jnp.mean(v, axis=-1)
    elif view == "weights":
      w = v[..., 0]
      peak = jnp.max(w, axis=(1, 2), keepdims=True)
      views[key] = jnp.where(peak > 0, w / jnp.where(peak > 0, peak, 1.0), 0.0)
    else:  # coord: a_h and a_w are sown under their own names
      module, _, name = key.rpartition("/")
      coord.setdefault(module, {})[name.split(":")[0]] = v
  for module, pair in coord.items():
    if "coord_gate_h" in pair and "coord_gate_w" in pair:
      views[f"{module}/coord_gate"] = jnp.mean(pair["coord_gate_h"] * pair["coord_gate_w"], -1)
  return views


def channel_views(maps: Mapping[str, AttentionMap], k: int = 3) -> dict[str, Array]:
  """The ``k`` most spatially varied channels of every per-channel mask, as (N, h, w) maps.

  A residual attention mask is mixed attention (Wang et al. 2017, sec. 3.3): each channel
  has its own spatial mask, and channels that favour opposite regions average out, so the
  channel mean of :func:`spatial_views` can look flat. Here each mask's channels are
  ranked by their spatial standard deviation, averaged over the images given, and the
  top ``k`` are returned, keyed "<path>[c]" ("stage1_attn1/residual_mask[33]"), most
  varied first. Maps of the "per_channel" view (:func:`view_of`: residual_mask,
  gather_gate, a user kind of shape (N, H, W, C)); the others are left out. The ranking
  is read on the host, so call it outside ``jax.jit``.
  """
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"channel_views needs k >= 1 channels per mask; got {k!r}.")
  views: dict[str, Array] = {}
  for key, m in maps.items():
    if view_of(m) != "per_channel":
      continue
    v = jnp.asarray(m.value).astype(jnp.float32)
    spread = jnp.mean(jnp.std(v, axis=(1, 2)), axis=0)  # (C,)
    # Stable on ties: the lower channel index first.
    for c in np.argsort(-np.asarray(spread), kind="stable")[:k]:
      views[f"{key}[{int(c)}]"] = v[..., int(c)]
  return views


# --------------------------------------------------------------------------- Grad-CAM


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


__all__ = ["AttentionMap", "GATE_KINDS", "KIND_VIEWS", "MAP_KINDS", "PER_CHANNEL_KINDS",
           "SPATIAL_VIEWS", "attention_maps", "by_kind", "by_view", "cam_from_gradients",
           "channel_views", "declared_maps", "features", "grad_cam", "map_kinds",
           "spatial_kinds", "spatial_views", "view_of"]
