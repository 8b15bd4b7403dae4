"""The models' side of ``train.bench``: each model's jitted training step with its state
and a fixed random batch (:class:`OurStep`), timed round by round beside the others and,
with ``--against=torch``, beside their PyTorch twins (:func:`bench_models`), one JSON row
per model (fields: ``train/bench.py``'s docstring).
"""

from __future__ import annotations

import re
import resource
import statistics
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from train import bench_profile
from train.bench_torch import TorchStep


def backbone_of(name: str) -> str | None:
  """The plain model an attention model adds to (None for backbones / no twin)."""
  from attention_flax import models
  match = (re.fullmatch(r"(test_resnet\w*?_tiny)_[a-z]+", name)
           or re.fullmatch(r"(?:se|cbam|eca|gc|sa)_?(resnet\d+d?)", name))
  if match and match.group(1) in models.MODELS and match.group(1) != name:
    return match.group(1)
  return None


def _peak_memory() -> tuple[int, str]:
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def _xla_memory(compiled: Any) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # Not every backend implements the analysis.
    return None


def _summary(times: Sequence[float], prefix: str = "") -> dict[str, float]:
  return {f"{prefix}step_time_median_s": statistics.median(times),
          f"{prefix}step_time_min_s": min(times), f"{prefix}step_time_max_s": max(times)}


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
  """One model's compiled train step with its state and a fixed random batch."""

  def __init__(self, name: str, batch: int, size: int | None, dtype: str, seed: int = 0,
               compiler_options: dict[str, Any] | None = None,
               model_kwargs: dict[str, Any] | None = None):
    from attention_flax import models
    from train import trainer
    entry = models.model_info(name)  # The registry's ValueError for unknown names.
    self.model, self.batch = name, batch
    self.model_kwargs = dict(model_kwargs or {})
    self.name = name + "".join(f":{k}={v}" for k, v in sorted(self.model_kwargs.items()))
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


def folds_gate(name: str) -> bool:
  """Whether the registered model ``name`` is a ResNet whose blocks fold a channel gate
  into their last batch norm (``fold_gate``: SE, Effective SE, ECA, CBAM)."""
  model, attn = _model_and_attention(name)
  if not hasattr(model, "fold_gate"):
    return False
  return bool(getattr(attn, "gates_from_mean", False)
              or getattr(attn, "gates_from_mean_and_max", False))


def spatial_conv_kwargs(name: str) -> dict[str, Any] | None:
  """The model_kwargs that give the registered model ``name`` XLA's convolution in its
  CBAM or spatial gate (``conv_impl="xla"``), or None when it has no such gate."""
  model, attn = _model_and_attention(name)
  if "conv_impl" not in getattr(attn, "__dataclass_fields__", {}):
    return None
  return {"attn_kwargs": {**dict(getattr(model, "attn_kwargs", None) or {}),
                          "conv_impl": "xla"}}


def gate_float32_kwargs(name: str) -> dict[str, Any] | None:
  """The model_kwargs that run the attention layers of the registered ResNet ``name`` in
  float32 (``attn_kwargs={"dtype": "float32"}``: their small dense or 1-D layers, with
  float32 parameters used as they are) while the rest of the model keeps the run's dtype;
  None when it has no attention layer."""
  model, attn = _model_and_attention(name)
  if attn is None or "dtype" not in getattr(attn, "__dataclass_fields__", {}):
    return None
  return {"attn_kwargs": {**dict(getattr(model, "attn_kwargs", None) or {}),
                          "dtype": "float32"}}


def _progress(message: str) -> None:
  """A line on stderr as each model is ready: long runs show where they are."""
  print(f"train.bench: {message}", file=sys.stderr, flush=True)


def _interleave(steps: Sequence[Any], warmup: int, repeats: int) -> None:
  for _ in range(warmup):
    for s in steps:
      s.step()
  for _ in range(repeats):
    for s in steps:
      s.times.append(s.step())


def bench_models(names: Sequence[str], *, batch: int, size: int | None, dtype: str,
                 warmup: int, repeats: int, against: str | None,
                 compiler_options: dict[str, Any],
                 unfolded: bool = False, xla_spatial_conv: bool = False,
                 gate_float32: bool = False,
                 profile_steps: int = 0) -> list[dict[str, Any]]:
  """One "model" row per name (backbones added); see the module docstring."""
  names = list(dict.fromkeys(names))
  for name in list(names):
    base = backbone_of(name)
    if base and base not in names:
      names.insert(names.index(name), base)
  variants = []
  for name in names:
    variants.append((name, {}))
    if unfolded and folds_gate(name):
      variants.append((name, {"fold_gate": False}))
    if xla_spatial_conv and (kwargs := spatial_conv_kwargs(name)):
      variants.append((name, kwargs))
    # Under float32 the variant would be the same program as the default.
    if gate_float32 and dtype != "float32" and (kwargs := gate_float32_kwargs(name)):
      variants.append((name, kwargs))
  ours, rows = [], []
  for name, kwargs in variants:
    step = OurStep(name, batch, size, dtype, compiler_options=compiler_options,
                   model_kwargs=kwargs)
    # The process's peak after this model's compile and first step (cumulative over models).
    step.step()
    step.peak = _peak_memory()
    ours.append(step)
    _progress(f"{step.name}: compiled in {step.compile_time:.1f} s")
  twins: dict[str, Any] = {}
  notes: dict[str, str] = {}
  if against == "torch":
    for step in ours:
      if step.model_kwargs:
        continue  # the same PyTorch model as the default variant's
      try:
        twins[step.name] = TorchStep(step, dtype)
        _progress(f"{step.name}: torch first step {twins[step.name].first_step:.1f} s")
      except (ValueError, KeyError, RuntimeError) as err:
        notes[step.name] = str(err)
  _interleave([*ours, *twins.values()], warmup, repeats)
  medians = {s.name: statistics.median(s.times) for s in ours}
  for s in ours:
    base = backbone_of(s.model)
    row = {"kind": "model", "model": s.model, "model_kwargs": s.model_kwargs, "batch": batch,
           "image_shape": list(s.shape),
           "dtype": dtype, "num_classes": s.num_classes, "params": s.params,
           **_summary(s.times), "images_per_second": batch / medians[s.name],
           "compile_time_s": s.compile_time, "peak_memory_bytes": s.peak[0],
           "peak_memory_source": s.peak[1], "xla_memory_bytes": _xla_memory(s.compiled),
           "backbone": base,
           "overhead_vs_backbone": medians[s.name] / medians[base] if base else None}
    if against == "torch":
      twin = twins.get(s.name)
      row.update(torch_model=None, torch_step_time_median_s=None, torch_step_time_min_s=None,
                 torch_step_time_max_s=None, torch_images_per_second=None,
                 torch_first_step_s=None, throughput_ratio_vs_torch=None,
                 torch_note=notes.get(s.name))
      if twin is not None:
        row.update(_summary(twin.times, "torch_"), torch_model=twin.description,
                   torch_images_per_second=batch / statistics.median(twin.times),
                   torch_first_step_s=twin.first_step)
        row["throughput_ratio_vs_torch"] = (row["images_per_second"]
                                            / row["torch_images_per_second"])
    if profile_steps:
      row["profile"] = bench_profile.profile_step(s, profile_steps)
    rows.append(row)
  return rows
