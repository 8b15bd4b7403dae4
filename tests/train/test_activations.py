"""train.activations: the mean absolute features around every Residual Attention module,
and the models' ``naive`` field reaching every module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from attention_flax import models
from train import activations, errors

KEY = jax.random.PRNGKey(0)


class Plain(nn.Module):
  """A model without attention modules."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def tiny_measurements():
  """A two-stage tiny CIFAR network, p = 0, measured both ways, same weights."""
  images = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 3), jnp.float32)
  out = {}
  variables = None
  for naive in (False, True):
    model = models.create_model("attention_tiny_cifar", p=0, naive=naive, stage_widths=(8, 16),
                                stage_modules=(1, 1), stage_levels=(1, 1), stage_strides=(1, 2))
    if variables is None:
      variables = model.init(KEY, images[:1], train=False)
    out[naive] = activations.measure(model, variables, images, batch_stats=True)
  return out


def test_the_models_pass_naive_to_every_module(tiny_measurements):
  for naive, result in tiny_measurements.items():
    rows = result["modules"]
    assert [r["path"] for r in rows] == ["stage1_attn1", "stage2_attn1"]
    assert [r["naive"] for r in rows] == [naive] * 2


def test_measurements_obey_the_identities_of_the_two_products(tiny_measurements):
  # |(1 + M) T| - |M T| = |T| element by element (M > 0), so also for the means; the first
  # module sees the same input and computes the same trunk and mask both ways.
  arl = tiny_measurements[False]["modules"][0]
  nal = tiny_measurements[True]["modules"][0]
  for key in ("input", "trunk", "mask"):
    assert arl[key] == pytest.approx(nal[key], rel=1e-6)
  assert arl["masked"] - nal["masked"] == pytest.approx(arl["trunk"], rel=1e-5)
  for result in tiny_measurements.values():
    for row in result["modules"]:  # p = 0: the output is the masked trunk
      assert row["output"] == pytest.approx(row["masked"], rel=1e-6)
      assert 0.0 < row["mask"] < 1.0
    assert sorted(result["stages"]) == ["stage1", "stage2"]


def test_a_model_without_residual_attention_is_refused():
  x = jnp.ones((2, 4, 4, 1), jnp.float32)
  plain = Plain()
  with pytest.raises(errors.UserError, match="no ResidualAttention module"):
    activations.measure(plain, plain.init(KEY, x), x)
