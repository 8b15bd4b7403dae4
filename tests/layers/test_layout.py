"""Every registered layer refuses a channels-first batch where it can tell: initialised on
an NHWC batch, it is applied to the same batch transposed to NCHW and raises a one-line
ValueError naming the transpose; the NHWC batch still works. Layers whose parameters do not
depend on C cannot tell, and say so in their docstrings."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from attention_flax.layers import ATTENTIONS, create_attention
from attention_flax.layers.common import built_channels, check_layout
from tests.layers.test_registry import CASES

# Parameter-free in C: the same parameters fit any width (ECA's 1-D kernel slides over
# the channels, the spatial attention pools them away).
CANNOT_TELL = {"eca", "ecam", "ceca", "spatial"}


def _cls(name):
  factory = ATTENTIONS[name]
  while isinstance(factory, functools.partial):
    factory = factory.func
  return factory


@functools.lru_cache(maxsize=None)
def _built(name):
  """The layer, the shapes of its variables and an NHWC batch. The check runs on shapes
  before any computation, so tracing (``jax.eval_shape``) is all these tests need."""
  kwargs, shape, _ = CASES[name]
  layer = create_attention(name, **kwargs)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  return layer, jax.eval_shape(layer.init, jax.random.PRNGKey(1), x), x


def _apply_shape(layer, variables, x):
  return jax.eval_shape(lambda v, x: layer.apply(v, x), variables, x)


@pytest.mark.parametrize("name", sorted(set(CASES) - CANNOT_TELL))
def test_channels_first_is_refused_in_one_line(name):
  layer, variables, x = _built(name)
  n, h, w, c = x.shape
  assert c not in (h, w), "pick a case shape whose C differs from H and W"
  with pytest.raises(ValueError) as info:
    _apply_shape(layer, variables, jnp.transpose(x, (0, 3, 1, 2)))
  message = str(info.value)
  assert "\n" not in message
  assert "channels-first" in message and "x.transpose(0, 2, 3, 1)" in message
  assert f"{c} channels" in message
  y = _apply_shape(layer, variables, x)  # the NHWC batch still works
  assert y.shape[0] == n


@pytest.mark.parametrize("name", sorted(CANNOT_TELL))
def test_layers_that_cannot_tell_say_so(name):
  assert "cannot tell a channels-first" in " ".join(_cls(name).__doc__.split())


@pytest.mark.parametrize("name", sorted(set(CASES) - CANNOT_TELL))
def test_docstrings_say_init_cannot_tell(name):
  assert "caught only when the initialised layer is applied" in " ".join(
      _cls(name).__doc__.split())


def test_a_wrong_width_is_named_and_the_check_is_silent_at_init():
  layer, variables, x = _built("se")
  with pytest.raises(ValueError, match=r"initialised for 16 channels but got 12 \(shape"):
    _apply_shape(layer, variables, x[..., :12])
  # At init there is nothing to compare with; inside apply the parameters give C.
  from flax import linen as nn

  class Probe(nn.Module):
    @nn.compact
    def __call__(self, x):
      seen = built_channels(self, "fc", "kernel")
      check_layout(self, x, "fc", "kernel")
      return nn.Dense(3, name="fc")(x), seen

  probe = Probe()
  v = probe.init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 5)))
  _, seen = probe.apply(v, jnp.ones((1, 2, 2, 5)))
  assert seen == 5
  assert built_channels(probe.bind(v), "missing", "kernel") is None
  with pytest.raises(ValueError, match="channels-first"):
    probe.apply(v, jnp.ones((1, 5, 2, 2)))
