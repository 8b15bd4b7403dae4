"""Where a train step's time goes (``python -m train.bench --profile``): a few more steps
of each model traced with ``jax.profiler``, the XLA operations of the trace (events with
an ``hlo_op`` statistic, from the device planes, else the host's) summed per step by kind
and by name. The fields of a row's ``profile``: docs/benchmarks.md.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from typing import Any, Sequence

import jax

from train.bench.common import model_label, table

KINDS = ("convolution", "matmul", "fusion", "copy", "memset", "other")
_CONV = ("xmma", "cudnn", "implicit_gemm", "convolve_common", "nhwcaddpadding", "nchwtonhwc",
         "nhwctonchw", "convolution", "conv_general_dilated")
_MATMUL = ("nvjet", "gemm", "dot", "cublas")


def kind_of(name: str) -> str:
  """The kind (:data:`KINDS`) of an event named ``name``: a GPU kernel's or an XLA op's."""
  lower = name.lower()
  if lower.startswith("memset"):
    return "memset"
  if "memcpy" in lower or lower.startswith("copy"):
    return "copy"
  if any(key in lower for key in _CONV):
    return "convolution"
  if any(key in lower for key in _MATMUL):
    return "matmul"
  if "fusion" in lower or lower.startswith(("wrapped_", "transpose", "reduce")):
    return "fusion"
  return "other"


def stem(name: str) -> str:
  """``name`` without XLA's instance number (``loop_add_fusion.12`` -> ``loop_add_fusion``)."""
  return re.sub(r"[._]\d+$", "", name.strip())


def _events(path: str) -> list[tuple[str, float, float]]:
  """(name, start in ns, duration in ns) of every event with an ``hlo_op`` statistic, from
  the device planes if the trace has any, else from the host planes."""
  from jax.profiler import ProfileData
  files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler wrote no trace under {path}.")
  found: dict[bool, list[tuple[str, float, float]]] = {True: [], False: []}
  for file in files:
    for plane in ProfileData.from_file(file).planes:
      device = plane.name.startswith("/device:")
      for line in plane.lines:
        for event in line.events:
          if any(key == "hlo_op" for key, _ in event.stats):
            found[device].append((event.name, float(event.start_ns),
                                  float(event.duration_ns)))
  return found[True] or found[False]


def untraced_gaps(events: Sequence[tuple[str, float, float]]) -> dict[str, float]:
  """The ns between the first event's start and the last one's end during which no event
  ran, by the kind (:func:`kind_of`) of the event that ended last before each gap."""
  totals: dict[str, float] = collections.defaultdict(float)
  end, last = None, None
  for name, start, ns in sorted(events, key=lambda e: e[1]):
    if end is not None and start > end:
      totals[kind_of(last)] += start - end
    if end is None or start + ns > end:
      end, last = start + ns, name
  return dict(totals)


def profile_step(step: Any, steps: int = 3, top: int = 12) -> dict[str, Any]:
  """Traces ``steps`` calls of ``step.step()`` (any object with one, such as a
  :class:`train.bench.models.OurStep`) and sums the XLA operations per step: the row's
  ``profile`` (fields: docs/benchmarks.md)."""
  if steps < 1:
    raise ValueError(f"--profile_steps must be >= 1; got {steps}.")
  with tempfile.TemporaryDirectory(prefix="bench_trace_") as path:
    with jax.profiler.trace(path):
      wall = sum(step.step() for _ in range(steps))
    events = _events(path)
  by_kind = {k: [0.0, 0] for k in KINDS}
  by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for name, _, ns in events:
    entry = by_kind[kind_of(name)]
    entry[0] += ns
    entry[1] += 1
    entry = by_name[stem(name)]
    entry[0] += ns
    entry[1] += 1
  busy = sum(ns for _, _, ns in events) / steps / 1e9
  untraced = untraced_gaps(events)
  on_device = jax.default_backend() != "cpu"
  return {
      "steps": steps, "step_time_s": wall / steps, "busy_s": busy,
      "idle_s": wall / steps - busy if on_device else None,
      "untraced_s": sum(untraced.values()) / steps / 1e9,
      "untraced_after": {k: v / steps / 1e9 for k, v in untraced.items()},
      "ops": len(events) / steps,
      "by_kind": {k: {"s": v[0] / steps / 1e9, "ops": v[1] / steps}
                  for k, v in by_kind.items() if v[1]},
      "top": [{"name": n, "s": v[0] / steps / 1e9, "ops": v[1] / steps}
              for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]}


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
  """A table of the profiled model rows (none without ``--profile``)."""
  def cells(r: dict[str, Any]) -> list[str]:
    p = r["profile"]
    idle = "-" if p["idle_s"] is None else f"{p['idle_s'] * 1e3:.2f}"
    after_conv = p["untraced_after"].get("convolution", 0.0)
    return [model_label(r), f"{p['busy_s'] * 1e3:.2f} / {idle}",
            f"{p['untraced_s'] * 1e3:.2f} ({after_conv * 1e3:.2f})", f"{p['ops']:.0f}",
            *(f"{p['by_kind'][k]['s'] * 1e3:.2f} ({p['by_kind'][k]['ops']:.0f})"
              if k in p["by_kind"] else "-" for k in KINDS)]
  return table(["model", "ms per step: busy / idle", "untraced ms (after convolutions)",
                "ops", *(f"{k} ms (ops)" for k in KINDS)],
               [cells(r) for r in rows if r.get("kind") == "model" and r.get("profile")])
