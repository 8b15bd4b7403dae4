"""What a training run reports: metric lines, progress, results, curves, non-finite checks.

Training metrics stay on the device as the loop produces them and are fetched in one
``jax.device_get`` when a line is logged, so the loop never waits for the device between
log points. Files written under the workdir (by process 0 only):
  metrics.jsonl  one JSON object per line: {"step", "split": "train" | "eval", ...}, only
                 ever appended to (a resumed run adds a "resume" marker; read_metrics)
  config.json    the run's config
  results.json   final test metrics, steps, throughput and wall time
  curves.png     loss, accuracy and learning rate against the step (matplotlib, Agg)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np


class NonFiniteLossError(FloatingPointError):
  """The loss, gradient or parameters stopped being finite during training."""


def _to_builtin(value: Any) -> Any:
  """numpy scalars and arrays -> JSON-friendly Python numbers and lists."""
  if isinstance(value, dict):
    return {k: _to_builtin(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_builtin(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` to ``path`` atomically (a temporary file renamed over it)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(_to_builtin(obj), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


RESUME_SPLIT = "resume"  # the marker line a resumed run appends: {"step", "split": "resume"}


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl file as one run: a line cut by a kill is skipped, and a
  resume marker at step S drops the rows above S written before it (steps that the resumed
  run redid). The markers themselves are not returned."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not isinstance(row, dict):
        continue
      if row.get("split") == RESUME_SPLIT:
        rows = [r for r in rows if r.get("step", 0) <= row.get("step", 0)]
      else:
        rows.append(row)
  return rows


class MetricWriter:
  """Appends metric lines to ``workdir/metrics.jsonl``; a no-op unless ``enabled``.

  The file is only ever appended to, never rewritten, so no line once written is lost. A
  run resumed at ``resume_step`` on a file with lines first appends a marker
  ``{"step": resume_step, "split": "resume"}``: :func:`read_metrics` then reads the file as
  one run (the interrupted run's lines after that step describe steps that were redone).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._file = None
    if not enabled:
      return
    self._file = open(self.path, "a")
    if self._file.tell() > 0:
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        cut = f.read(1) != b"\n"  # a line cut by a kill: end it so it stays alone
      marker = {"step": int(resume_step), "split": RESUME_SPLIT, "time": round(time.time(), 3)}
      self._file.write(("\n" if cut else "") + json.dumps(marker) + "\n")
      self._file.flush()

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    if self._file is None:
      return
    row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
    row.update(_to_builtin(values))
    # One flushed line per call: a kill loses at most the line being written.
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def summarize(step_metrics: Sequence[dict[str, Any]], first_step: int) -> dict[str, float]:
  """Fetches the metric dicts of the steps after ``first_step`` (first_step + 1, ...).

  One ``jax.device_get`` for all of them; returns their means (the learning rate: its
  last value).

  Raises:
    NonFiniteLossError: some step's "finite" flag is false; the message names the step.
  """
  fetched = jax.device_get(list(step_metrics))
  for offset, m in enumerate(fetched):
    if not bool(m.get("finite", True)):
      raise NonFiniteLossError(
          f"Non-finite loss, gradient or parameters at step {first_step + offset + 1} "
          f"(loss={float(m['loss'])}, learning_rate={float(m.get('learning_rate', 0.0)):.3g}, "
          f"grad_norm={float(m.get('grad_norm', 0.0)):.3g}). Lower config.learning_rate or "
          "set config.grad_clip_norm; the last good checkpoint stays in the workdir.")
  keys = [k for k in fetched[0] if k != "finite"]
  summary = {k: float(np.mean([m[k] for m in fetched])) for k in keys}
  if "learning_rate" in summary:
    summary["learning_rate"] = float(fetched[-1]["learning_rate"])
  return summary


class Throughput:
  """Images per second over training time only (compilation, evaluation and saves left out).

  ``pause`` must follow a device sync so that the steps counted have really run.
  """

  def __init__(self, batch_size: int):
    self.batch_size, self.seconds, self.images = batch_size, 0.0, 0
    self._since, self._steps = None, 0

  def resume(self) -> None:
    self._since, self._steps = time.perf_counter(), 0

  def count(self) -> None:
    self._steps += self._since is not None

  def pause(self) -> None:
    if self._since is not None:
      self.seconds += time.perf_counter() - self._since
      self.images += self._steps * self.batch_size
      self._since = None

  def rate(self) -> float:
    seconds, images = self.seconds, self.images
    if self._since is not None:
      seconds += time.perf_counter() - self._since
      images += self._steps * self.batch_size
    return images / seconds if seconds > 0 and images else 0.0


class Progress:
  """A progress bar (tqdm when installed, else plain lines at log points); off when disabled."""

  def __init__(self, total: int, initial: int, *, enabled: bool, desc: str = "train"):
    self.enabled = enabled
    self._bar = None
    if not enabled:
      return
    try:
      from tqdm.auto import tqdm
    except ImportError:
      return
    self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                     file=sys.stderr)

  def update(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def show(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    fields = {k: f"{values[k]:.4g}" for k in ("loss", "accuracy", "learning_rate",
                                                "images_per_second") if k in values}
    if self._bar is not None:
      self._bar.set_postfix(fields, refresh=False)
    else:
      print(f"step {step}: " + ", ".join(f"{k}={v}" for k, v in fields.items()), flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def plot_curves(workdir: str, path: str | None = None) -> str | None:
  """Draws loss, accuracy and learning rate from ``workdir/metrics.jsonl`` into a PNG.

  Returns the PNG path, or None when there is nothing to plot.
  """
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in rows if r.get("split") == "train"]
  evals = [r for r in rows if r.get("split") == "eval"]
  if not train and not evals:
    return None
  import matplotlib
  matplotlib.use("Agg")  # Files only: no display on servers and in tests.
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "top-1 accuracy")):
    for rows_, label, style in ((train, "train", "-"), (evals, "test", "o-")):
      points = [(r["step"], r[key]) for r in rows_ if key in r]
      if points:
        ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend()
  lr = [(r["step"], r["learning_rate"]) for r in train if "learning_rate" in r]
  if lr:
    axes[2].plot(*zip(*lr))
  axes[2].set_title("learning rate")
  axes[2].set_xlabel("step")
  fig.tight_layout()
  path = path or os.path.join(workdir, "curves.png")
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def format_results(results: dict[str, Any]) -> str:
  """The final lines printed by ``python -m train``: the compared models first (one
  "baseline <model>:" line for a single one, a "compared <entry>:" line each for several),
  then the main model's."""
  lines = []
  baseline = results.get("baseline")
  compared = results.get("compared") or {}
  own = lambda r: {k: v for k, v in r.items() if k not in ("baseline", "compared")}
  if len(compared) > 1:
    for entry, result in compared.items():
      lines.append(f"compared {entry}: " + format_results(own(result)))
  elif baseline:
    lines.append(f"baseline {baseline['model']}: " + format_results(own(baseline)))
  ips = results.get("images_per_second", 0.0)
  start = results.get("resumed_from_step")
  if start and start == results.get("steps"):
    # Resumed at its last step: nothing trained in this run, so no rate to show.
    ips = "n/a, resumed at the last step"
  else:
    ips = f"{ips:.1f}" if math.isfinite(ips) else "n/a"
  lines.append(f"test_accuracy={results['test_accuracy']:.4f} (model={results['model']}, "
               f"top5={results['test_top5']:.4f}, steps={results['steps']}, "
               f"images/s={ips})")
  return "\n".join(lines)
