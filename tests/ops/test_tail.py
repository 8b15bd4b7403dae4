"""attention_flax.ops.tail: the folded residual tail equals models.common.plain_tail."""

from __future__ import annotations

import functools
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from attention_flax import ops
from attention_flax.layers import create_attention
from attention_flax.layers.hybrid import GlobalContext
from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.models.common import plain_tail
from attention_flax.ops.tail import bottleneck_tail, foldable, residual_tail

SHAPE = (3, 6, 5, 16)  # (N, H, W, C)


class Tail(nn.Module):
  """``tail(y, shortcut, norm=bn, attn=se, act=relu, train=train)`` with its own children."""
  tail: Callable[..., Any]
  attn: str | None
  norm: Callable[..., nn.Module] = TorchBatchNorm

  @nn.compact
  def __call__(self, y, shortcut, train: bool = False):
    bn = self.norm(use_running_average=not train, name="bn")
    attn = None if self.attn is None else create_attention(self.attn, name="se")
    return self.tail(y, shortcut, norm=bn, attn=attn, act=nn.relu, train=train)


def _inputs():
  y = jax.random.normal(jax.random.key(0), SHAPE) * jnp.linspace(0.5, 2.0, SHAPE[-1]) + 0.7
  shortcut = jax.random.normal(jax.random.key(1), SHAPE)
  cot = jax.random.normal(jax.random.key(2), SHAPE)
  return y, shortcut, cot


def _variables(attn, scale):
  """The plain tail's variables, with the last norm's scale set and non-trivial running
  statistics (an evaluation step uses them)."""
  y, shortcut, _ = _inputs()
  variables = Tail(plain_tail, attn).init(jax.random.key(3), y, shortcut, train=True)
  variables = jax.tree.map(lambda v: v, variables)  # a mutable copy
  channels = SHAPE[-1]
  variables["params"]["bn"]["scale"] = scale
  variables["params"]["bn"]["bias"] = jnp.linspace(-0.5, 0.4, channels)
  variables["batch_stats"]["bn"]["mean"] = jnp.linspace(0.2, 1.0, channels)
  variables["batch_stats"]["bn"]["var"] = jnp.linspace(0.5, 3.0, channels)
  return variables


def _step(tail, attn, variables, train):
  """(output, (params, y, shortcut) gradients of a non-linear read-out, updated batch
  stats, sown intermediates) of one call of the tail."""
  module = Tail(tail, attn)
  y, shortcut, cot = _inputs()

  def loss(params, y, shortcut):
    out, state = module.apply({**variables, "params": params}, y, shortcut, train=train,
                              mutable=["batch_stats", "intermediates"])
    return jnp.sum(jnp.sin(out) * cot), (out, state)

  grads, (out, state) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
      variables["params"], y, shortcut)
  return out, grads, state["batch_stats"], state.get("intermediates", {})


SCALES = {
    # Mixed signs: CBAM's max pool of the normalised map comes from max(y), min(y) and,
    # where the scale is zero, from the bias alone.
    "mixed": jnp.linspace(-1.0, 1.5, SHAPE[-1]).at[5].set(0.0),
    # zero_init_last: every entry of a channel ties at the maximum; the scale's gradient
    # is still the layered tail's.
    "zero": jnp.zeros(SHAPE[-1]),
}


@pytest.mark.parametrize("scale", sorted(SCALES))
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("attn", ["se", "eca", "ese", "cbam"])
def test_folded_tail_equals_the_plain_tail(attn, train, scale):
  variables = _variables(attn, SCALES[scale])
  folded = _step(residual_tail, attn, variables, train)
  plain = _step(plain_tail, attn, variables, train)
  chex.assert_trees_all_close(folded[0], plain[0], atol=2e-5, rtol=2e-5)  # output
  chex.assert_trees_all_close(folded[1], plain[1], atol=2e-5, rtol=2e-5)  # gradients
  chex.assert_trees_all_close(folded[2], plain[2], atol=1e-6, rtol=1e-6)  # batch stats
  chex.assert_trees_all_close(folded[3], plain[3], atol=1e-6, rtol=1e-6)  # sown gates
  # Not a comparison of zeros or of untouched statistics.
  d_params, d_y, d_shortcut = plain[1]
  assert float(jnp.abs(d_params["bn"]["scale"]).max()) > 1e-3
  assert float(jnp.abs(d_shortcut).max()) > 1e-3
  if scale == "mixed":  # a zero scale passes no gradient to y
    assert float(jnp.abs(d_y).max()) > 1e-3
  if train:
    assert not np.allclose(plain[2]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
  else:
    chex.assert_trees_all_close(plain[2], variables["batch_stats"])
  gates = jax.tree.leaves(plain[3])
  if scale == "mixed":
    assert max(float(jnp.std(g)) for g in gates) > 1e-3


def test_folded_tail_never_writes_the_normalised_map():
  # The folded SE tail's jaxpr multiplies y by one (N, 1, 1, C) factor: no (N, H, W, C)
  # product with the norm's mul alone, as the plain tail computes before it gates.
  variables = _variables("se", SCALES["mixed"])
  y, shortcut, _ = _inputs()

  def full_size_ops(tail):
    fn = lambda v: Tail(tail, "se").apply(v, y, shortcut, train=True, mutable=["batch_stats"])
    jaxpr = jax.make_jaxpr(fn)(variables).jaxpr
    return sum(1 for eqn in jaxpr.eqns for v in eqn.outvars
               if getattr(v.aval, "shape", None) == SHAPE)

  assert full_size_ops(residual_tail) < full_size_ops(plain_tail)


@pytest.mark.parametrize("attn", [None, "gc", "spatial"])
def test_tail_without_a_foldable_gate_is_the_plain_tail(attn):
  variables = _variables(attn, SCALES["mixed"])
  if attn is not None:
    assert not foldable(TorchBatchNorm(), create_attention(attn))
  folded = _step(residual_tail, attn, variables, True)
  plain = _step(plain_tail, attn, variables, True)
  chex.assert_trees_all_equal(folded[0], plain[0])
  chex.assert_trees_all_close(folded[1:], plain[1:], atol=1e-6, rtol=1e-6)


def test_norm_without_fold_is_applied_before_the_gate():
  # Flax's own BatchNorm cannot fold: the tail normalises, then gates, as plain_tail.
  norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
  assert not foldable(norm(), create_attention("se"))
  y, shortcut, _ = _inputs()
  outs = []
  for tail in (residual_tail, plain_tail):
    module = Tail(tail, "se", norm=norm)
    variables = module.init(jax.random.key(3), y, shortcut, train=True)
    outs.append(module.apply(variables, y, shortcut, train=True, mutable=["batch_stats"]))
  chex.assert_trees_all_equal(*outs)


def test_foldable_needs_pools_a_gate_from_pooled_and_a_norm_that_folds():
  bn = TorchBatchNorm()
  for name in ("se", "ese", "eca", "cbam"):
    assert foldable(bn, create_attention(name)), name
  assert not foldable(bn, None)
  assert not foldable(bn, GlobalContext())
  assert not foldable(nn.BatchNorm(), create_attention("se"))


@pytest.mark.parametrize("attn", ["se", "cbam"])
def test_bottleneck_tail_equals_the_residual_tail(attn):
  # The same values: materialize is the identity.
  variables = _variables(attn, SCALES["mixed"])
  chex.assert_trees_all_close(_step(bottleneck_tail, attn, variables, True),
                              _step(residual_tail, attn, variables, True),
                              atol=1e-6, rtol=1e-6)
  assert ops.bottleneck_tail is bottleneck_tail and ops.residual_tail is residual_tail
