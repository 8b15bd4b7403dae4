"""Test-wide settings: strict dtype promotion catches silent float64/float32 mixing."""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng():
  return jax.random.PRNGKey(0)
