"""How large the features are around every Residual Attention module of a training run.

Usage:
  python -m train.activations --workdir=runs/digits_naive [--num_images=256] [--init]
      [--model_kwargs='{"naive": true, "stage_modules": [6, 6, 6]}'] [--out=FILE.json]

For each :class:`~attention_flax.layers.residual.ResidualAttention` module (in the order the
network runs them) it prints the mean absolute value, over a batch of the run's test images,
of the module's input, its trunk ``T``, its soft mask ``M``, the masked trunk (``(1 + M) * T``,
or ``M * T`` for ``naive=True``) and its output; then the mean absolute value of every stage
output the model sows (``stage{i}``). Wang et al. 2017 (arXiv 1704.06904, Sec. 3.1) argue
that masks in [0, 1] applied module after module shrink deep features (``M * T``) and that
``(1 + M) * T`` does not; these numbers show it on a network.

``--init`` measures freshly initialised weights (``--seed``, by default 0) instead of the
checkpoint's: the same weights for every run of the same model, whatever its ``naive``
setting. Batch norms then normalise with the batch's own statistics, as in a first
training step (a fresh network's running statistics are 0 and 1); a checkpoint is measured
with its running statistics, as in evaluation. With ``--init``, ``--model_kwargs`` (a JSON
object) changes fields of the run's model first, e.g. ``naive`` or the number of modules
per stage. The table goes to stdout and, as JSON, to
``--out`` (default ``WORKDIR/activations.json``, or ``activations_init.json`` with
``--init``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from attention_flax.layers.residual import ResidualAttention
from train import errors


def _mean_abs(x: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(x.astype(jnp.float32)))


def measure(model: nn.Module, variables: Any, images: jax.Array, *,
            batch_stats: bool = False) -> dict[str, Any]:
  """The mean absolute values around every ResidualAttention module of ``model``.

  Args:
    model: a linen model whose attention modules are ResidualAttention instances.
    variables: its variables.
    images: (N, H, W, C) images, preprocessed as for training.
    batch_stats: normalise with the batch's statistics (training mode) instead of the
      running ones.

  Returns:
    {"modules": [{"path", "naive", "input", "trunk", "mask", "masked", "output"}, ...] in
    the order the modules ran, "stages": {"stage1": float, ...}}.

  Raises:
    errors.UserError: the model has no ResidualAttention module.
  """
  found: list[tuple[str, bool]] = []

  def run(variables, images):
    calls: list[tuple[str, bool, jax.Array, jax.Array]] = []

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if isinstance(module, ResidualAttention) and context.method_name == "__call__":
        calls.append(("/".join(module.path), bool(module.naive), args[0], out))
      return out

    with nn.intercept_methods(record):
      _, state = model.apply(variables, images, train=batch_stats,
                             mutable=["intermediates", "batch_stats"])
    inter = state.get("intermediates", {})
    modules = []
    for path, naive, x, out in calls:
      sown = inter
      for part in path.split("/"):
        sown = sown[part]
      trunk, mask = sown["trunk"][-1], sown["residual_mask"][-1]
      masked = mask * trunk if naive else (1 + mask) * trunk
      found.append((path, naive))
      modules.append({"input": _mean_abs(x), "trunk": _mean_abs(trunk),
                      "mask": jnp.mean(mask.astype(jnp.float32)),
                      "masked": _mean_abs(masked), "output": _mean_abs(out)})
    # Sown values are tuples; the dicts beside them are submodules ("stage1_unit1").
    stages = {k: _mean_abs(v[-1]) for k, v in inter.items()
              if k.startswith("stage") and isinstance(v, tuple)}
    return modules, stages

  modules, stages = jax.jit(run)(variables, jnp.asarray(images))
  if not found:
    raise errors.UserError(
        f"{type(model).__name__} has no ResidualAttention module to measure; use a run of a "
        "Residual Attention Network (e.g. configs/digits_naive_attention.py).")
  rows = []
  for (path, naive), values in zip(found, modules):
    rows.append({"path": path, "naive": naive,
                 **{k: float(v) for k, v in values.items()}})
  return {"modules": rows, "stages": {k: float(v) for k, v in sorted(stages.items())}}


def format_table(result: dict[str, Any]) -> str:
  """The measurements as a plain-text table."""
  lines = [f"{'module':<24} {'|input|':>9} {'|T|':>9} {'mean M':>8} {'|masked|':>9} "
           f"{'|output|':>9}"]
  for row in result["modules"]:
    name = row["path"] + (" (M*T)" if row["naive"] else " ((1+M)*T)")
    lines.append(f"{name:<24} {row['input']:9.4f} {row['trunk']:9.4f} {row['mask']:8.4f} "
                 f"{row['masked']:9.4f} {row['output']:9.4f}")
  for name, value in result["stages"].items():
    lines.append(f"{name:<24} {value:9.4f}")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m train.activations", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a training run (config.json + "
                      "checkpoints/)")
  parser.add_argument("--num_images", type=int, default=256,
                      help="test images to average over (the first of the eval split)")
  parser.add_argument("--init", action="store_true",
                      help="measure freshly initialised weights instead of the checkpoint")
  parser.add_argument("--seed", type=int, default=0, help="the initialisation seed of --init")
  parser.add_argument("--model_kwargs", default="",
                      help="with --init: a JSON object of model fields to change")
  parser.add_argument("--out", help="JSON file (default WORKDIR/activations[_init].json)")
  parser.add_argument("--debug", action="store_true",
                      help=f"show the traceback of an error (also {errors.DEBUG_ENV}=1)")
  args = parser.parse_args(argv)
  if args.num_images < 2:
    raise errors.UserError(f"--num_images must be >= 2 (batch statistics need two); got "
                           f"{args.num_images}.")
  if args.model_kwargs and not args.init:
    raise errors.UserError("--model_kwargs changes the model, so the checkpoint's weights "
                           "may not fit it; add --init to measure fresh weights.")
  return args


def _model_overrides(text: str) -> dict[str, Any]:
  """``--model_kwargs`` as a dict; JSON lists become tuples (the models' sequences)."""
  try:
    value = json.loads(text) if text else {}
  except json.JSONDecodeError as err:
    raise errors.UserError(f"--model_kwargs is not JSON ({err.msg}); write e.g. "
                           '\'{"naive": true, "stage_modules": [2, 2, 2]}\'.') from err
  if not isinstance(value, dict):
    raise errors.UserError(f"--model_kwargs must be a JSON object; got {text!r}.")
  return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Measures a run (or its fresh initialisation), prints the table, writes the JSON and
  returns it."""
  from train.visualize import load_run  # pylint: disable=import-outside-toplevel

  args = parse_args(argv)
  run = load_run(args.workdir, args.num_images)
  model, variables, images = run["model"], run["variables"], run["images"]
  overrides = _model_overrides(args.model_kwargs)
  unknown = sorted(set(overrides) - set(getattr(model, "__dataclass_fields__", {})))
  if unknown:
    raise errors.UserError(f"--model_kwargs: {type(model).__name__} has no field "
                           f"{', '.join(unknown)}; use the model's own field names.")
  model = model.clone(**overrides) if overrides else model
  if args.init:
    variables = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(images[:1]),
                           train=False)
  result = measure(model, variables, images, batch_stats=args.init)
  result.update(workdir=args.workdir, step=0 if args.init else int(run["step"]),
                init=bool(args.init), model_kwargs=overrides, num_images=int(len(images)),
                normalisation="batch statistics" if args.init else "running statistics")
  what = f"initialisation (seed {args.seed})" if args.init else f"step {run['step']}"
  print(f"{args.workdir}: {what}, {len(images)} test images")
  print(format_table(result))
  out = args.out or os.path.join(
      args.workdir, "activations_init.json" if args.init else "activations.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(out)
  return result


def cli(argv: Sequence[str] | None = None) -> int:
  """:func:`main` for the command line: a user's problem ends with one ``error:`` line and
  exit status 2 (``--debug`` adds the traceback)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    main(argv)
  except Exception as err:  # pylint: disable=broad-except
    from train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    errors.exit_with(err, errors.debug_requested(argv),
                     (ValueError, TypeError, OSError, KeyError, ckpt_lib.CheckpointError))
  return 0


if __name__ == "__main__":
  sys.exit(cli())
