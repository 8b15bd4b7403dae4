"""Compiler options for ``jax.jit`` on CPU.

:func:`cpu_compiler_options` keeps XLA:CPU's convolutions out of its YNNPACK library
fusions (dots and reductions stay with the library). ``python -m train`` and the
benchmark compile with them on CPU; ``attention_flax.ops.compiler_options()`` gives the
options for the default backend. Measurements: docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp


# XLA:CPU's library fusions left to YNNPACK: dots and reductions. Its convolutions are
# slower than XLA's own; without its reductions batch-norm statistics become slow
# reduce-windows (docs/benchmarks.md, "XLA's own convolution kernels on CPU").
_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
CPU_COMPILER_OPTIONS = {
    _YNN_FUSIONS: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_options_accepted() -> bool:
  try:
    cpu = jax.devices("cpu")[0]
    probe = jax.ShapeDtypeStruct((1,), jnp.float32,
                                 sharding=jax.sharding.SingleDeviceSharding(cpu))
    jax.jit(jnp.negative, compiler_options=CPU_COMPILER_OPTIONS).lower(probe).compile()
  except RuntimeError:  # No CPU backend, or a jaxlib without this option or these values.
    return False
  return True


def cpu_compiler_options() -> dict[str, str]:
  """``compiler_options`` for ``jax.jit`` of CPU computations (module docstring).

  ``CPU_COMPILER_OPTIONS`` when this jaxlib accepts them (checked once, by compiling a
  one-element negation), else ``{}``; also ``{}`` when the environment's ``XLA_FLAGS``
  already set the library fusions (``--xla_cpu_experimental_ynn_fusion_type``), which
  then decide. Only for computations placed on CPU: other backends ignore or reject them.
  """
  if _YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""):
    return {}
  return dict(CPU_COMPILER_OPTIONS) if _cpu_options_accepted() else {}
