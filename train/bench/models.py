"""The models' part of ``python -m train.bench``: each model's compiled training step
(:class:`OurStep`) and its variants, timed round by round beside the others and their
PyTorch twins; one "model" row each (fields: docs/benchmarks.md).
"""

from __future__ import annotations

import re
import resource
import time
from typing import Any, Sequence

import jax
import numpy as np

from train.bench import profile
from train.bench.common import (describe, fmt, interleave, median, mib, model_label,
                                progress, summary, table, variant_name)
from train.bench.torch_ref import TorchStep


def backbone_of(name: str) -> str | None:
  """The registered plain model the attention model ``name`` adds to, or None (backbones,
  models without one)."""
  from attention_flax import models
  match = (re.fullmatch(r"(test_resnet\w*?_tiny)_[a-z]+", name)
           or re.fullmatch(r"(?:se|cbam|eca|gc|sa)_?(resnet\d+d?)", name))
  if match and match.group(1) in models.MODELS and match.group(1) != name:
    return match.group(1)
  return None


def peak_memory() -> tuple[int, str]:
  """(bytes, source): the device's peak in use, or the whole process's peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def xla_memory(compiled: Any) -> int | None:
  """Arguments + outputs + temporaries - aliased bytes of a compiled step, or None."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # Not every backend implements the analysis.
    return None


def sgd_config(model: str, batch: int, dtype: str) -> Any:
  """The trainer's config for a plain SGD run of ``model`` (constant rate, momentum 0.9)."""
  import configs
  config = configs.base_config()
  config.model = model
  config.batch_size = batch
  config.optimizer, config.schedule = "sgd", "constant"
  config.learning_rate, config.momentum, config.weight_decay = 0.1, 0.9, 1e-4
  config.num_train_steps = 1_000_000
  config.half_precision = dtype == "bfloat16"
  return config


class OurStep:
  """One model's compiled ``train.trainer`` step with its state and a fixed random batch.

  ``model_kwargs`` override the registered model's fields (a variant); ``size`` is the
  square input side (None: the model's); ``dtype`` "float32" or "bfloat16".
  """

  def __init__(self, name: str, batch: int, size: int | None, dtype: str, seed: int = 0,
               compiler_options: dict[str, Any] | None = None,
               model_kwargs: dict[str, Any] | None = None):
    from attention_flax import models
    from train import trainer
    entry = models.model_info(name)  # The registry's ValueError for unknown names.
    self.model, self.batch = name, batch
    self.model_kwargs = dict(model_kwargs or {})
    self.name = variant_name(name, self.model_kwargs)
    self.size = size or entry.input_size
    self.num_classes = 10 if entry.input_size <= 64 else 1000
    self.shape = (self.size, self.size, entry.in_channels)
    config = sgd_config(name, batch, dtype)
    config.model_kwargs.update(self.model_kwargs)
    trainer.validate_config(config)
    mesh = trainer.make_mesh()
    model = trainer.build_model(config, self.num_classes)
    self.state = trainer.create_train_state(config, model, jax.random.PRNGKey(seed), self.shape,
                                            mesh=mesh)
    self.params = models.count_params(self.state.params)
    rs = np.random.RandomState(seed)
    self.host_batch = {"image": rs.standard_normal((batch, *self.shape)).astype(np.float32),
                       "label": rs.randint(0, self.num_classes, batch).astype(np.int32)}
    self.batch_arrays = trainer.shard_batch(self.host_batch, mesh)
    self.rng = jax.random.PRNGKey(seed + 1)
    train_fn, _ = trainer.compile_steps(mesh, compiler_options)
    start = time.perf_counter()
    self.compiled = train_fn.lower(self.state, self.batch_arrays, self.rng).compile()
    self.compile_time = time.perf_counter() - start
    self.times: list[float] = []

  def step(self) -> float:
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch_arrays, self.rng)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - start


def _model_and_attention(name: str) -> tuple[Any, Any]:
  """The registered model ``name`` and the class of its attention layer (or None)."""
  from attention_flax import models
  from attention_flax.layers import ATTENTIONS
  model = models.create_model(name, num_classes=10)
  attn = getattr(model, "attn", None)
  if isinstance(attn, str):
    attn = ATTENTIONS.get(attn.lower())
  return model, getattr(attn, "func", attn)  # a functools.partial of a layer class


def _with_attn_kwargs(model: Any, **kwargs: Any) -> dict[str, Any]:
  return {"attn_kwargs": {**dict(getattr(model, "attn_kwargs", None) or {}), **kwargs}}


def folds_gate(name: str) -> bool:
  """Whether the registered model ``name`` is a ResNet whose default block tail folds its
  channel gate into the last batch norm (``attention_flax.ops.tail.foldable``: SE,
  Effective SE, ECA, CBAM)."""
  from attention_flax.ops.tail import foldable
  model, attn = _model_and_attention(name)
  if attn is None or "tail" not in getattr(model, "__dataclass_fields__", {}) or model.tail:
    return False
  norm = getattr(model, "norm", None)
  return foldable(getattr(norm, "func", norm), attn)


def unfolded_kwargs(name: str) -> dict[str, Any] | None:
  """The model_kwargs of ``name`` with its gate applied after the last batch norm, one
  layer after another (``tail=attention_flax.models.common.plain_tail``), or None when
  its blocks fold no gate."""
  from attention_flax.models.common import plain_tail
  return {"tail": plain_tail} if folds_gate(name) else None


def spatial_conv_kwargs(name: str) -> dict[str, Any] | None:
  """The model_kwargs that give the CBAM or spatial gate of ``name`` XLA's convolution
  (``attn_kwargs={"conv": flax.linen.Conv}``, the model's other attn_kwargs kept), or
  None when its attention's ``conv`` is not ``attention_flax.ops.spatial_conv``."""
  from flax import linen as nn
  from attention_flax import ops
  model, attn = _model_and_attention(name)
  field = getattr(attn, "__dataclass_fields__", {}).get("conv")
  if field is None or field.default is not ops.spatial_conv:
    return None
  return _with_attn_kwargs(model, conv=nn.Conv)


def gate_float32_kwargs(name: str) -> dict[str, Any] | None:
  """The model_kwargs that run the attention layers of ``name`` in float32
  (``attn_kwargs={"dtype": "float32"}``), the rest in the run's dtype; None when it has
  no attention layer with a ``dtype``."""
  model, attn = _model_and_attention(name)
  if attn is None or "dtype" not in getattr(attn, "__dataclass_fields__", {}):
    return None
  return _with_attn_kwargs(model, dtype="float32")


def variants(names: Sequence[str], *, dtype: str, unfolded: bool = False,
             xla_spatial_conv: bool = False, gate_float32: bool = False
             ) -> list[tuple[str, dict[str, Any]]]:
  """(model, model_kwargs) to time: each name once (its backbone added before it), then
  the variants the flags ask for."""
  names = list(dict.fromkeys(names))
  for name in list(names):
    base = backbone_of(name)
    if base and base not in names:
      names.insert(names.index(name), base)
  out = []
  for name in names:
    out.append((name, {}))
    extra = [unfolded and unfolded_kwargs(name), xla_spatial_conv and spatial_conv_kwargs(name),
             # Under float32 the variant would be the same program as the default.
             gate_float32 and dtype != "float32" and gate_float32_kwargs(name)]
    out += [(name, kwargs) for kwargs in extra if kwargs]
  return out


def bench_models(names: Sequence[str], *, batch: int, size: int | None, dtype: str,
                 warmup: int, repeats: int, against: str | None,
                 compiler_options: dict[str, Any], unfolded: bool = False,
                 xla_spatial_conv: bool = False, gate_float32: bool = False,
                 profile_steps: int = 0) -> list[dict[str, Any]]:
  """One "model" row per :func:`variants` entry, all timed in interleaved rounds."""
  ours = []
  for name, kwargs in variants(names, dtype=dtype, unfolded=unfolded,
                               xla_spatial_conv=xla_spatial_conv, gate_float32=gate_float32):
    step = OurStep(name, batch, size, dtype, compiler_options=compiler_options,
                   model_kwargs=kwargs)
    # The process's peak after this model's compile and first step (cumulative over models).
    step.step()
    step.peak = peak_memory()
    ours.append(step)
    progress(f"{step.name}: compiled in {step.compile_time:.1f} s")
  twins: dict[str, TorchStep] = {}
  notes: dict[str, str] = {}
  if against == "torch":
    for step in ours:
      if step.model_kwargs:
        continue  # the same PyTorch model as the default variant's
      try:
        twins[step.name] = TorchStep(step.model, step.host_batch, step.num_classes, dtype)
        progress(f"{step.name}: torch first step {twins[step.name].first_step:.1f} s")
      except (ValueError, KeyError, RuntimeError) as err:  # NoTwin is a ValueError
        notes[step.name] = str(err)
        progress(f"{step.name}: {err}")
  interleave([*ours, *twins.values()], warmup, repeats)
  medians = {s.name: median(s.times) for s in ours}
  rows = []
  for s in ours:
    base = backbone_of(s.model)
    row = {"kind": "model", "model": s.model, "model_kwargs": describe(s.model_kwargs),
           "batch": batch, "image_shape": list(s.shape), "dtype": dtype,
           "num_classes": s.num_classes, "params": s.params, **summary(s.times),
           "images_per_second": batch / medians[s.name], "compile_time_s": s.compile_time,
           "peak_memory_bytes": s.peak[0], "peak_memory_source": s.peak[1],
           "xla_memory_bytes": xla_memory(s.compiled), "backbone": base,
           "overhead_vs_backbone": medians[s.name] / medians[base] if base else None}
    if against == "torch":
      row.update(torch_model=None, torch_step_time_median_s=None, torch_step_time_min_s=None,
                 torch_step_time_max_s=None, torch_images_per_second=None,
                 torch_first_step_s=None, throughput_ratio_vs_torch=None,
                 torch_note=notes.get(s.name))
      twin = twins.get(s.name)
      if twin is not None:
        row.update(summary(twin.times, "torch_"), torch_model=twin.description,
                   torch_images_per_second=batch / median(twin.times),
                   torch_first_step_s=twin.first_step)
        row["throughput_ratio_vs_torch"] = (row["images_per_second"]
                                            / row["torch_images_per_second"])
    if profile_steps:
      row["profile"] = profile.profile_step(s, profile_steps)
    rows.append(row)
  return rows


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The "model" rows as a Markdown table's lines (after a blank one)."""
  return table(
      ["model", "batch", "image", "median s (min-max)", "img/s", "compile s", "peak MiB",
       "XLA MiB", "vs backbone", "torch median s", "ours/torch img/s"],
      [[model_label(r), str(r["batch"]), "x".join(map(str, r["image_shape"])),
        f"{r['step_time_median_s']:.4f} ({r['step_time_min_s']:.4f}-"
        f"{r['step_time_max_s']:.4f})", f"{r['images_per_second']:.1f}",
        f"{r['compile_time_s']:.1f}", fmt(mib(r["peak_memory_bytes"]), ".0f"),
        fmt(mib(r["xla_memory_bytes"]), ".0f"), fmt(r["overhead_vs_backbone"]),
        fmt(r.get("torch_step_time_median_s"), ".4f"),
        fmt(r.get("throughput_ratio_vs_torch"))]
       for r in rows if r["kind"] == "model"])
