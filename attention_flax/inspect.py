"""Reading what a model attends to: sown attention maps and stage features.

Every attention layer of ``attention_flax.layers`` sows what it applies into the
``intermediates`` collection and declares those names in its ClassVar ``maps`` (sown
name -> kind); the models sow their stage outputs as ``stage{i}``. :func:`attention_maps`
and :func:`features` run the model once with that collection mutable and return the sown
arrays keyed by their module path ("layer1_0/se/channel_gate"). A layer of your own is
found the same way: declare ``maps = {"my_gate": "channel_gate"}`` on its class (with a
kind of :data:`MAP_KINDS`, or a kind of your own, which is then drawn by its shape; see
:func:`view_of`); no list here needs editing.
Grad-CAM (``grad_cam``, ``cam_from_gradients``) lives in :mod:`attention_flax.grad_cam`,
which builds on this module.
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
# over positions, (N, H, W, 1); "theta" an (N, 2, 3) affine matrix; "image" a warped input;
# "branches" (N, P, C) per-channel weights of P branches (Selective Kernel, split attention);
# "pixel" where each query pixel attends, (N, HW, HW) or (N, heads, H, W, H, W).
KIND_VIEWS: dict[str, str] = {
    "channel_gate": "gate",
    "spatial_mask": "mask",
    "residual_mask": "per_channel",
    "coord_gate": "coord",
    "context_weights": "weights",
    "gather_gate": "per_channel",
    "stn_theta": "theta",
    "stn_output": "image",
    "branch_weights": "branches",
    "pixel_attention": "pixel",
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
# Query pixels of :func:`pixel_views`, as (y, x) fractions of the map: centre, then corners.
QUERY_POINTS = ((0.5, 0.5), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))


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
  """The maps drawn as ``view`` (see :func:`view_of`), order kept: "gate" gives every
  channel gate, a user kind of gate shape too."""
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


def _grid_size(positions: int, image_size: tuple[int, int]) -> tuple[int, int]:
  """The (h, w) with h * w = positions whose aspect is closest to the image's."""
  aspect = image_size[0] / image_size[1]
  pairs = [(h, positions // h) for h in range(1, positions + 1) if positions % h == 0]
  return min(pairs, key=lambda hw: (abs(np.log(hw[0] / hw[1] / aspect)), hw[0]))


def attention_grid(m: AttentionMap, image_size: tuple[int, int]) -> Array:
  """A "pixel" map (:func:`view_of`) as (N, h, w, h, w) float32: [n, qy, qx] is the (h, w)
  map of where query pixel (qy, qx) attends. From (N, h * w, h * w), NonLocal's (rows are
  row-major queries), h x w is the factorisation closest to the aspect of ``image_size``
  (the input's (H, W)); from (N, heads, h, w, h, w), BottleneckAttn's, the head mean."""
  v = jnp.asarray(m.value).astype(jnp.float32)
  if v.ndim == 6:
    return jnp.mean(v, axis=1)
  if v.ndim != 3 or v.shape[1] != v.shape[2]:
    raise ValueError(f"{m.path}: a pixel attention is (N, HW, HW) or (N, heads, H, W, H, W); "
                     f"got shape {tuple(v.shape)}.")
  h, w = _grid_size(int(v.shape[1]), image_size)
  return v.reshape(v.shape[0], h, w, h, w)


def pixel_views(maps: Mapping[str, AttentionMap], image_size: tuple[int, int],
                points: tuple[tuple[float, float], ...] = QUERY_POINTS
                ) -> dict[str, tuple[np.ndarray, Array]]:
  """Where a few query pixels attend, for every map of ``maps`` of the "pixel" view.

  ``image_size`` is the input's (H, W) (see :func:`attention_grid`); ``points`` are the
  queries as (y, x) fractions of the map, rounded to the nearest pixel (default: centre
  and corners). Returns {path: (queries, weights)}: ``queries`` (P, 2) ints (qy, qx) on
  the map's h x w grid, ``weights`` (N, P, h, w) float32, each query's attention row.
  """
  views: dict[str, tuple[np.ndarray, Array]] = {}
  for key, m in maps.items():
    if view_of(m) != "pixel":
      continue
    grid = attention_grid(m, image_size)
    size = np.array(grid.shape[1:3]) - 1
    queries = np.floor(np.asarray(points, np.float64).reshape(-1, 2) * size + 0.5).astype(int)
    views[key] = (queries, grid[:, queries[:, 0], queries[:, 1]])
  return views


__all__ = ["AttentionMap", "GATE_KINDS", "KIND_VIEWS", "MAP_KINDS", "PER_CHANNEL_KINDS",
           "QUERY_POINTS", "SPATIAL_VIEWS", "attention_grid", "attention_maps", "by_kind",
           "by_view", "channel_views", "declared_maps", "features", "map_kinds", "pixel_views", "spatial_kinds", "spatial_views", "view_of"]
