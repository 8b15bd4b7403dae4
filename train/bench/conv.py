"""Single convolution layers (``python -m train.bench --convs``): forward + input and kernel
gradients through XLA's ``lax.conv_general_dilated`` against the drop-in of
``attention_flax.ops`` our models use for that shape (the banded product or
``ops.conv_general_dilated``), and ``F.conv2d`` with ``--against=torch``; one "conv" row
per (N, H, C_in, C_out, kernel, stride) shape (fields: docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from train.bench.common import CallStep, fmt, interleave, median, table
from train.bench.torch_ref import TorchConv

# (N, H, C_in, C_out, kernel, stride) on square maps.
CONV_SHAPES = (
    (128, 32, 16, 16, 3, 1),  # CIFAR ResNet-20, stage 1
    (128, 32, 16, 32, 3, 2),  # stage 2's first convolution
    (128, 16, 32, 32, 3, 1),
    (128, 8, 64, 64, 3, 1),
    (16, 112, 3, 64, 7, 2),  # ResNet-50's stem on a 112x112 input
    (16, 28, 64, 64, 3, 1),  # ResNet-50 stage 1 at 112x112 input
    (16, 28, 64, 256, 1, 1),
    (16, 28, 256, 64, 1, 1),
    (16, 14, 128, 128, 3, 1),
    (128, 32, 2, 1, 7, 1),  # CBAM's spatial gate in CIFAR CBAM-ResNet-20, stage 1
    (16, 28, 2, 1, 7, 1),  # ... and in CBAM-ResNet-50's stage 1 at 112x112 input
)
_NHWC = ("NHWC", "HWIO", "NHWC")


class ConvCase:
  """One shape's random input, kernel and output gradient, and its three jitted steps
  (``steps``: "forward", "lax" and "ours"), compiled and run once."""

  def __init__(self, shape: Sequence[int], seed: int = 0,
               compiler_options: dict[str, Any] | None = None):
    from attention_flax import ops
    from attention_flax.ops.banded import uses_band
    from attention_flax.ops.convolution import kernel_grad_route
    jit = functools.partial(jax.jit, compiler_options=compiler_options or None)
    n, h, cin, cout, k, s = shape
    p = (k - 1) // 2
    pads = ((p, p), (p, p))
    ho = (h + 2 * p - k) // s + 1
    rs = np.random.RandomState(seed)
    self.x = rs.standard_normal((n, h, h, cin)).astype(np.float32)
    self.w = (rs.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    self.g = rs.standard_normal((n, ho, ho, cout)).astype(np.float32)
    self.stride, self.pad = s, p
    x, w, g = (jnp.asarray(a) for a in (self.x, self.w, self.g))

    def forward(fn):
      return lambda x, w: fn(x, w, (s, s), pads, dimension_numbers=_NHWC)

    def with_grads(fn):
      def both(x, w, g):
        _, vjp = jax.vjp(forward(fn), x, w)
        return vjp(g)
      return jit(both)

    banded = s == 1 and uses_band(x.shape, w.shape)
    self.route = "banded" if banded else kernel_grad_route(g.shape, w.shape, pads)
    ours = ops.banded_conv_general_dilated if banded else ops.conv_general_dilated
    self.steps = {"forward": CallStep(jit(forward(lax.conv_general_dilated)), x, w),
                  "lax": CallStep(with_grads(lax.conv_general_dilated), x, w, g),
                  "ours": CallStep(with_grads(ours), x, w, g)}
    for step in self.steps.values():
      step.step()
    self.shape = [n, h, h, cin, cout, k, s]
    self.gflop = 2.0 * n * ho * ho * k * k * cin * cout / 1e9


def bench_convs(shapes: Sequence[Sequence[int]], *, warmup: int, repeats: int,
                against: str | None,
                compiler_options: dict[str, Any]) -> list[dict[str, Any]]:
  """One "conv" row per (N, H, C_in, C_out, k, stride) shape: ``forward_s``,
  ``lax_step_s``, ``ours_step_s`` (medians), ``speedup_vs_lax``, with torch
  ``torch_step_s`` and ``throughput_ratio_vs_torch`` (> 1: ours is faster)."""
  rows = []
  for shape in shapes:
    case = ConvCase(shape, compiler_options=compiler_options)
    theirs = (TorchConv(case.x, case.w, case.g, case.stride, case.pad)
              if against == "torch" else None)
    interleave([*case.steps.values(), *([theirs] if theirs else [])], warmup, repeats)
    med = {key: median(step.times) for key, step in case.steps.items()}
    row = {"kind": "conv", "shape": case.shape, "route": case.route, "gflop": case.gflop,
           "forward_s": med["forward"], "lax_step_s": med["lax"], "ours_step_s": med["ours"],
           "speedup_vs_lax": med["lax"] / med["ours"]}
    if theirs is not None:
      row["torch_step_s"] = median(theirs.times)
      row["throughput_ratio_vs_torch"] = row["torch_step_s"] / med["ours"]
    rows.append(row)
  return rows


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The "conv" rows as a Markdown table's lines (none without such rows)."""
  return table(
      ["conv (N, H, W, C_in, C_out, k, s)", "route", "GFLOP fwd", "fwd s", "fwd+grads s, XLA",
       "fwd+grads s, ours", "ours vs XLA", "torch s", "ours/torch"],
      [[str(tuple(r["shape"])), r.get("route", "-"), f"{r['gflop']:.3f}",
        f"{r['forward_s']:.4f}", f"{r['lax_step_s']:.4f}", f"{r['ours_step_s']:.4f}",
        f"{r['speedup_vs_lax']:.2f}x", fmt(r.get("torch_step_s"), ".4f"),
        fmt(r.get("throughput_ratio_vs_torch"), ".2f")]
       for r in rows if r["kind"] == "conv"])
