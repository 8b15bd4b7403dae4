"""The sampler's part of ``python -m train.bench --sampler``: ``attention_flax.ops.grid_sample``
(the spatial transformer's default sampler) forward and backward on a fixed batch, beside
``torch.nn.functional.grid_sample`` with ``--against=torch``; one "sampler" row per shape
and mode.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from train.bench.common import fmt, interleave, summary, table
from train.bench.torch_ref import TorchSampler


class OurSampler:
  """``attention_flax.ops.grid_sample(x, grid, mode=mode)`` and its gradients for image
  and grid, given a fixed random output gradient, jitted on an (N, H, W, C) ``shape``
  with a random affine grid."""

  def __init__(self, shape: tuple[int, int, int, int], seed: int = 0,
               compiler_options: dict[str, Any] | None = None, mode: str = "bilinear"):
    from attention_flax import ops
    from attention_flax.sampling import affine_grid
    rs = np.random.RandomState(seed)
    n = shape[0]
    self.mode = mode
    theta = np.tile(np.array([[0.8, 0.1, 0.05], [-0.1, 0.9, -0.05]], np.float32), (n, 1, 1))
    theta += 0.05 * rs.standard_normal(theta.shape).astype(np.float32)
    self.x = rs.standard_normal(shape).astype(np.float32)
    self.grid = np.asarray(affine_grid(jnp.asarray(theta), shape))
    self.cot = rs.standard_normal(shape).astype(np.float32)

    def forward_backward(x, grid, cot):
      # The samples and both gradients for a given output gradient, as inside a network
      # (no loss reduction fused into the sampler).
      out, pullback = jax.vjp(lambda x, grid: ops.grid_sample(x, grid, mode=mode), x, grid)
      return out, *pullback(cot)

    args = [jnp.asarray(a) for a in (self.x, self.grid, self.cot)]
    start = time.perf_counter()
    fn = jax.jit(forward_backward, compiler_options=compiler_options or None)
    self.compiled = fn.lower(*args).compile()
    self.compile_time = time.perf_counter() - start
    self.args, self.times = args, []

  def step(self) -> float:
    start = time.perf_counter()
    jax.block_until_ready(self.compiled(*self.args))
    return time.perf_counter() - start


def bench_sampler(shapes: Sequence[tuple[int, int, int, int]], *, warmup: int, repeats: int,
                  against: str | None, compiler_options: dict[str, Any],
                  modes: Sequence[str] = ("bilinear",)) -> list[dict[str, Any]]:
  """One "sampler" row per (N, H, W, C) shape and mode ("bilinear", "nearest"): zeros
  padding, forward + backward, ours and (with ``against="torch"``) PyTorch's interleaved."""
  rows = []
  for shape, mode in ((shape, mode) for mode in modes for shape in shapes):
    ours = OurSampler(tuple(shape), compiler_options=compiler_options, mode=mode)
    theirs = (TorchSampler(ours.x, ours.grid, ours.cot, mode) if against == "torch"
              else None)
    interleave([ours] + ([theirs] if theirs else []), warmup, repeats)
    row = {"kind": "sampler", "model": "grid_sample", "mode": mode, "shape": list(shape),
           **summary(ours.times), "compile_time_s": ours.compile_time}
    if theirs is not None:
      row.update(summary(theirs.times, "torch_"))
      row["throughput_ratio_vs_torch"] = (row["torch_step_time_median_s"]
                                          / row["step_time_median_s"])
    rows.append(row)
  return rows


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The "sampler" rows as a Markdown table's lines (none without such rows)."""
  return table(
      ["grid_sample fwd+bwd (N, H, W, C)", "mode", "median s (min-max)", "torch median s",
       "ours/torch"],
      [[str(tuple(r["shape"])), r["mode"],
        f"{r['step_time_median_s']:.4f} ({r['step_time_min_s']:.4f}-"
        f"{r['step_time_max_s']:.4f})", fmt(r.get("torch_step_time_median_s"), ".4f"),
        fmt(r.get("throughput_ratio_vs_torch"))]
       for r in rows if r["kind"] == "sampler"])
