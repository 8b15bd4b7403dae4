"""PyTorch / timm ResNet weights -> Flax variables of ``attention_flax.models``.

The architectures are those of the timm ResNet family (Wightman, "PyTorch Image Models",
https://github.com/huggingface/pytorch-image-models): He et al., "Deep Residual Learning
for Image Recognition", https://arxiv.org/abs/1512.03385, with SE
(https://arxiv.org/abs/1709.01507), ECA (https://arxiv.org/abs/1910.03151) or CBAM
(https://arxiv.org/abs/1807.06521) blocks and the ResNet-D tricks
(https://arxiv.org/abs/1812.01187); timm's self-attention ResNets (BoTNet, HaloNet,
Lambda-ResNet: :mod:`attention_flax.models.byoanet`) convert by the same rules.

``from_timm(name, state_dict)`` maps every tensor of a timm state dict onto the variable
tree of the matching Flax model, which it builds without running it
(``jax.eval_shape``); ``load_pretrained(name, path)`` reads the state dict from a
``.safetensors`` or a PyTorch ``.pth``/``.bin`` file first. Nothing here touches the
network: download a file yourself, then load it.

How names and layouts map (timm key -> Flax path):

* module names: timm's dots between a name and an index become underscores
  (``layer1.0.conv1`` -> ``layer1_0/conv1``, ``conv1.0`` -> ``conv1_0``,
  ``downsample.1`` -> ``downsample_1``); CBAM's spatial ``conv.conv``/``conv.bn`` are
  ``spatial/conv``/``spatial/bn``.
* convolution ``weight`` (O, I, kh, kw) -> ``kernel`` (kh, kw, I, O); ECA's ``Conv1d``
  weight (1, 1, k) -> ``kernel`` (k, 1, 1); the lambda layer's ``Conv3d`` weight
  (O, 1, r, r, 1) -> ``kernel`` (r, r, 1, O).
* the self-attention layers' position tables (``height_rel``, ``width_rel``, ``pos_emb``)
  copy unchanged; the self-attention ResNets' classifier is ``head.fc`` (``head/fc``).
* 1x1 convolutions of the attention layers (O, I, 1, 1) and the classifier ``fc.weight``
  (O, I) -> ``nn.Dense`` ``kernel`` (I, O).
* BatchNorm ``weight``/``bias`` -> params ``scale``/``bias``; ``running_mean``/
  ``running_var`` -> batch_stats ``mean``/``var``; ``num_batches_tracked`` is ignored.

The models are built with :class:`~attention_flax.layers.norm.TorchBatchNorm` in their
residual trunk, and the batch norms inside the attention layers (CBAM's spatial gate) use
it by default, so that training continues with PyTorch's running-variance rule everywhere.
"""

from __future__ import annotations

import functools
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.models import create_model, model_info

# timm model name -> registered Flax model. CBAM ResNets are timm's ``ResNet`` with
# ``block_args=dict(attn_layer="cbam")`` (timm registers no pretrained CBAM ResNet).
TIMM_MODELS: dict[str, str] = {
    name: name for name in (
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50d",
        "seresnet18", "seresnet34", "seresnet50", "seresnet101", "seresnet152",
        "ecaresnet50d", "cbam_resnet18", "cbam_resnet50",
        "resnest14d", "resnest26d", "resnest50d",
        "skresnet18", "skresnet34", "skresnext50_32x4d",
        "botnet26t_256", "halonet26t", "lambda_resnet26t")
}

_PARITY_EXTRA = "pip install 'attention_flax[parity]'"
_INDEXED = re.compile(r"([A-Za-z]+\d*)_(\d+)")


def list_timm_models() -> list[str]:
  """The timm model names :func:`from_timm` and :func:`load_pretrained` accept."""
  return sorted(TIMM_MODELS)


def _resolve_name(name: str) -> str:
  """``"resnet50"``, ``"timm/resnet50.a1_in1k"`` -> ``"resnet50"``; ValueError if unknown."""
  if not isinstance(name, str):
    raise TypeError(f"name must be a timm model name (str), got {type(name).__name__}.")
  base = name.split("/")[-1].split(".")[0].lower()
  if base not in TIMM_MODELS:
    raise ValueError(f"Unsupported timm model {name!r}; supported names: "
                     f"{', '.join(list_timm_models())}.")
  return TIMM_MODELS[base]


def _to_numpy(value: Any, key: str) -> np.ndarray:
  """A numpy array from a numpy array or a torch tensor (bfloat16 widened to float32)."""
  if hasattr(value, "detach"):  # a torch tensor; torch itself need not be imported here
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      value = value.float()
    # A copy: the tensor's memory must not alias the Flax variables, or PyTorch's
    # in-place updates (running statistics, optimiser steps) would leak into them.
    return value.numpy().copy()
  try:
    return np.asarray(value)
  except Exception as err:  # noqa: BLE001 - reported with the offending key
    raise TypeError(f"State dict entry {key!r} is not an array: {type(value).__name__}.") from err


def _timm_key(path: tuple[str, ...]) -> str:
  """The timm state-dict key of one Flax variable, given (collection, *modules, leaf)."""
  collection, *modules, leaf = path
  names = [_INDEXED.sub(r"\1.\2", m) if _INDEXED.fullmatch(m) else m for m in modules]
  if len(names) >= 2 and names[-2] == "spatial" and names[-1] in ("conv", "bn"):
    # timm's CBAM spatial gate is a ConvNormAct: `spatial.conv.conv` and `spatial.conv.bn`.
    names = names[:-1] + ["conv", names[-1]]
  if collection == "batch_stats":
    tail = {"mean": "running_mean", "var": "running_var"}[leaf]
  else:
    # Position tables of the self-attention layers keep their names.
    tail = {"kernel": "weight", "scale": "weight", "bias": "bias", "height_rel": "height_rel",
            "width_rel": "width_rel", "pos_emb": "pos_emb"}[leaf]
  return ".".join(names + [tail])


def _torch_shape(flax_shape: tuple[int, ...], leaf: str, is_classifier: bool) -> tuple[int, ...]:
  """The shape the timm tensor of a Flax variable must have."""
  if leaf != "kernel":
    return flax_shape
  if len(flax_shape) == 4:  # (kh, kw, I, O) <- (O, I, kh, kw)
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if len(flax_shape) == 3:  # ECA (k, I, O) <- Conv1d (O, I, k)
    k, i, o = flax_shape
    return (o, i, k)
  i, o = flax_shape  # Dense (I, O) <- Linear (O, I) or 1x1 conv (O, I, 1, 1)
  return (o, i) if is_classifier else (o, i, 1, 1)


def _to_flax(tensor: np.ndarray, flax_shape: tuple[int, ...], leaf: str) -> np.ndarray:
  """Rearranges a timm tensor into the Flax layout of ``flax_shape``."""
  if leaf != "kernel":
    return tensor
  if tensor.ndim == 4 and len(flax_shape) == 4:
    return tensor.transpose(2, 3, 1, 0)
  if tensor.ndim == 3:
    return tensor.transpose(2, 1, 0)
  return tensor.reshape(tensor.shape[0], tensor.shape[1]).T


def _num_classes(state: Mapping[str, np.ndarray]) -> int:
  # timm's ResNets keep the classifier in "fc", its ByobNet family in "head.fc".
  weight = state.get("fc.weight", state.get("head.fc.weight"))
  if weight is None or weight.ndim != 2:
    raise ValueError(
        "Cannot infer num_classes: the state dict needs a classifier 'fc.weight' of shape "
        f"(num_classes, features); got {None if weight is None else weight.shape}. "
        "Pass a timm ResNet state dict with its head (not a features-only one).")
  return int(weight.shape[0])


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat: dict[tuple[str, ...], Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def convert_variables(abstract: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                      linear: Sequence[tuple[str, ...]] = (), what: str = "the module"
                      ) -> dict[str, Any]:
  """Maps a timm/PyTorch state dict onto a Flax variable tree of known shapes.

  Args:
    abstract: the target tree, e.g. ``jax.eval_shape(module.init, key, x)``: collections
      ``params`` and ``batch_stats`` of arrays or ``jax.ShapeDtypeStruct``s.
    state_dict: PyTorch key -> array (numpy or torch); ``num_batches_tracked`` ignored.
    linear: module paths (e.g. ``("fc",)``) whose Dense kernels come from ``nn.Linear``
      weights (O, I); every other Dense kernel comes from a 1x1 conv weight (O, I, 1, 1).
    what: how error messages name the target.

  Returns:
    The variables: every leaf of ``abstract`` filled once, in its dtype.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped tensor.
  """
  state = {k: _to_numpy(v, k) for k, v in state_dict.items()
           if not k.endswith("num_batches_tracked")}
  linear = {tuple(p) for p in linear}
  # Only learned state converts; `intermediates` (sown masks) and the like are not weights.
  targets = _flatten({c: v for c, v in dict(abstract).items()
                      if c in ("params", "batch_stats")})
  converted: dict[tuple[str, ...], jax.Array] = {}
  used: dict[str, tuple[str, ...]] = {}
  missing, misshaped = [], []
  for path, target in targets.items():
    key = _timm_key(path)
    if key in used:  # the mapping must be one-to-one; a clash is a bug in this module
      raise RuntimeError(f"Flax variables {used[key]} and {path} both map to {key!r}.")
    used[key] = path
    if key not in state:
      missing.append(key)
      continue
    leaf = path[-1]
    want = _torch_shape(tuple(target.shape), leaf, path[1:-1] in linear)
    tensor = state[key]
    if leaf == "kernel" and len(want) == 4 and tensor.shape == want + (1,):
      tensor = tensor[..., 0]  # a Conv3d (O, I, kh, kw, 1) that is a 2-D conv (lambda's)
    if tuple(tensor.shape) != want:
      misshaped.append(f"{key}: expected {want}, got {tuple(tensor.shape)}")
      continue
    # jnp.array copies; jnp.asarray may alias host memory on CPU.
    converted[path] = jnp.array(_to_flax(tensor, tuple(target.shape), leaf),
                                dtype=target.dtype)
  unexpected = sorted(set(state) - set(used))
  if missing or unexpected or misshaped:
    problems = []
    if missing:
      problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
      problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if misshaped:
      problems.append(f"mis-shaped {len(misshaped)}: {'; '.join(misshaped)}")
    raise ValueError(f"State dict does not fit {what} -- " + " | ".join(problems)
                     + ". Check that the weights belong to this architecture.")
  return _unflatten(converted)


def _strip_wrapper(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """``state_dict`` without the ``module.`` (``nn.DataParallel``) or ``_orig_mod.``
  (``torch.compile``) prefix that every key of a wrapped model's state dict carries; a
  warning names the prefix removed."""
  for prefix in ("module.", "_orig_mod."):
    if state_dict and all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
      warnings.warn(f"Every state dict key starts with {prefix!r} (a wrapped model's "
                    "state dict); the prefix was removed.", stacklevel=3)
      return _strip_wrapper({k[len(prefix):]: v for k, v in state_dict.items()})
  return state_dict


def from_timm(name: str, state_dict: Mapping[str, Any], **overrides: Any
              ) -> tuple[nn.Module, dict[str, Any]]:
  """Builds the Flax model of timm's ``name`` and its variables from ``state_dict``.

  Args:
    name: a timm model name from :func:`list_timm_models` (a pretrained tag such as
      ``"resnet50.a1_in1k"`` or a ``"timm/"`` prefix is accepted and ignored).
    state_dict: timm key -> array (numpy array or torch tensor).
    **overrides: further model fields (e.g. ``dtype=jnp.bfloat16``); ``norm`` defaults
      to :class:`TorchBatchNorm` and ``num_classes`` comes from ``fc.weight``.

  Returns:
    ``(model, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``
    ready for ``model.apply(variables, images)`` on (N, H, W, 3) images.

  Raises:
    ValueError: unknown name, or tensors missing, unexpected or mis-shaped (all listed).
  """
  model_name = _resolve_name(name)
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"state_dict must be a mapping of names to arrays, got "
                    f"{type(state_dict).__name__}.")
  state = {k: _to_numpy(v, k) for k, v in _strip_wrapper(state_dict).items()
           if not k.endswith("num_batches_tracked")}  # converted once, up front
  if "num_classes" in overrides:
    raise ValueError("num_classes is read from 'fc.weight'; do not pass it.")
  overrides.setdefault("norm", TorchBatchNorm)
  model = create_model(model_name, num_classes=_num_classes(state), **overrides)
  size = model_info(model_name).input_size  # valid for every model (fixed-size ones too)
  abstract = _abstract_variables(model, (1, size, size, 3))
  return model, convert_variables(abstract, state, linear=(("fc",), ("head", "fc")),
                                  what=f"timm {model_name!r}")


@functools.lru_cache(maxsize=32)
def _cached_abstract_variables(model: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def _abstract_variables(model: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
  """The variable shapes of ``model`` on an input of ``shape``, traced once per distinct
  model (tracing a ResNet-152 takes seconds; the result is a small tree of
  ``ShapeDtypeStruct``s). The shape must be one the model takes: BoTNet's position tables
  are sized by it, HaloNet needs multiples of its blocks."""
  try:
    hash(model)
  except TypeError:  # an unhashable field (e.g. an attn_kwargs dict): trace every time
    return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct(shape, jnp.float32))
  return _cached_abstract_variables(model, shape)


def _widen_to_numpy(value: jax.Array) -> np.ndarray:
  """A numpy array; floating types numpy lacks (bfloat16, float8) become float32."""
  if jnp.issubdtype(value.dtype, jnp.floating) and value.dtype not in (
      np.float16, np.float32, np.float64):
    value = value.astype(jnp.float32)
  return np.asarray(value)


def _one_line(err: BaseException, limit: int = 160) -> str:
  text = " ".join(str(err).split()) or type(err).__name__
  return text if len(text) <= limit else text[:limit] + "..."


def _read_state_dict(path: Path) -> Mapping[str, Any]:
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    try:
      from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
    except ImportError as err:
      raise ImportError(f"Reading .safetensors needs the safetensors package: "
                        f"{_PARITY_EXTRA}.") from err
    try:
      try:
        return st_numpy.load_file(str(path))
      except TypeError:
        # numpy has no bfloat16 (nor float8): such files are read as JAX arrays, which have
        # these types, and widened to float32 as the torch path does.
        from safetensors import flax as st_flax  # pylint: disable=import-outside-toplevel
        return {k: _widen_to_numpy(v) for k, v in st_flax.load_file(str(path)).items()}
    except (FileNotFoundError, ImportError):
      raise
    except Exception as err:  # safetensors' own SafetensorError, or an OSError
      raise ValueError(f"Cannot read {str(path)!r} as .safetensors ({_one_line(err)}): the "
                       "file is cut short or not a safetensors file; download it again.") from err
  if suffix in (".pth", ".pt", ".bin"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
      raise ImportError(f"Reading PyTorch {suffix} files needs torch: {_PARITY_EXTRA} "
                        "(or convert the file to .safetensors).") from err
    # weights_only: tensors and plain containers only, never arbitrary pickled objects.
    try:
      state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
      raise
    except pickle.UnpicklingError as err:  # an object other than tensors and containers
      found = re.search(r"GLOBAL ([\w.]+)", str(err))
      raise ValueError(
          f"{str(path)!r} is not a state dict: it pickles "
          f"{found.group(1) if found else 'a Python object'}, which torch.load("
          "weights_only=True) refuses to run. If it is a whole model saved with "
          "torch.save(model), save its weights instead: torch.save(model.state_dict(), "
          "PATH).") from err
    except Exception as err:  # a truncated or foreign file: torch raises many types
      raise ValueError(f"Cannot read {str(path)!r} as a PyTorch file ({_one_line(err)}): "
                       "the file is cut short or not a torch.save file; download it "
                       "again.") from err
    for wrapper in ("state_dict", "model"):
      if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
        state = state[wrapper]
        break
    return state
  raise ValueError(f"Unknown weights file type {suffix!r} for {str(path)!r}; use a "
                   ".safetensors file (preferred) or a PyTorch .pth/.pt/.bin state dict.")


def load_pretrained(name: str, path: str | Path, **overrides: Any
                    ) -> tuple[nn.Module, dict[str, Any]]:
  """``from_timm(name, <state dict read from path>)``.

  ``path`` is a ``.safetensors`` file (read with ``safetensors.numpy``) or a PyTorch
  ``.pth``/``.pt``/``.bin`` file (read with ``torch.load(..., weights_only=True)``; a
  top-level ``"state_dict"`` or ``"model"`` entry is unwrapped). Raises ValueError for
  another suffix and FileNotFoundError for a missing file.
  """
  _resolve_name(name)  # fail on a bad name before reading a large file
  path = Path(path)
  if path.suffix.lower() not in (".safetensors", ".pth", ".pt", ".bin"):
    _read_state_dict(path)  # raises the suffix error
  if not path.is_file():
    raise FileNotFoundError(f"No weights file at {str(path)!r}; download it first "
                            "(this library never fetches files).")
  state_dict = _read_state_dict(path)
  try:
    return from_timm(name, state_dict, **overrides)
  except (ValueError, TypeError) as err:  # name the file: the user may hold several
    raise type(err)(f"{str(path)!r}: {err}") from err


__all__ = ["TIMM_MODELS", "convert_variables", "from_timm", "list_timm_models", "load_pretrained"]
