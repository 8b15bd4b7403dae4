"""What every part of ``python -m train.bench`` shares: timing summaries, rounds
interleaved over several steps, number and Markdown formatting, PyTorch's device, JSON.

A "step" here is any object with ``step() -> seconds`` and a ``times`` list; the leaves
(models, conv, sampler, pipeline, profile, torch_ref) import this module and nothing else
of the benchmark, except the PyTorch twins in :mod:`train.bench.torch_ref`.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import jax


class Step(Protocol):
  """What :func:`interleave` times: ``step()`` runs once and returns its seconds."""
  times: list[float]

  def step(self) -> float: ...


def median(times: Sequence[float]) -> float:
  return float(statistics.median(times))


def summary(times: Sequence[float], prefix: str = "") -> dict[str, float]:
  """``{prefix}step_time_median_s``, ``..._min_s`` and ``..._max_s`` of ``times``."""
  return {f"{prefix}step_time_median_s": median(times),
          f"{prefix}step_time_min_s": min(times), f"{prefix}step_time_max_s": max(times)}


def interleave(steps: Sequence[Step], warmup: int, repeats: int) -> None:
  """Runs every step once per round, ``warmup`` rounds unrecorded, then ``repeats`` rounds
  appended to each step's ``times``: a burst of load from elsewhere hits all alike."""
  for _ in range(warmup):
    for s in steps:
      s.step()
  for _ in range(repeats):
    for s in steps:
      s.times.append(s.step())


def time_call(fn: Callable[..., Any], *args: Any) -> float:
  """Seconds of ``fn(*args)``, its (JAX) outputs blocked on."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


class CallStep:
  """A :class:`Step` that calls ``fn(*args)`` (outputs blocked on)."""

  def __init__(self, fn: Callable[..., Any], *args: Any):
    self.fn, self.args, self.times = fn, args, []

  def step(self) -> float:
    return time_call(self.fn, *self.args)


def fmt(value: float | None, spec: str = ".3f") -> str:
  """``value`` formatted with ``spec``, "-" for None."""
  return "-" if value is None else format(value, spec)


def mib(num_bytes: float | None) -> float | None:
  return None if num_bytes is None else num_bytes / 2**20


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  """A Markdown table's lines after a blank one; [] when there are no rows."""
  rows = list(rows)
  if not rows:
    return []
  line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
  return ["", line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def describe(value: Any) -> Any:
  """A JSON-safe copy of ``value``: classes and functions as their dotted names
  (``flax.linen.linear.Conv``), mappings and sequences element by element."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, Mapping):
    return {str(k): describe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [describe(v) for v in value]
  if isinstance(value, functools.partial):
    return f"partial({describe(value.func)})"
  if hasattr(value, "__qualname__") and hasattr(value, "__module__"):
    return f"{value.__module__}.{value.__qualname__}"
  return repr(value)


def variant_name(model: str, model_kwargs: Mapping[str, Any] | None, sep: str = ":") -> str:
  """The model's name and its variant's ``model_kwargs`` (described), e.g.
  ``seresnet50:tail=attention_flax.models.common.plain_tail``."""
  kwargs = describe(dict(model_kwargs or {}))
  return model + "".join(f"{sep}{k}={v}" for k, v in sorted(kwargs.items()))


def model_label(row: Mapping[str, Any]) -> str:
  """A model row's name in the tables: the model, then ``(key=value)`` per model_kwargs."""
  kwargs = row.get("model_kwargs") or {}
  return row["model"] + "".join(f" ({k}={v})" for k, v in sorted(kwargs.items()))


def cores() -> int:
  """The CPU cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def progress(message: str) -> None:
  """A line on stderr, so that a long run shows where it is."""
  print(f"train.bench: {message}", file=sys.stderr, flush=True)


def torch_device() -> str:
  """"cuda" when PyTorch sees a GPU, else "cpu": the twins run where torch runs best."""
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
  """Waits for queued GPU work, so that host clocks time it (no-op on CPU)."""
  if device == "cuda":
    import torch
    torch.cuda.synchronize()


def write_json(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """``rows`` as an indented JSON list at ``path`` (its folder made if missing)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(list(rows), f, indent=1)
