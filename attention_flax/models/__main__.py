"""Prints the model registry as a Markdown table: name, parameters, GFLOPs, paper.

    python -m attention_flax.models                      # every model
    python -m attention_flax.models --pattern='se*' --no_flops

Nothing runs on real data: parameters come from ``jax.eval_shape`` and FLOPs from the
compiler's cost analysis of the compiled forward pass at the model's default resolution (batch 1).
Rows print as they are measured.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

from attention_flax.models import count_params, flops, list_models, model_info


def table_rows(names: Sequence[str], num_classes: int = 1000,
               with_flops: bool = True) -> Iterator[str]:
  """Yields the header, then one Markdown row per model."""
  yield f"| model | params ({num_classes} classes) | GFLOPs | input | paper |"
  yield "|---|---:|---:|---|---|"
  for name in names:
    entry = model_info(name)
    model = entry.factory(num_classes=num_classes)
    shape = (1, entry.input_size, entry.input_size, entry.in_channels)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    params = count_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
    gflops = flops(model, shape) if with_flops else None
    cost = f"{gflops:.4g}" if gflops is not None else "-"
    size = f"{entry.input_size}x{entry.input_size}x{entry.in_channels}"
    yield f"| {name} | {params:,} | {cost} | {size} | {entry.paper} |"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m attention_flax.models",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--pattern", default="*", help="shell-style filter, e.g. 'se*'")
  parser.add_argument("--include_test", action="store_true",
                      help="also list the tiny test-only variants")
  parser.add_argument("--num_classes", type=int, default=1000,
                      help="classifier width for the parameter count (CIFAR: 10)")
  parser.add_argument("--no_flops", action="store_true",
                      help="skip compiling for FLOPs (parameters only, faster)")
  args = parser.parse_args(argv)
  names = list_models(args.pattern, include_test=args.include_test)
  if not names:
    print(f"No model matches {args.pattern!r}; try --pattern='*'.", file=sys.stderr)
    return 1
  for row in table_rows(names, args.num_classes, not args.no_flops):
    print(row, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
