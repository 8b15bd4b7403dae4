"""``materialize``: keep XLA:CPU from recomputing a value inside each of its consumers.

XLA copies a cheap element-wise producer into every consumer fusion; a residual block's
output ``relu(branch + shortcut)`` is such a producer, so each later block's fusions can
recompute the blocks before it. :func:`materialize` returns its input divided by a 1 the
compiler cannot fold (``1 + 0 * signbit(x)``), an operation XLA will not duplicate, so
the value is computed once. ``lax.optimization_barrier`` does not do this on CPU (XLA:CPU
removes barriers before fusion). The identity in value and derivative; only on CPU.
Measurements: docs/benchmarks.md.
"""


from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from attention_flax.ops.backends import route

Array = jax.Array


def _divided(x: Array) -> Array:
  # 0 * b with b in {0, 1} is 0 whatever x holds; XLA folds x * 0 only for integers.
  one = 1 + 0 * jnp.signbit(lax.stop_gradient(x)).astype(x.dtype)
  return x / one


def materialize(x: Array) -> Array:
  """x itself, which XLA:CPU then computes once instead of inside each of its consumers.

  Values and derivatives (every mode: ``grad``, ``jvp``, ``vmap``) are exactly those of
  the identity, apart from subnormal numbers, which XLA:CPU flushes to zero in any
  arithmetic. Floating-point arrays only; every backend other than CPU gets x back as it
  is.
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"materialize takes floating-point arrays; got dtype {x.dtype}. Cast "
                    "first (x.astype(jnp.float32)) or leave integer arrays as they are.")
  return route("materialize", _divided, lambda v: v, x)
