"""Naive attention learning (``naive=True``: ``M * T``) against attention residual learning
(``(1 + M) * T``), by value. The models' ``naive`` field: tests/train/test_activations.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from attention_flax.layers.residual import ResidualAttention

KEY = jax.random.PRNGKey(0)


def _images(shape, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _apply(module, variables, x):
  y, state = module.apply(variables, x, mutable=["intermediates"])
  sown = state["intermediates"]
  return np.asarray(y), np.asarray(sown["residual_mask"][0]), np.asarray(sown["trunk"][0])


@pytest.fixture(scope="module")
def bare_modules():
  """p = 0: the module's output is the masked trunk itself. Same weights both ways."""
  x = _images((2, 8, 8, 8))
  naive = ResidualAttention(p=0, t=1, r=1, levels=2, naive=True)
  default = ResidualAttention(p=0, t=1, r=1, levels=2)
  variables = default.init(KEY, x)
  return x, variables, naive, default


def test_naive_output_is_exactly_mask_times_trunk(bare_modules):
  x, variables, naive, _ = bare_modules
  y, mask, trunk = _apply(naive, variables, x)
  np.testing.assert_array_equal(y, mask * trunk)
  # Not vacuous: a mask that is neither 0 nor 1 nor constant, a trunk that is not the input.
  assert 0.2 < mask.mean() < 0.8 and mask.std() > 0.1
  assert np.abs(trunk - np.asarray(x)).max() > 0.1


def test_default_output_is_one_plus_mask_times_trunk(bare_modules):
  x, variables, naive, default = bare_modules
  y, mask, trunk = _apply(default, variables, x)
  np.testing.assert_array_equal(y, (1 + mask) * trunk)
  y_naive, mask_naive, trunk_naive = _apply(naive, variables, x)
  # The same mask and trunk; the outputs differ by exactly the trunk.
  np.testing.assert_array_equal(mask_naive, mask)
  np.testing.assert_array_equal(trunk_naive, trunk)
  np.testing.assert_allclose(y - y_naive, trunk, rtol=1e-6, atol=1e-6)


def test_post_units_receive_the_masked_trunk():
  x = _images((2, 8, 8, 8), seed=2)
  module = ResidualAttention(p=1, t=1, r=1, levels=1, naive=True)
  variables = module.init(KEY, x)
  seen = {}

  def record(next_fun, args, kwargs, context):
    if context.module.name == "post1" and context.method_name == "__call__":
      seen["post1"] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _, state = module.apply(variables, x, mutable=["intermediates"])
  sown = state["intermediates"]
  mask, trunk = np.asarray(sown["residual_mask"][0]), np.asarray(sown["trunk"][0])
  np.testing.assert_array_equal(seen["post1"], mask * trunk)
