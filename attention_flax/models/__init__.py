"""Image classifiers built from the attention layers, and their registry.

``MODELS`` is one plain dict, name -> :class:`ModelEntry`, merged from the family files
(``resnet``, ``residual_attention``, ``stn``). ``create_model("seresnet50", num_classes=10)``
builds a model; ``list_models("*resnet*")`` lists names; ``count_params`` and ``flops``
measure one without running it (abstract shapes only). ``model.clone(**plain_factories(model))``
is the same model built from plain Flax only.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from attention_flax import sampling
from attention_flax.layers import ATTENTIONS
from attention_flax.models import residual_attention, resnet, sknet, stn
from attention_flax.models import bam_resnet
from attention_flax.models import resnest
from attention_flax.models import byoanet
from attention_flax.models import ram
from attention_flax.models.common import ModelEntry, plain_tail
from attention_flax.models.resnet import BasicBlock, Bottleneck, ResNet


def _merge(*tables: Mapping[str, ModelEntry]) -> dict[str, ModelEntry]:
  merged: dict[str, ModelEntry] = {}
  for table in tables:
    clash = sorted(set(merged) & set(table))
    if clash:
      raise RuntimeError(f"Model names registered twice: {clash}.")
    merged.update(table)
  return merged


MODELS: dict[str, ModelEntry] = _merge(resnet.MODELS, residual_attention.MODELS, stn.MODELS,
                                        resnest.MODELS,
                                        sknet.MODELS,
                                        bam_resnet.MODELS,
                                        byoanet.MODELS,
                                        ram.MODELS)


def list_models(pattern: str = "*", include_test: bool = False) -> list[str]:
  """Registered names matching the shell-style ``pattern`` (e.g. "se*"), sorted.

  Tiny test-only variants are left out unless ``include_test``.
  """
  return sorted(name for name, entry in MODELS.items()
                if fnmatch.fnmatchcase(name, pattern.lower())
                and (include_test or not entry.test_only))


def model_info(name: str) -> ModelEntry:
  """The registry entry of ``name``; ValueError naming close matches when unknown."""
  if name in MODELS:
    return MODELS[name]
  close = difflib.get_close_matches(str(name), list(MODELS), n=5, cutoff=0.6)
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  raise ValueError(f"Unknown model {name!r}.{hint} Call list_models() for all names.")


def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
  """Builds the registered model ``name`` with ``num_classes`` logits.

  ``overrides`` set any other field of the model (``dtype``, ``attn``, ``down``, ...).
  """
  return model_info(name).factory(num_classes=num_classes, **overrides)


# The plain-Flax value of each factory field a model or layer may have.
PLAIN_FACTORIES: dict[str, Any] = {"conv": nn.Conv, "pool": nn.max_pool, "tail": plain_tail,
                                   "sampler": sampling.grid_sample}


def _field_names(factory: Any) -> set[str]:
  """The dataclass fields of a module, module class or ``functools.partial`` of one."""
  while isinstance(factory, functools.partial):
    factory = factory.func
  cls = factory if isinstance(factory, type) else type(factory)
  return set(getattr(cls, "__dataclass_fields__", ()))


def plain_factories(model: nn.Module) -> dict[str, Any]:
  """Field overrides that build ``model`` from plain Flax alone, for ``model.clone(**...)``.

  Every field among ``conv``, ``pool``, ``tail``, ``sampler`` the model has gets its plain
  counterpart (``flax.linen.Conv``, ``flax.linen.max_pool``,
  :func:`~attention_flax.models.common.plain_tail`,
  :func:`attention_flax.sampling.grid_sample`); an attention layer (``attn``) with such
  fields gets them through ``attn_kwargs``. The values and the parameter tree are the
  default model's (to float rounding); without :mod:`attention_flax.ops`' fast paths the
  model is differentiable in every mode (``jax.jvp``, ``jax.jacfwd``), which the default
  CBAM tail and convolution are not. A ``backbone`` factory (``STNClassifier``,
  which passes it its ``conv``) is wrapped to take the plain ``pool`` and ``tail`` too.
  """
  fields = _field_names(model)
  plain = {k: v for k, v in PLAIN_FACTORIES.items() if k in fields}
  attn = getattr(model, "attn", None)
  if "attn_kwargs" in fields and attn is not None:
    layer = ATTENTIONS.get(attn.lower()) if isinstance(attn, str) else attn
    extra = {k: v for k, v in PLAIN_FACTORIES.items() if k in _field_names(layer)}
    if extra:
      plain["attn_kwargs"] = {**(model.attn_kwargs or {}), **extra}
  if "backbone" in fields:
    inner = {k: v for k, v in PLAIN_FACTORIES.items()
             if k != "conv" and k in _field_names(model.backbone)}
    if inner:
      plain["backbone"] = functools.partial(model.backbone, **inner)
  return plain


def count_params(variables: Any) -> int:
  """Number of parameters: the "params" collection if present, else every leaf.

  Works on concrete arrays and on ``jax.ShapeDtypeStruct`` trees from ``jax.eval_shape``.
  """
  if isinstance(variables, Mapping) and "params" in variables:
    variables = variables["params"]
  return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(variables))


def flops(model: nn.Module, input_shape: Sequence[int], dtype: Any = jnp.float32
          ) -> float | None:
  """GFLOPs of one inference forward pass on an (N, H, W, C) input, from the compiler's cost model.

  Nothing runs: variables come from ``jax.eval_shape`` and the jitted apply is only lowered
  and compiled. The compiler counts a multiply-add as 2 FLOPs (ResNet-50 at 224: about 8.2 GFLOPs
  for the papers' 4.1 "GFLOPs", which are multiply-adds). Returns None when the backend
  reports no cost.
  """
  shape = tuple(int(s) for s in input_shape)
  if len(shape) != 4:
    raise ValueError(f"input_shape must be (N, H, W, C), e.g. (1, 224, 224, 3); got {shape}.")
  x = jax.ShapeDtypeStruct(shape, dtype)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  compiled = jax.jit(lambda v, inputs: model.apply(v, inputs)).lower(variables, x).compile()
  costs = compiled.cost_analysis()
  if isinstance(costs, Mapping):
    costs = [costs]
  total = sum(float(c.get("flops", 0.0)) for c in (costs or []) if c)
  return total / 1e9 if total > 0 else None


__all__ = [
    "BasicBlock", "Bottleneck", "MODELS", "ModelEntry", "PLAIN_FACTORIES", "ResNet",
    "count_params", "create_model", "flops", "list_models", "model_info", "plain_factories",
]
