"""Convolution layers alone: forward + both gradients, XLA's and ``attention_flax.conv``'s.

``python -m train.bench --convs`` runs this on the layer shapes of the CIFAR ResNet-20s and
of ResNet-50's first stages (``CONV_SHAPES``) or on ``--conv_shapes``. Per shape, three
jitted functions of the same random input, kernel and output cotangent are timed,
interleaved round by round: the forward alone, forward + input and kernel gradients
through ``lax.conv_general_dilated`` (XLA's own kernel gradient), and the same through the
drop-in of ``attention_flax.conv`` that our models use for that shape ("ours"):
``banded_conv_general_dilated`` for few-channel stride-1 convolutions such as CBAM's spatial
gate (``conv.uses_band``), ``conv_general_dilated`` for the rest (on CPU its kernel
gradient is one matrix product for 1 x 1 layers and a sum of patch-matrix products for
large ones); with ``--against=torch`` also ``F.conv2d`` forward + ``backward()`` in
channels_last. All three compile with the run's compiler options (on CPU
``attention_flax.conv.cpu_compiler_options()``, as the trainer; ``--xla_defaults`` for
XLA's own), so "XLA" means XLA's convolution kernels under those options.

Rows (``kind`` "conv"): shape [N, H, W, C_in, C_out, k, stride], route ("banded", or the
kernel gradient's ``conv.kernel_grad_route``: "1x1", "patches" or "xla"), gflop (one
forward, a multiply-add counted as 2), forward_s, lax_step_s, ours_step_s (medians, fwd +
both grads), speedup_vs_lax (lax_step_s / ours_step_s), and with torch torch_step_s and
throughput_ratio_vs_torch (torch_step_s / ours_step_s: > 1 means we are faster).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_flax import conv
from train.bench_torch import synchronize, torch_device

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


def _pads(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  p = (k - 1) // 2
  return ((p, p), (p, p))


class _Conv:
  """The three jitted functions of one shape, and their times."""

  def __init__(self, shape: Sequence[int], seed: int = 0,
               compiler_options: dict[str, Any] | None = None):
    jit = functools.partial(jax.jit, compiler_options=compiler_options or None)
    n, h, cin, cout, k, s = shape
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.standard_normal((n, h, h, cin)).astype(np.float32))
    w = jnp.asarray(rs.standard_normal((k, k, cin, cout)).astype(np.float32) / np.sqrt(k * k * cin))
    forward = lambda fn: lambda x, w: fn(x, w, (s, s), _pads(k), dimension_numbers=_NHWC)  # noqa: E731
    ho = (h + 2 * ((k - 1) // 2) - k) // s + 1
    g = jnp.asarray(rs.standard_normal((n, ho, ho, cout)).astype(np.float32))

    def step(fn):
      def both(x, w, g):
        y, vjp = jax.vjp(forward(fn), x, w)
        return vjp(g)
      return jit(both)

    banded = s == 1 and conv.uses_band(x.shape, w.shape)
    self.route = "banded" if banded else conv.kernel_grad_route(g.shape, w.shape, _pads(k))
    ours = conv.banded_conv_general_dilated if banded else conv.conv_general_dilated
    self.fns = {"forward": (jit(forward(lax.conv_general_dilated)), (x, w)),
                "lax": (step(lax.conv_general_dilated), (x, w, g)),
                "ours": (step(ours), (x, w, g))}
    for fn, args in self.fns.values():
      jax.block_until_ready(fn(*args))
    self.times: dict[str, list[float]] = {key: [] for key in self.fns}
    self.shape = [n, h, h, cin, cout, k, s]
    self.gflop = 2.0 * n * ho * ho * k * k * cin * cout / 1e9
    self.torch_args = (np.asarray(x), np.asarray(w), np.asarray(g), s, (k - 1) // 2)

  def run(self, record: bool) -> None:
    for key, (fn, args) in self.fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      if record:
        self.times[key].append(time.perf_counter() - start)


class _TorchConv:
  def __init__(self, ours: _Conv):
    import torch
    self.torch, self.device = torch, torch_device()
    x, w, g, self.stride, self.pad = ours.torch_args
    cl, dev = torch.channels_last, self.device
    self.x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev, memory_format=cl)
    self.w = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).to(dev, memory_format=cl)
    self.g = torch.from_numpy(g.transpose(0, 3, 1, 2).copy()).to(dev, memory_format=cl)
    self.x.requires_grad_(True)
    self.w.requires_grad_(True)
    self.times: list[float] = []

  def run(self, record: bool) -> None:
    start = time.perf_counter()
    y = self.torch.nn.functional.conv2d(self.x, self.w, stride=self.stride, padding=self.pad)
    y.backward(self.g)
    synchronize(self.device)
    self.x.grad, self.w.grad = None, None
    if record:
      self.times.append(time.perf_counter() - start)


def bench_convs(shapes: Sequence[Sequence[int]], *, warmup: int, repeats: int,
                against: str | None,
                compiler_options: dict[str, Any]) -> list[dict[str, Any]]:
  """One "conv" row per (N, H, C_in, C_out, k, stride) shape (module docstring)."""
  rows = []
  for shape in shapes:
    ours = _Conv(shape, compiler_options=compiler_options)
    theirs = _TorchConv(ours) if against == "torch" else None
    for r in range(warmup + repeats):
      ours.run(r >= warmup)
      if theirs is not None:
        theirs.run(r >= warmup)
    med = {key: statistics.median(t) for key, t in ours.times.items()}
    row = {"kind": "conv", "shape": ours.shape, "route": ours.route, "gflop": ours.gflop,
           "forward_s": med["forward"], "lax_step_s": med["lax"], "ours_step_s": med["ours"],
           "speedup_vs_lax": med["lax"] / med["ours"]}
    if theirs is not None:
      row["torch_step_s"] = statistics.median(theirs.times)
      row["throughput_ratio_vs_torch"] = row["torch_step_s"] / med["ours"]
    rows.append(row)
  return rows


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
  convs = [r for r in rows if r["kind"] == "conv"]
  if not convs:
    return []
  out = ["", "| conv (N, H, W, C_in, C_out, k, s) | route | GFLOP fwd | fwd s "
         "| fwd+grads s, XLA | fwd+grads s, ours | ours vs XLA | torch s | ours/torch |",
         "|---|---|---|---|---|---|---|---|---|"]
  for r in convs:
    torch_s = r.get("torch_step_s")
    ratio = r.get("throughput_ratio_vs_torch")
    out.append(f"| {tuple(r['shape'])} | {r.get('route', '-')} | {r['gflop']:.3f} "
               f"| {r['forward_s']:.4f} "
               f"| {r['lax_step_s']:.4f} | {r['ours_step_s']:.4f} | {r['speedup_vs_lax']:.2f}x "
               f"| {'-' if torch_s is None else format(torch_s, '.4f')} "
               f"| {'-' if ratio is None else format(ratio, '.2f')} |")
  return out
