"""The one seam for speed: every backend-specific path of the library, behind factories.

The layers and models are plain Flax; their default building blocks come from here and
compute the same values as the plain ones (to float rounding), faster:

* :data:`conv`: ``flax.linen.Conv`` whose kernel gradient is a matrix product on CPU
  (:mod:`~attention_flax.ops.convolution`); the models' default convolution.
* :data:`spatial_conv`: ``flax.linen.Conv`` that runs few-channel, one-output
  convolutions (CBAM's spatial gate) as a banded matrix product
  (:mod:`~attention_flax.ops.banded`).
* :func:`max_pool`: ``flax.linen.max_pool`` with a slice-based derivative on CPU.
* :func:`mean_and_max`: ``jnp.mean`` and ``jnp.max`` over the same axes in one pass.
* :func:`grid_sample`: :func:`attention_flax.sampling.grid_sample` with a hand-written
  gradient (no forward mode).
* :func:`residual_tail`, :func:`bottleneck_tail`: the end of a residual block, with a
  channel gate folded into its last batch norm (:mod:`~attention_flax.ops.tail`).
* :func:`materialize`: the identity, computed once on CPU.
* :func:`compiler_options`: options for ``jax.jit`` on the current backend.

Which backend takes which path is decided in one table, :data:`backends.FAST_PATHS`.
To build any model from plain Flax instead, pass ``flax.linen.Conv``,
``flax.linen.max_pool``, ``attention_flax.sampling.grid_sample`` and the plain tail
(``attention_flax.models.plain_factories`` collects them).
"""

from __future__ import annotations

import functools

import jax
from flax import linen as nn

from attention_flax.ops.backends import FAST_PATHS, route
from attention_flax.ops.banded import banded_conv_general_dilated
from attention_flax.ops.compiler import cpu_compiler_options
from attention_flax.ops.convolution import conv_general_dilated
from attention_flax.ops.fusion import materialize
from attention_flax.ops.pooling import max_pool
from attention_flax.ops.sampler import grid_sample
from attention_flax.ops.stats import mean_and_max
from attention_flax.ops.tail import bottleneck_tail, residual_tail

conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
spatial_conv = functools.partial(nn.Conv, conv_general_dilated=banded_conv_general_dilated)


def compiler_options(backend: str | None = None) -> dict[str, str]:
  """``compiler_options`` for ``jax.jit`` on ``backend`` (default: JAX's default backend):
  :func:`~attention_flax.ops.compiler.cpu_compiler_options` on CPU, none elsewhere."""
  backend = backend or jax.default_backend()
  return cpu_compiler_options() if backend == "cpu" else {}


__all__ = [
    "FAST_PATHS", "banded_conv_general_dilated", "bottleneck_tail", "compiler_options",
    "conv", "conv_general_dilated", "cpu_compiler_options", "grid_sample", "materialize",
    "max_pool", "mean_and_max", "residual_tail", "route", "spatial_conv",
]
