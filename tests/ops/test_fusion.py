"""attention_flax.ops.fusion.materialize: the identity, computed once on CPU, and its uses."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from attention_flax import ops
from attention_flax.models import resnet
from attention_flax.ops import tail
from attention_flax.ops.fusion import materialize

SPECIALS = [[0.0, -0.0, 1.5, -2.25, 1.0], [np.inf, -np.inf, np.nan, 6.0e4, -3.0e-3]]


def _bits(x):
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_values_are_bit_identical(dtype):
  # Each element is divided by a 1 made from its own sign bit: every bit stays.
  x = jnp.asarray(SPECIALS, dtype)
  y = jax.jit(materialize)(x)
  assert y.dtype == x.dtype and y.shape == x.shape
  np.testing.assert_array_equal(_bits(y), _bits(x))


def test_derivatives_are_the_identity():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5))
  w = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(materialize(v) * w)))(x)
  np.testing.assert_array_equal(grad, w)
  _, tangent = jax.jvp(materialize, (x,), (w,))
  np.testing.assert_array_equal(tangent, w)
  batched = jax.vmap(materialize)(x)
  np.testing.assert_array_equal(batched, x)


def test_rejects_integers_and_passes_empty_arrays():
  with pytest.raises(TypeError, match="floating-point"):
    materialize(jnp.arange(4))
  empty = jnp.zeros((0, 3), jnp.float32)
  assert materialize(empty).shape == (0, 3)


def _widest_fusion(fn, *args):
  """The most operands of any fusion in fn's compiled CPU program."""
  compiled = jax.jit(fn, compiler_options=ops.cpu_compiler_options()).lower(*args).compile()
  text = compiled.as_text()
  entry = text[text.index("ENTRY"):]
  return max(m.group(1).count("%") for m in re.finditer(r" fusion\(([^)]*)\)", entry))


def _residual_chain(fence):
  def loss(kernels, x):
    y = x
    for k in kernels:
      h = lax.conv_general_dilated(y, k, (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = fence(jnp.maximum(h * 1.1 + 0.2 + y, 0.0))
    return jnp.sum(y * y)
  return jax.grad(loss)


def test_residual_chain_is_not_recomputed_on_cpu():
  # Six blocks of relu(conv(y) * a + b + y): without the fence each block's fusion
  # re-derives the blocks before it (its operand count grows along the chain).
  keys = jax.random.split(jax.random.PRNGKey(0), 7)
  kernels = [0.1 * jax.random.normal(k, (1, 1, 32, 32)) for k in keys[:6]]
  x = jax.random.normal(keys[6], (4, 6, 6, 32))
  plain = _widest_fusion(_residual_chain(lambda v: v), kernels, x)
  fenced = _widest_fusion(_residual_chain(materialize), kernels, x)
  assert plain >= 7, plain
  assert fenced <= 5, (fenced, plain)
  np.testing.assert_allclose(jax.jit(_residual_chain(materialize))(kernels, x),
                             jax.jit(_residual_chain(lambda v: v))(kernels, x), rtol=1e-6)


def _model_loss(model):
  """(a squared-logits loss, the model's parameters) for a training step of ``model`` on
  a fixed 16 x 16 batch. Each test differentiates it afresh after a monkeypatch: jit
  caches what it traced per function object."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(1), x)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.sum(logits ** 2)

  return loss, variables["params"]


def _check_fence(monkeypatch, loss, params):
  """The widest fusion of loss's gradient is narrower with the tail's ``materialize``
  (``attention_flax.ops.tail``) than with the identity in its place, and the gradients are
  the same either way."""
  fenced_values = jax.jit(jax.grad(loss))(params)
  fenced = _widest_fusion(jax.grad(loss), params)
  monkeypatch.setattr(tail, "materialize", lambda v: v)
  plain = _widest_fusion(jax.grad(loss), params)
  assert fenced < plain, (fenced, plain)
  chex.assert_trees_all_close(fenced_values, jax.jit(jax.grad(loss))(params), rtol=1e-5,
                              atol=1e-6)


def test_bottleneck_stage_outputs_are_materialized(monkeypatch):
  # ops.bottleneck_tail, the Bottleneck's default tail, writes each block's output once.
  model = resnet.ResNet(stage_sizes=(4,), block=resnet.Bottleneck, widths=(8,), num_classes=3)
  assert resnet.Bottleneck.default_tail is ops.bottleneck_tail
  _check_fence(monkeypatch, *_model_loss(model))


def test_cbam_channel_gated_map_is_materialized(monkeypatch):
  # A folded CBAM block's spatial gate (CBAM.after_gate, called by ops.residual_tail) reads
  # the channel-gated map in its pools, its product and their gradients; left to fusion,
  # each of those fusions re-derives the map from the convolution's output, the norm's
  # scale and shift and the gate.
  model = resnet.ResNet(stage_sizes=(2,), block=resnet.BasicBlock, widths=(8,),
                        num_classes=3, attn="cbam")
  assert resnet.BasicBlock.default_tail is ops.residual_tail
  _check_fence(monkeypatch, *_model_loss(model))
