"""Keeping XLA:CPU from recomputing a residual network's trunk in every later block.

XLA fuses an element-wise operation into each of its consumers, copying it when there are
several, as long as the copy reads no more bytes than it writes. A residual block's output
``relu(branch + shortcut)`` qualifies, and its consumers (the next block's residual
addition, the reshape before its 1 x 1 convolution, the gradient's ReLU mask) are all
fusible. So each block's output fusion recomputes the output of the block before it, and
of the one before that, back to the start of the stage: on CPU, in SE-ResNet-50's stage 3
at 112 x 112, the sixth block's output fusion read the last convolution's output of all
six blocks instead of one tensor. SE and CBAM make each recomputed link dearer (the gate's
product): SE-ResNet-50's 30 block-output fusions took 196 ms of its CPU step, against
ResNet-50's 91 ms.

:func:`materialize` returns its input unchanged, computed once and read back by every
consumer. ``lax.optimization_barrier`` cannot do this on CPU: XLA:CPU removes barriers
before fusion. What works is a floating-point division, one of the operations XLA will
not copy into several consumers, by a 1 that the compiler cannot fold: each element is
divided by ``1 + 0 * b``, with b its own sign bit (0 or 1). A division by a constant 1 is
folded away, and a product with the unfoldable 1 is copied like any other product (both
tried). Each element's 1 comes from the element itself, so a batch split over several
devices needs no communication for it.

``x / 1`` is x in IEEE arithmetic for every value, signed zeros, infinities and NaN
included (XLA:CPU flushes subnormal numbers to zero here as in every arithmetic
operation, the ReLU before it included), and the derivative, ``g / 1``, is exact too. The
work added is a few operations per element, fused into the producer of x. Only on CPU,
chosen at lowering time by ``lax.platform_dependent``; other backends get x untouched.

The bottleneck blocks of ``attention_flax.models.resnet`` materialize their outputs: on a
2-core AMD EPYC (AVX2) machine the training steps of ResNet-50 and SE-ResNet-50 at 112 x
112 were 1.01-1.08x faster, CBAM-ResNet-50's within the noise (``docs/benchmarks.md``).
Basic blocks (ResNet-20, -56 and -34 tried) and the Residual Attention Network's units
measured the same with and without it, and are left alone. The ``CBAM`` layer
materializes the channel-gated map that its spatial gate reads, folded into a block or not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

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
  return lax.platform_dependent(x, cpu=_divided, default=lambda v: v)
