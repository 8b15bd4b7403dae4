"""Training-step benchmark: step time, throughput, compile time and memory per model.

Run:
  python -m train.bench --models=resnet20,se_resnet20 --batch=128 --repeats=10
  python -m train.bench --models=seresnet50,cbam_resnet50 --size=112 --batch=16 \
      --against=torch --sampler --pipeline --out=/tmp/bench.json

Each model runs the trainer's own step (``create_train_state`` with an SGD config and the
jitted, state-donating ``train_step`` of ``compile_steps``), so the numbers are those of
``python -m train``. Lowering and compiling are timed apart from the steps; the outputs
are blocked on after every step. Repeats are interleaved: round r runs one step of every
model (and of its PyTorch twin with ``--against=torch``) before round r + 1, so a burst of
load from elsewhere on the machine hits all models alike. Compare numbers only as ratios
within one run.

Attention models are compared with their plain backbone, added to the run when not
listed: seresnet50 / cbam_resnet50 / gcresnet50 / sa_resnet50 -> resnet50, ecaresnet50d ->
resnet50d, {se,cbam,eca}_resnetNN -> resnetNN, test_resnet_tiny_X -> test_resnet_tiny.
Residual Attention Networks have no plain twin (overhead null). ``--unfolded`` adds, after
each SE / ECA / CBAM ResNet, the same model with ``fold_gate=False`` (the gate applied
after the block's last batch norm instead of folded into it), compared with the same
backbone. ``--xla_spatial_conv`` adds, after each model with a CBAM or spatial gate, the
same model with that gate's convolution as XLA's on every backend (``conv_impl="xla"``;
the default runs it as a banded product on CPU and CUDA). ``--gate_float32``, with
``--dtype=bfloat16``, adds after each attention ResNet the same model with its attention
layers in float32 (``attn_kwargs={"dtype": "float32"}``), the rest in bfloat16.
``--profile`` then traces ``--profile_steps`` more steps of each model and sums the XLA
operations by kind and name (``train/bench_profile.py``); ``--pipeline`` measures the input
pipeline on ``--data`` (``train/bench_pipeline.py``), ``--sampler`` the STN sampler
(``train/bench_sampler.py``), ``--convs`` single layers (``train/bench_conv.py``); the
models' steps themselves are in ``train/bench_models.py``.

PyTorch (``--against=torch``): timm's model of the same name where timm has one (resnet50,
resnet50d, seresnet50, ecaresnet50d, ...); cbam_resnetNN / gcresnet50 are timm's ResNet
with ``block_args=dict(attn_layer="cbam" | "gc")``; CIFAR ResNets (and the tiny test
ResNets) are built here from timm's BasicBlock and attention layers with the same stem,
widths and option-A shortcut; anything else is skipped (``torch_note`` says why).
channels_last, ``torch.set_num_threads`` = the cores JAX uses, SGD (momentum 0.9, weight
decay 1e-4), ``loss.backward()``; ``torch.compile`` and bf16 autocast only on a GPU.

JSON (``--out``): a list of objects, each with ``kind``:
  "environment" (first): jax_version, jaxlib_version, flax_version, backend, device_kind,
    device_count, cpu_count, cpu_model, torch_version (or null), torch_threads,
    omp_wait_policy (PASSIVE unless set), command,
    batch, size, dtype, repeats, warmup, compiler_options (what every step was compiled
    with: on CPU ``attention_flax.conv.cpu_compiler_options()``, as ``python -m train``;
    ``{}`` with ``--xla_defaults`` or on other backends).
  "model": model, model_kwargs (``{}``, or ``{"fold_gate": false}`` for the extra rows of
    ``--unfolded``, ``{"attn_kwargs": {..., "conv_impl": "xla"}}`` for those of
    ``--xla_spatial_conv``, ``{"attn_kwargs": {..., "dtype": "float32"}}`` for those of
    ``--gate_float32``), batch, image_shape, dtype, num_classes, params, step_time_median_s,
    step_time_min_s, step_time_max_s, images_per_second, compile_time_s (lower + compile),
    peak_memory_bytes, peak_memory_source ("device_peak_bytes_in_use", or
    "process_peak_rss", the whole process's peak so far, cumulative over models),
    xla_memory_bytes (arguments + outputs + temporaries - aliased, from XLA's memory
    analysis of this step alone, or null), backbone (or null), overhead_vs_backbone (this
    step time / the backbone's, null for backbones); with torch: torch_model,
    torch_step_time_{median,min,max}_s, torch_images_per_second, torch_first_step_s,
    throughput_ratio_vs_torch (ours images/s / torch's: > 1 means we are faster),
    torch_note; with ``--profile``: profile (steps, step_time_s, busy_s, idle_s,
    untraced_s, untraced_after, ops, by_kind, top: see ``train/bench_profile.py``).
  "conv" (with ``--convs``): single convolution layers, see ``train/bench_conv.py``.
  "sampler": mode (``--sampler_modes``), shape (N, H, W, C), step_time_{median,min,max}_s
    of ``grid_sample`` forward + backward (the samples, and the gradients for image and
    grid from a fixed random output gradient), compile_time_s, and with torch the same
    torch_* fields of ``F.grid_sample`` and throughput_ratio_vs_torch.
  "pipeline": data, batch, image_shape, workers (``--pipeline_workers``), warmup_batches
    (read before timing: 2 plus what the workers' buffers and the prefetch can hold, so
    that the timed batches are made while timed), batches (``--pipeline_batches``),
    images_per_second of ``train.data.train_dataset`` as the trainer reads it (uint8
    sources stay uint8 for the device to normalise), image_dtype (of its batches), model,
    model_images_per_second (the fastest model's), ratio_vs_model (pipeline / model: >= 1
    means it keeps up), augment_on_device (true in the second row that
    ``--augment_on_device`` adds: the resize, crop and flip left to the jitted step),
    stored_image_shape (of the batches' images as shipped),
    device_augment_s (median seconds of that device work on one batch, else null; added
    to the model's time per batch in model_images_per_second and the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Sequence

import jax

from train import bench_conv, bench_profile
from train.bench_models import (OurStep, backbone_of, bench_models, folds_gate,  # noqa: F401
                                gate_float32_kwargs, sgd_config, spatial_conv_kwargs)
from train.bench_pipeline import PIPELINE_DATA, bench_pipeline  # noqa: F401
from train.bench_pipeline import markdown as pipeline_markdown
from train.bench_sampler import _OurSampler, bench_sampler  # noqa: F401
from train.bench_sampler import markdown as sampler_markdown
from train.bench_torch import TorchStep, _TorchSampler, torch_model  # noqa: F401

DEFAULT_MODELS = "resnet50,seresnet50,cbam_resnet50,ecaresnet50d,attention56"
# --sampler's default shapes: grayscale digits at 60 x 60 (the STN paper's distorted MNIST),
# RGB at the same size, and a 64-channel feature map.
SAMPLER_SHAPES = ((64, 60, 60, 1), (64, 60, 60, 3), (32, 32, 32, 64))


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def compiler_options(xla_defaults: bool) -> dict[str, Any]:
  """What every step here compiles with: the trainer's CPU options
  (``attention_flax.conv.cpu_compiler_options``) on CPU, none with ``--xla_defaults``
  or on other backends."""
  from attention_flax import conv
  if xla_defaults or jax.default_backend() != "cpu":
    return {}
  return conv.cpu_compiler_options()


def environment(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
  import flax
  import jaxlib
  torch_version = threads = None
  if args.against == "torch":
    import torch
    torch_version, threads = torch.__version__, torch.get_num_threads()
  device = jax.devices()[0]
  return {"kind": "environment", "jax_version": jax.__version__,
          "jaxlib_version": jaxlib.__version__, "flax_version": flax.__version__,
          "backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "cpu_count": _cores(), "cpu_model": _cpu_model(),
          "torch_version": torch_version, "torch_threads": threads,
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
          "command": "python -m train.bench " + " ".join(argv), "batch": args.batch,
          "size": args.size, "dtype": args.dtype, "repeats": args.repeats,
          "warmup": args.warmup, "compiler_options": compiler_options(args.xla_defaults)}


def _fmt(value: Any, spec: str = ".3f") -> str:
  return "-" if value is None else format(value, spec)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as Markdown tables (models, then sampler and pipeline)."""
  env = next((r for r in rows if r["kind"] == "environment"), {})
  out = [f"{env.get('cpu_model', '')} ({env.get('cpu_count', '?')} cores), "
         f"{env.get('backend', '')} {env.get('device_kind', '')}, jax {env.get('jax_version', '')}",
         "", "| model | batch | image | median s (min-max) | img/s | compile s | peak MiB "
         "| XLA MiB | vs backbone | torch median s | ours/torch img/s |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["kind"] != "model":
      continue
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    out.append(
        f"| {bench_profile.model_label(r)} | {r['batch']} | {'x'.join(map(str, r['image_shape']))} "
        f"| {r['step_time_median_s']:.4f} ({r['step_time_min_s']:.4f}-"
        f"{r['step_time_max_s']:.4f}) | {r['images_per_second']:.1f} "
        f"| {r['compile_time_s']:.1f} | {_fmt(mib(r['peak_memory_bytes']), '.0f')} "
        f"| {_fmt(mib(r['xla_memory_bytes']), '.0f')} "
        f"| {_fmt(r['overhead_vs_backbone'])} | {_fmt(r.get('torch_step_time_median_s'), '.4f')} "
        f"| {_fmt(r.get('throughput_ratio_vs_torch'))} |")
  out += bench_profile.markdown(rows)
  out += sampler_markdown(rows)
  out += bench_conv.markdown(rows)
  out += pipeline_markdown(rows)
  return "\n".join(out)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n")[0])
  p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated registry names")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=None, help="square input side; default: model's")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--out", default=None, help="JSON file to write")
  p.add_argument("--against", choices=("torch",), default=None)
  p.add_argument("--pipeline", action="store_true")
  p.add_argument("--data", default="digits",
                 help=f"--pipeline data: {' | '.join(PIPELINE_DATA)} (train/bench_pipeline.py)")
  p.add_argument("--pipeline_batches", type=int, default=20)
  p.add_argument("--pipeline_workers", type=int, default=0,
                 help="grain worker processes for --pipeline (data.worker_count)")
  p.add_argument("--augment_on_device", action="store_true",
                 help="--pipeline a second time with data.augment_on_device: resize, crop "
                      "and flip in the jitted step (train.device_augment), timed and charged "
                      "to the model")
  p.add_argument("--sampler", action="store_true")
  p.add_argument("--profile", action="store_true",
                 help="trace --profile_steps more steps per model and sum its XLA operations "
                      "by kind and name (train/bench_profile.py)")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--unfolded", action="store_true",
                 help="also run each SE/ECA ResNet with fold_gate=False (gate applied after "
                      "the last batch norm, not folded into it)")
  p.add_argument("--xla_spatial_conv", action="store_true",
                 help="also run each model with a CBAM or spatial gate with that gate's "
                      "convolution as XLA's (conv_impl='xla')")
  p.add_argument("--gate_float32", action="store_true",
                 help="with --dtype=bfloat16, also run each attention ResNet with its "
                      "attention layers in float32 (attn_kwargs dtype float32)")
  p.add_argument("--xla_defaults", action="store_true",
                 help="compile with XLA's default options, not the trainer's CPU options")
  p.add_argument("--convs", action="store_true",
                 help="also time single convolutions: XLA's kernel gradient against ours")
  p.add_argument("--conv_shapes", default=";".join(",".join(map(str, s))
                                                   for s in bench_conv.CONV_SHAPES),
                 help="N,H,C_in,C_out,kernel,stride groups separated by ';'")
  p.add_argument("--sampler_shapes", default=";".join(",".join(map(str, s))
                                                      for s in SAMPLER_SHAPES),
                 help="N,H,W,C shapes separated by ';'")
  p.add_argument("--sampler_modes", default="bilinear",
                 help="grid_sample modes for --sampler, separated by ',': bilinear, nearest")
  args = p.parse_args(list(argv))
  for key in ("batch", "repeats", "profile_steps"):
    if getattr(args, key) < 1:
      raise ValueError(f"--{key} must be >= 1; got {getattr(args, key)}.")
  try:
    args.conv_shapes = [tuple(int(v) for v in group.split(","))
                        for group in args.conv_shapes.split(";")]
  except ValueError:
    args.conv_shapes = [()]
  if any(len(shape) != 6 or min(shape) < 1 for shape in args.conv_shapes):
    raise ValueError("--conv_shapes takes N,H,C_in,C_out,kernel,stride groups of positive "
                     "integers separated by ';', e.g. 128,32,16,16,3,1.")
  if args.warmup < 0 or (args.size is not None and args.size < 1):
    raise ValueError("--warmup must be >= 0 and --size >= 1.")
  if args.data not in PIPELINE_DATA:
    raise ValueError(f"Unknown --data={args.data!r}; choose one of {', '.join(PIPELINE_DATA)}.")
  if args.pipeline_workers < 0:
    raise ValueError(f"--pipeline_workers must be >= 0; got {args.pipeline_workers}.")
  from attention_flax.layers.transformer import MODES
  modes = [m.strip() for m in args.sampler_modes.split(",") if m.strip()]
  if not modes or any(m not in MODES for m in modes):
    raise ValueError(f"--sampler_modes takes {', '.join(MODES)} separated by ','; got "
                     f"{args.sampler_modes!r}.")
  args.sampler_modes = modes
  return args


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = parse_args(argv)
    if args.against == "torch":
      # OpenMP's default spin-waiting collapses when the cores are shared (measured here:
      # a ResNet-18 step 4.3 s with 2 spinning threads, 0.3 s passive); must precede import.
      os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
      try:
        import timm  # noqa: F401
        import torch
      except ImportError as err:
        raise ValueError(f"--against=torch needs torch and timm installed ({err}).") from err
      torch.set_num_threads(_cores())
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    from attention_flax import models
    for name in names:
      models.model_info(name)  # Unknown names fail before anything compiles.
    rows: list[dict[str, Any]] = [environment(args, argv)]
    options = compiler_options(args.xla_defaults)
    model_rows = bench_models(names, batch=args.batch, size=args.size, dtype=args.dtype,
                              warmup=args.warmup, repeats=args.repeats, against=args.against,
                              compiler_options=options, unfolded=args.unfolded,
                              xla_spatial_conv=args.xla_spatial_conv,
                              gate_float32=args.gate_float32,
                              profile_steps=args.profile_steps if args.profile else 0)
    rows += model_rows
    if args.sampler:
      shapes = [tuple(int(v) for v in s.split(",")) for s in args.sampler_shapes.split(";")]
      if any(len(s) != 4 for s in shapes):
        raise ValueError(f"--sampler_shapes takes N,H,W,C groups; got {args.sampler_shapes!r}.")
      rows += bench_sampler(shapes, warmup=args.warmup, repeats=args.repeats,
                            against=args.against, compiler_options=options,
                            modes=args.sampler_modes)
    if args.convs:
      rows += bench_conv.bench_convs(args.conv_shapes, warmup=args.warmup, repeats=args.repeats,
                                     against=args.against, compiler_options=options)
    if args.pipeline:
      # The fastest model is the hardest consumer to keep fed.
      first = max(model_rows, key=lambda r: r["images_per_second"])
      for on_device in (False, True) if args.augment_on_device else (False,):
        rows.append(bench_pipeline(
            args.data, batch=args.batch, image_shape=first["image_shape"], warmup=2,
            batches=args.pipeline_batches, model_row=first, workers=args.pipeline_workers,
            augment_on_device=on_device))
  except ValueError as err:
    print(f"train.bench: {err}", file=sys.stderr)
    return 2
  print(markdown(rows))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
