"""attention_flax.ops.backends: FAST_PATHS and route, the seam's one per-backend choice."""

from __future__ import annotations

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax import ops
from attention_flax.ops.backends import FAST_PATHS, route
from attention_flax.ops.banded import banded_conv_general_dilated
from attention_flax.ops.convolution import conv_general_dilated
from attention_flax.ops.fusion import materialize
from attention_flax.ops.pooling import max_pool
from attention_flax.ops.sampler import grid_sample
from attention_flax.ops.stats import mean_and_max

NHWC = ("NHWC", "HWIO", "NHWC")


def _lowered(fn, platforms, *args):
  """The StableHLO text of ``jit(fn)`` lowered for ``platforms``; no such device needed."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=platforms).as_text()


def _normal(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape)


def test_route_calls_plain_when_no_backend_is_listed(monkeypatch):
  x = _normal((3, 4), 0)
  monkeypatch.setitem(FAST_PATHS, "test_path", ())
  f = lambda v: route("test_path", jnp.sin, jnp.cos, v)
  assert "platform_index" not in str(jax.make_jaxpr(f)(x))
  text = _lowered(f, ("cpu",), x)
  assert "stablehlo.cosine" in text and "stablehlo.sine" not in text
  assert "stablehlo.case" not in text and text == _lowered(f, ("cuda",), x)
  np.testing.assert_array_equal(jax.jit(f)(x), jnp.cos(x))


@pytest.mark.parametrize("platform, fast", [("cpu", True), ("cuda", False), ("tpu", False)])
def test_route_calls_fast_on_the_listed_backends_only(monkeypatch, platform, fast):
  x = _normal((3, 4), 0)
  monkeypatch.setitem(FAST_PATHS, "test_path", ("cpu",))
  f = lambda v: route("test_path", jnp.sin, jnp.cos, v)
  assert "platform_index" in str(jax.make_jaxpr(f)(x))  # chosen at lowering time
  text = _lowered(f, (platform,), x)
  assert ("stablehlo.sine" in text) == fast and ("stablehlo.cosine" in text) != fast
  assert "stablehlo.case" in text
  np.testing.assert_array_equal(jax.jit(f)(x), jnp.sin(x))  # these tests run on CPU
  with pytest.raises(KeyError):
    route("no_such_path", jnp.sin, jnp.cos, x)


def _paths_in_sources():
  """The path names that attention_flax/ops passes to route()."""
  folder = pathlib.Path(ops.__file__).parent
  return {name for source in folder.glob("*.py")
          for name in re.findall(r"\broute\(\s*\"(\w+)\"", source.read_text())}


def test_every_path_in_the_table_is_routed_and_every_route_is_in_the_table():
  assert _paths_in_sources() == set(FAST_PATHS)


# One computation per path that takes it (small shapes; (x, y) -> array or tuple of arrays).
_X4 = _normal((2, 6, 6, 4), 1)


def _conv_kernel_grad(x, k):  # an unpadded 1 x 1 kernel's gradient: the "1x1" route
  return jax.grad(lambda k: jnp.sum(jnp.sin(conv_general_dilated(
      x, k, (1, 1), "VALID", dimension_numbers=NHWC))))(k)


def _strided_1x1(x, k):
  return conv_general_dilated(x, k, (2, 2), "VALID", dimension_numbers=NHWC)


def _banded(x, k):
  return banded_conv_general_dilated(x[..., :2], k, (1, 1), ((3, 3), (3, 3)),
                                     dimension_numbers=NHWC)


def _max_pool_grad(x, _):
  return jax.grad(lambda v: jnp.sum(jnp.sin(max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))))))(x)


def _materialize(x, _):
  return materialize(x)


def _mean_and_max(x, _):
  return mean_and_max(x, (1, 2))


# Sampling grids made outside the traced functions: JAX's random bits lower differently
# per platform.
_GRIDS = [jax.random.uniform(jax.random.key(seed), (2, 5, 4, 2), minval=-1.2, maxval=1.2)
          for seed in range(3)]


def _sampler_grad(x, _):
  return jax.grad(lambda v, g: jnp.sum(jnp.sin(grid_sample(v, g))), argnums=(0, 1))(
      x, _GRIDS[0])


def _sampler_one_channel(x, _):
  return grid_sample(x[..., :1], _GRIDS[1])


def _sampler_rgb_nearest(x, _):
  return grid_sample(x[..., :3], _GRIDS[2], mode="nearest")


PATHS = {
    "conv_kernel_grad": (_conv_kernel_grad, (1, 1, 4, 3)),
    "strided_1x1": (_strided_1x1, (1, 1, 4, 3)),
    "banded_conv": (_banded, (7, 7, 2, 1)),
    "max_pool_jvp": (_max_pool_grad, (1,)),
    "materialize": (_materialize, (1,)),
    "fused_reductions": (_mean_and_max, (1,)),
    "sampler_vjp": (_sampler_grad, (1,)),
    "sampler_padded_taps": (_sampler_one_channel, (1,)),
    "sampler_rgb_rows": (_sampler_rgb_nearest, (1,)),
}


def test_every_path_has_a_case_below():
  assert set(PATHS) == set(FAST_PATHS)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_each_path_is_chosen_by_its_entry_alone(monkeypatch, path):
  # Every other path off: the program switches per platform exactly while this path lists
  # a backend (a platform_index and, lowered, a stablehlo.case); with its entry empty it
  # is the plain program for every platform, with the same values.
  fn, k_shape = PATHS[path]
  x, k = _X4, _normal(k_shape, 5)
  assert FAST_PATHS[path], f"{path} is taken nowhere"
  for other in FAST_PATHS:
    monkeypatch.setitem(FAST_PATHS, other, ())
  monkeypatch.setitem(FAST_PATHS, path, ("cpu",))
  program = lambda platform: _lowered(lambda x, k: fn(x, k), (platform,), x, k)
  jaxpr = lambda: str(jax.make_jaxpr(lambda x, k: fn(x, k))(x, k))
  assert "platform_index" in jaxpr()
  assert "stablehlo.case" in program("cpu")
  fast = jax.jit(lambda x, k: fn(x, k))(x, k)
  monkeypatch.setitem(FAST_PATHS, path, ())
  assert "platform_index" not in jaxpr()
  assert "stablehlo.case" not in program("cpu")
  assert program("cpu") == program("cuda")
  plain = jax.jit(lambda x, k: fn(x, k))(x, k)
  chex.assert_trees_all_close(fast, plain, rtol=1e-5, atol=1e-5)
  assert max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(plain)) > 0.1
