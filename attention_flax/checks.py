"""Input checks shared by the layers, the samplers and the models.

Each raises an error that names the fix, before any computation, so that a wrong rank or
dtype never surfaces as an XLA shape error.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def check_images(x: Array, module: str) -> None:
  """Raises a clear error unless ``x`` is a floating (N, H, W, C) batch."""
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(
        f"{module} expects images in NHWC layout, a rank-4 array (N, H, W, C); "
        f"got shape {shape}. Add a batch axis with x[None] for a single image, "
        "or transpose NCHW input with x.transpose(0, 2, 3, 1).")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{module} expects floating-point images; got dtype {x.dtype}. "
        "Convert first, e.g. x.astype(jnp.float32) / 255.")


def check_float(a: Any, what: str) -> None:
  """Raises TypeError unless ``a`` has a floating dtype."""
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"{what} must be floating point; got dtype {a.dtype}. "
                    "Convert first, e.g. .astype(jnp.float32).")


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
  """Raises ValueError unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}.")


def accumulation_dtype(*dtypes) -> jnp.dtype:
  """float64 if any of ``dtypes`` is, else float32: the precision of sums, counts and
  sampling positions whatever the inputs' (a bfloat16 running sum stops growing at 256
  times its increment; bfloat16 coordinates are a quarter pixel off on a 64-pixel image)."""
  return jnp.dtype(jnp.float64 if any(d == jnp.float64 for d in dtypes) else jnp.float32)
