"""The flags of ``python -m train.bench``: which models, variants and extra parts to time,
then a Markdown summary on stdout and the rows as JSON (``--out``).

  python -m train.bench --models=resnet20,se_resnet20 --batch=128 --repeats=10
  python -m train.bench --models=seresnet50,cbam_resnet50 --size=112 --batch=16 \\
      --against=torch --sampler --pipeline --out=/tmp/bench.json
  python -m train.bench --cache --models=resnet20 --batch=128 --against=torch

Every flag: ``--help``; what is measured and every JSON field: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import jax

from train.bench import cache, conv, models, pipeline, profile, sampler
from train.bench.common import cores, cpu_model, write_json

DEFAULT_MODELS = "resnet50,seresnet50,cbam_resnet50,ecaresnet50d,attention56"
# --sampler's default shapes: grayscale digits at 60 x 60 (the STN paper's distorted MNIST),
# RGB at the same size, and a 64-channel feature map.
SAMPLER_SHAPES = ((64, 60, 60, 1), (64, 60, 60, 3), (32, 32, 32, 64))


def compiler_options(xla_defaults: bool) -> dict[str, Any]:
  """What every step compiles with: ``attention_flax.ops.compiler_options()`` (the
  trainer's CPU options on CPU, none elsewhere), or none with ``--xla_defaults``."""
  from attention_flax import ops
  return {} if xla_defaults else ops.compiler_options()


def environment(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
  """The first row: versions, machine, command and the settings every row shares."""
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
          "device_count": jax.device_count(), "cpu_count": cores(), "cpu_model": cpu_model(),
          "torch_version": torch_version, "torch_threads": threads,
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
          "command": "python -m train.bench " + " ".join(argv), "batch": args.batch,
          "size": args.size, "dtype": args.dtype, "repeats": args.repeats,
          "warmup": args.warmup, "compiler_options": compiler_options(args.xla_defaults)}


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as Markdown: the machine, then the models, profile, sampler, conv and
  pipeline tables (those present)."""
  env = next((r for r in rows if r["kind"] == "environment"), {})
  head = (f"{env.get('cpu_model', '')} ({env.get('cpu_count', '?')} cores), "
          f"{env.get('backend', '')} {env.get('device_kind', '')}, "
          f"jax {env.get('jax_version', '')}")
  parts = (models.markdown, profile.markdown, sampler.markdown, conv.markdown,
           pipeline.markdown, cache.markdown)
  return "\n".join([head, *(line for part in parts for line in part(rows))])


def _shapes(text: str, size: int, flag: str, example: str) -> list[tuple[int, ...]]:
  """``text``'s ';'-separated groups of ``size`` positive integers; ValueError otherwise."""
  try:
    shapes = [tuple(int(v) for v in group.split(",")) for group in text.split(";")]
  except ValueError:
    shapes = [()]
  if any(len(shape) != size or min(shape) < 1 for shape in shapes):
    raise ValueError(f"{flag} takes {example} groups of positive integers separated by "
                     f"';'; got {text!r}.")
  return shapes


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """The flags (``--help``); ValueError for values out of range."""
  p = argparse.ArgumentParser(prog="python -m train.bench",
                              description="Training-step benchmark: step time, throughput, "
                                          "compile time and memory per model.")
  p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated registry names")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=None, help="square input side; default: model's")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--out", default=None, help="JSON file to write")
  p.add_argument("--against", choices=("torch",), default=None,
                 help="also time each model's PyTorch twin (timm)")
  p.add_argument("--pipeline", action="store_true")
  p.add_argument("--data", default="digits",
                 help=f"--pipeline data: {' | '.join(pipeline.PIPELINE_DATA)}")
  p.add_argument("--pipeline_batches", type=int, default=20)
  p.add_argument("--pipeline_workers", type=int, default=0,
                 help="grain worker processes for --pipeline (data.worker_count)")
  p.add_argument("--augment_on_device", action="store_true",
                 help="--pipeline a second time with data.augment_on_device: resize, crop "
                      "and flip in the jitted step (train.device_augment), timed and charged "
                      "to the model")
  p.add_argument("--cache", action="store_true",
                 help="only this: the first --models trained end to end on a folder of "
                      "32x32 JPEGs, without data.cache, with it, with it and "
                      "augment_on_device (and PyTorch with --against=torch); "
                      "4 rounds of --pipeline_batches steps each")
  p.add_argument("--cache_images", type=int, default=cache.CACHE_IMAGES,
                 help="--cache: train images in the folder")
  p.add_argument("--cache_dir", default=None,
                 help="--cache: where the folder is kept between runs (default: a "
                      "temporary one)")
  p.add_argument("--sampler", action="store_true",
                 help="also time attention_flax.ops.grid_sample forward + backward")
  p.add_argument("--profile", action="store_true",
                 help="trace --profile_steps more steps per model and sum its XLA operations "
                      "by kind and name")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--unfolded", action="store_true",
                 help="also run each ResNet that folds its channel gate (SE, ECA, CBAM) with "
                      "tail=attention_flax.models.common.plain_tail (the gate applied after "
                      "the last batch norm)")
  p.add_argument("--xla_spatial_conv", action="store_true",
                 help="also run each model with a CBAM or spatial gate with that gate's "
                      "convolution as XLA's (attn_kwargs conv=flax.linen.Conv)")
  p.add_argument("--gate_float32", action="store_true",
                 help="with --dtype=bfloat16, also run each attention ResNet with its "
                      "attention layers in float32 (attn_kwargs dtype float32)")
  p.add_argument("--xla_defaults", action="store_true",
                 help="compile with XLA's default options, not the trainer's CPU options")
  p.add_argument("--convs", action="store_true",
                 help="also time single convolutions: XLA's kernel gradient against ours")
  p.add_argument("--conv_shapes", default=";".join(",".join(map(str, s))
                                                   for s in conv.CONV_SHAPES),
                 help="N,H,C_in,C_out,kernel,stride groups separated by ';'")
  p.add_argument("--sampler_shapes", default=";".join(",".join(map(str, s))
                                                      for s in SAMPLER_SHAPES),
                 help="N,H,W,C shapes separated by ';'")
  p.add_argument("--sampler_modes", default="bilinear",
                 help="grid_sample modes for --sampler, separated by ',': bilinear, nearest")
  args = p.parse_args(list(argv))
  for key in ("batch", "repeats", "profile_steps", "cache_images"):
    if getattr(args, key) < 1:
      raise ValueError(f"--{key} must be >= 1; got {getattr(args, key)}.")
  args.conv_shapes = _shapes(args.conv_shapes, 6, "--conv_shapes",
                             "N,H,C_in,C_out,kernel,stride (e.g. 128,32,16,16,3,1)")
  args.sampler_shapes = _shapes(args.sampler_shapes, 4, "--sampler_shapes", "N,H,W,C")
  if args.warmup < 0 or (args.size is not None and args.size < 1):
    raise ValueError("--warmup must be >= 0 and --size >= 1.")
  if args.data not in pipeline.PIPELINE_DATA:
    raise ValueError(f"Unknown --data={args.data!r}; choose one of "
                     f"{', '.join(pipeline.PIPELINE_DATA)}.")
  if args.pipeline_workers < 0:
    raise ValueError(f"--pipeline_workers must be >= 0; got {args.pipeline_workers}.")
  from attention_flax.sampling import MODES
  modes = [m.strip() for m in args.sampler_modes.split(",") if m.strip()]
  if not modes or any(m not in MODES for m in modes):
    raise ValueError(f"--sampler_modes takes {', '.join(MODES)} separated by ','; got "
                     f"{args.sampler_modes!r}.")
  args.sampler_modes = modes
  return args


def _import_torch() -> None:
  """torch and timm, with OpenMP's threads waiting passively (they collapse when spinning
  on shared cores, docs/benchmarks.md) and as many threads as JAX's cores."""
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's import
  try:
    import timm  # noqa: F401
    import torch
  except ImportError as err:
    raise ValueError(f"--against=torch needs torch and timm installed ({err}).") from err
  torch.set_num_threads(cores())


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmark; returns the exit status (2 with a message for bad flags)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = parse_args(argv)
    if args.against == "torch":
      _import_torch()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    from attention_flax import models as registry
    for name in names:
      registry.model_info(name)  # Unknown names fail before anything compiles.
    rows: list[dict[str, Any]] = [environment(args, argv)]
    if args.cache:
      rows += cache.bench_cache(names[0], batch=args.batch, steps=args.pipeline_batches,
                                warmup=args.warmup + 1, num_images=args.cache_images,
                                root=args.cache_dir, against=args.against)
      print(markdown(rows))
      if args.out:
        write_json(rows, args.out)
      return 0
    options = compiler_options(args.xla_defaults)
    model_rows = models.bench_models(
        names, batch=args.batch, size=args.size, dtype=args.dtype, warmup=args.warmup,
        repeats=args.repeats, against=args.against, compiler_options=options,
        unfolded=args.unfolded, xla_spatial_conv=args.xla_spatial_conv,
        gate_float32=args.gate_float32, profile_steps=args.profile_steps if args.profile else 0)
    rows += model_rows
    if args.sampler:
      rows += sampler.bench_sampler(args.sampler_shapes, warmup=args.warmup,
                                    repeats=args.repeats, against=args.against,
                                    compiler_options=options, modes=args.sampler_modes)
    if args.convs:
      rows += conv.bench_convs(args.conv_shapes, warmup=args.warmup, repeats=args.repeats,
                               against=args.against, compiler_options=options)
    if args.pipeline:
      # The fastest model is the hardest consumer to keep fed.
      first = max(model_rows, key=lambda r: r["images_per_second"])
      for on_device in (False, True) if args.augment_on_device else (False,):
        rows.append(pipeline.bench_pipeline(
            args.data, batch=args.batch, image_shape=first["image_shape"], warmup=2,
            batches=args.pipeline_batches, model_row=first, workers=args.pipeline_workers,
            augment_on_device=on_device))
  except ValueError as err:
    print(f"train.bench: {err}", file=sys.stderr)
    return 2
  print(markdown(rows))
  if args.out:
    write_json(rows, args.out)
  return 0
