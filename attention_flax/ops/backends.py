"""Which backends take each fast path: the seam's one per-backend choice.

Every fast path of ``attention_flax.ops`` goes through :func:`route`, which picks between
the fast and the plain implementation at lowering time (``lax.platform_dependent``) from
:data:`FAST_PATHS`. Both implementations give the same values (to float rounding); a
backend not listed for a path gets the plain one. Edit the table to try a path elsewhere.
"""

from __future__ import annotations

from typing import Any, Callable

from jax import lax

FAST_PATHS: dict[str, tuple[str, ...]] = {
    # ops.convolution: the kernel gradient as patch / 1x1 matrix products.
    "conv_kernel_grad": ("cpu",),
    # ops.convolution: a strided unpadded 1x1 convolution as one product of the pixels.
    "strided_1x1": ("cpu",),
    # ops.banded: few-channel stride-1 convolutions as a banded product along W.
    "banded_conv": ("cpu", "cuda"),
    # ops.pooling: the max pool's derivative as strided slices.
    "max_pool_jvp": ("cpu",),
    # ops.fusion: values written once instead of recomputed in every consumer fusion.
    "materialize": ("cpu",),
    # ops.stats: sums, maxima and tie counts in one variadic reduction.
    "fused_reductions": ("cpu",),
    # ops.bilinear: the bilinear sampler's hand-written gradient.
    "sampler_vjp": ("cpu",),
    # ops.sampler: one channel read from a zero-padded copy (one index per point).
    "sampler_padded_taps": ("cpu",),
    # ops.sampler: RGB gathered (and its gradient scattered) in rows of four.
    "sampler_rgb_rows": ("cpu",),
}


def route(path: str, fast: Callable[..., Any], plain: Callable[..., Any], *args: Any) -> Any:
  """``fast(*args)`` on the backends :data:`FAST_PATHS` lists for ``path``, else
  ``plain(*args)``; chosen when the computation is lowered for its backend."""
  platforms = FAST_PATHS[path]
  if not platforms:
    return plain(*args)
  return lax.platform_dependent(*args, default=plain, **dict.fromkeys(platforms, fast))
