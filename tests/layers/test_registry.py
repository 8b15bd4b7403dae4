"""Conformance suite: every registered attention layer honours the layer contract.

A new layer registered without an entry in ``CASES`` fails ``test_every_layer_has_a_case``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn

import attention_flax as af
from attention_flax.layers import ATTENTIONS, create_attention, list_attentions

# name -> (constructor kwargs, input shape (N, H, W, C), sown keys the layer must record).
CASES: dict[str, tuple[dict, tuple[int, int, int, int], set[str]]] = {
    "se": ({}, (2, 5, 7, 16), {"channel_gate"}),
    "ese": ({}, (2, 5, 7, 16), {"channel_gate"}),
    "eca": ({}, (2, 5, 7, 16), {"channel_gate"}),
    "ge": ({}, (2, 5, 7, 16), {"channel_gate"}),
    "spatial": ({}, (2, 9, 7, 6), {"spatial_mask"}),
    "cbam": ({}, (2, 9, 7, 32), {"channel_gate", "spatial_mask"}),
    "gc": ({}, (2, 5, 7, 16), {"context_weights"}),
    "coord": ({}, (2, 5, 7, 16), {"coord_gate_h", "coord_gate_w"}),
    "residual": ({"levels": 2}, (2, 11, 9, 16), {"residual_mask"}),
    "ecam": ({}, (2, 5, 7, 16), {"channel_gate"}),
    "ceca": ({}, (2, 5, 7, 16), {"channel_gate"}),
    "lcbam": ({}, (2, 9, 7, 32), {"channel_gate", "spatial_mask"}),
    "gca": ({}, (2, 5, 7, 16), {"context_weights"}),
    "stn": ({}, (2, 28, 28, 1), {"stn_theta", "stn_output"}),
    "nl": ({}, (2, 5, 7, 16), {"nl_attention"}),
    # H and W multiples of BAT's block_size (7); no channel dropout, which needs an rng.
    "bat": ({"drop_rate": 0.0}, (2, 14, 7, 32), {"bat_transforms"}),
    "scoord": ({}, (2, 5, 7, 16), {"coord_mask"}),
    "ela": ({}, (2, 5, 7, 16), {"coord_gate_h", "coord_gate_w"}),
    "strip": ({}, (2, 5, 7, 16), {"coord_mask"}),
    # BoTNet's tables fix the map size: taken from the input at init (feat_size=None).
    "bottleneck": ({}, (2, 6, 5, 16), {"pixel_attention"}),
    # HaloNet needs H and W multiples of block_size.
    "halo": ({"block_size": 4, "halo_size": 1, "num_heads": 4}, (2, 8, 8, 16),
             {"window_attention"}),
    "lambda": ({}, (2, 7, 6, 16), {"key_weights"}),
    "sk": ({}, (2, 5, 7, 16), {"branch_weights"}),
    "bam": ({}, (2, 9, 7, 32), {"bam_mask", "bam_channel", "bam_spatial"}),
    "splat": ({}, (2, 5, 7, 16), {"radix_weights"}),
}


def _inputs(shape, dtype=jnp.float32, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def _sown_keys(tree) -> set[str]:
  keys = set()

  def visit(node):
    for key, value in node.items():
      if isinstance(value, dict):
        visit(value)
      else:
        keys.add(key)

  visit(dict(tree))
  return keys


def test_every_layer_has_a_case():
  assert set(CASES) == set(list_attentions())


def test_registry_names_required_by_the_api():
  required = {"se", "ese", "eca", "ge", "spatial", "cbam", "gc", "coord", "residual", "stn",
              "ecam", "ceca", "lcbam", "gca"}
  assert required <= set(list_attentions())
  assert list_attentions() == sorted(list_attentions())


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError) as info:
    create_attention("squeeze")
  for name in list_attentions():
    assert name in str(info.value)


def test_create_attention_passes_kwargs_and_is_case_insensitive():
  layer = create_attention("SE", rd_ratio=0.25)
  assert isinstance(layer, ATTENTIONS["se"])
  assert layer.rd_ratio == 0.25


def test_package_exports_the_layers():
  for factory in ATTENTIONS.values():
    cls = getattr(factory, "func", factory)  # a registered functools.partial of a class
    assert getattr(af, cls.__name__) is cls


class JitConformanceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(name, name) for name in sorted(CASES)])
  def test_shape_finite_and_jit_equals_eager(self, name):
    kwargs, shape, _ = CASES[name]
    layer = create_attention(name, **kwargs)
    x = _inputs(shape)
    variables = layer.init(jax.random.PRNGKey(0), x)
    apply = self.variant(lambda v, x: layer.apply(v, x))
    y = apply(variables, x)
    reference = layer.apply(variables, x)
    chex.assert_shape(y, shape)
    chex.assert_tree_all_finite(y)
    np.testing.assert_allclose(np.asarray(y), np.asarray(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
class TestConformance:

  def test_attention_changes_the_input(self, name):
    """The layer must do something: at init the output differs from the input (STN and
    add-fused GC are identities at init by design, so their parameters are perturbed)."""
    kwargs, shape, _ = CASES[name]
    layer = create_attention(name, **kwargs)
    x = _inputs(shape)
    variables = layer.init(jax.random.PRNGKey(0), x)
    variables = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape, p.dtype),
        variables)
    y = layer.apply(variables, x)
    assert float(jnp.max(jnp.abs(y - x))) > 1e-3

  def test_sows_its_masks(self, name):
    kwargs, shape, keys = CASES[name]
    layer = create_attention(name, **kwargs)
    x = _inputs(shape)
    variables = layer.init(jax.random.PRNGKey(0), x)
    _, state = layer.apply(variables, x, mutable=["intermediates"])
    assert keys <= _sown_keys(state["intermediates"])

  def test_bfloat16(self, name):
    kwargs, shape, _ = CASES[name]
    layer32 = create_attention(name, **kwargs)
    layer16 = create_attention(name, dtype=jnp.bfloat16, **kwargs)
    x = _inputs(shape)
    variables = layer32.init(jax.random.PRNGKey(0), x)
    y16 = layer16.apply(variables, x.astype(jnp.bfloat16))
    y32 = layer32.apply(variables, x)
    assert y16.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(y16)
    scale = float(jnp.max(jnp.abs(y32))) + 1e-6
    error = float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32))) / scale
    assert error < 0.1, error

  def test_gradients_are_finite_and_nonzero(self, name):
    kwargs, shape, _ = CASES[name]
    layer = create_attention(name, **kwargs)
    x = _inputs(shape)
    variables = layer.init(jax.random.PRNGKey(0), x)

    def loss(params, x):
      y = layer.apply({**variables, "params": params}, x)
      return jnp.sum(y * y)

    grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    chex.assert_tree_all_finite((grad_params, grad_x))
    assert float(jnp.sum(jnp.abs(grad_x))) > 0.0

  def test_vmap_over_a_leading_axis(self, name):
    kwargs, shape, _ = CASES[name]
    layer = create_attention(name, **kwargs)
    x = _inputs((3,) + shape)
    variables = layer.init(jax.random.PRNGKey(0), x[0])
    y = jax.vmap(lambda xi: layer.apply(variables, xi))(x)
    expected = jnp.stack([layer.apply(variables, xi) for xi in x])
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)

  def test_train_mode_runs(self, name):
    kwargs, shape, _ = CASES[name]
    layer = create_attention(name, **kwargs)
    x = _inputs(shape)
    variables = layer.init(jax.random.PRNGKey(0), x)
    mutable = [c for c in variables if c != "params"]
    y, _ = layer.apply(variables, x, train=True, mutable=mutable)
    chex.assert_shape(y, shape)
    chex.assert_tree_all_finite(y)

  def test_rank_error_names_the_layout(self, name):
    kwargs, shape, _ = CASES[name]
    layer = create_attention(name, **kwargs)
    with pytest.raises(ValueError, match="NHWC"):
      layer.init(jax.random.PRNGKey(0), _inputs(shape[1:]))

  def test_integer_images_are_rejected(self, name):
    kwargs, shape, _ = CASES[name]
    layer = create_attention(name, **kwargs)
    with pytest.raises(TypeError, match="float"):
      layer.init(jax.random.PRNGKey(0), jnp.ones(shape, jnp.int32))


def test_user_block_example_from_readme():
  """The README's example: SE and CBAM inside a user's own block."""

  class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
      y = nn.Conv(self.features, (3, 3), padding=1)(x)
      y = af.SqueezeExcite(rd_ratio=1 / 4)(y)
      y = af.CBAM()(y, train=train)
      return nn.relu(x + y)

  x = _inputs((2, 8, 8, 16))
  block = Block(16)
  variables = block.init(jax.random.PRNGKey(0), x)
  y, state = block.apply(variables, x, mutable=["intermediates"])
  chex.assert_shape(y, x.shape)
  assert {"channel_gate", "spatial_mask"} <= _sown_keys(state["intermediates"])
