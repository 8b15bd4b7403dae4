"""TorchBatchNorm: one-pass shifted statistics against the two-pass formula; its fold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax.layers.norm import TorchBatchNorm

KEY = jax.random.key(0)


def _two_pass(x, scale, bias, eps=1e-5):
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def _variables(bn, x, running_mean):
  variables = bn.init(KEY, x, use_running_average=False)
  scale = jnp.linspace(0.5, 2.0, x.shape[-1])
  bias = jnp.linspace(-1.0, 1.0, x.shape[-1])
  return {"params": {"scale": scale, "bias": bias},
          "batch_stats": {"mean": jnp.full((x.shape[-1],), running_mean, jnp.float32),
                          "var": jnp.ones((x.shape[-1],), jnp.float32)}}


@pytest.mark.parametrize("offset, running_mean, rtol", [
    (0.0, 0.0, 1e-5),
    (1000.0, 1000.0, 1e-4),  # trained: the running mean is near the batch mean
    (1000.0, 999.0, 1e-3),
    (10.0, 0.0, 1e-3),  # first steps: shift 0, moderate mean
])
def test_statistics_and_output_equal_two_pass(offset, running_mean, rtol):
  x = jax.random.normal(KEY, (4, 5, 6, 3)) * jnp.array([1.0, 0.5, 2.0]) + offset
  bn = TorchBatchNorm()
  variables = _variables(bn, x, running_mean)
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  x64 = np.asarray(x, np.float64)
  var64 = x64.var(axis=(0, 1, 2))
  n = x.size // x.shape[-1]
  np.testing.assert_allclose(updates["batch_stats"]["mean"],
                             0.9 * running_mean + 0.1 * x64.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * var64 * n / (n - 1),
                             rtol=rtol)
  want = _two_pass(jnp.asarray(x64), variables["params"]["scale"],
                   variables["params"]["bias"])
  np.testing.assert_allclose(y, want, atol=30 * rtol, rtol=0)


def test_gradients_equal_two_pass():
  # The shift is a constant: the gradient is that of the plain formula, whatever it is.
  x = jax.random.normal(KEY, (3, 4, 4, 2)) * 2.0 + 1.5
  bn = TorchBatchNorm()
  variables = _variables(bn, x, 0.7)
  cot = jax.random.normal(jax.random.key(1), x.shape)

  def ours(x, params):
    y, _ = bn.apply({**variables, "params": params}, x, use_running_average=False,
                    mutable=["batch_stats"])
    return jnp.sum(y * cot)

  def reference(x, params):
    return jnp.sum(_two_pass(x, params["scale"], params["bias"]) * cot)

  g_ours = jax.grad(ours, argnums=(0, 1))(x, variables["params"])
  g_ref = jax.grad(reference, argnums=(0, 1))(x, variables["params"])
  np.testing.assert_allclose(g_ours[0], g_ref[0], atol=1e-5, rtol=1e-4)
  for key in ("scale", "bias"):
    np.testing.assert_allclose(g_ours[1][key], g_ref[1][key], atol=1e-5, rtol=1e-4)
  assert np.abs(np.asarray(g_ref[0])).max() > 0.1


def test_eval_uses_running_statistics():
  x = jax.random.normal(KEY, (2, 3, 3, 2))
  bn = TorchBatchNorm()
  variables = _variables(bn, x, 0.25)
  variables["batch_stats"]["var"] = jnp.array([4.0, 0.25])
  y = bn.apply(variables, x, use_running_average=True)
  want = ((x - 0.25) / jnp.sqrt(jnp.array([4.0, 0.25]) + 1e-5)
          * variables["params"]["scale"] + variables["params"]["bias"])
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_fold_gives_the_affine_and_the_per_sample_mean(train):
  # fold: x * mul + add is the normalised output, sample_mean the input's mean over H and W
  # per sample (so sample_mean * mul + add is the output's), and the running statistics
  # move exactly as in __call__.
  x = jax.random.normal(KEY, (3, 4, 5, 6)) * jnp.linspace(0.5, 3.0, 6) + 2.0
  bn = TorchBatchNorm()
  variables = _variables(bn, x, 1.5)
  y, upd = bn.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])
  (mul, add, sample_mean), upd_fold = bn.apply(variables, x, use_running_average=not train,
                                               method=TorchBatchNorm.fold,
                                               mutable=["batch_stats"])
  assert mul.shape == add.shape == (6,) and sample_mean.shape == (3, 6)
  assert mul.dtype == add.dtype == sample_mean.dtype == jnp.float32
  np.testing.assert_allclose(x * mul + add, y, atol=2e-5, rtol=0)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(sample_mean, x64.mean(axis=(1, 2)), atol=1e-5, rtol=0)
  if train:
    want = (x64 - x64.mean(axis=(0, 1, 2))) / np.sqrt(x64.var(axis=(0, 1, 2)) + 1e-5)
  else:
    want = (x64 - 1.5) / np.sqrt(1.0 + 1e-5)
  want = want * np.asarray(variables["params"]["scale"]) + np.asarray(variables["params"]["bias"])
  np.testing.assert_allclose(sample_mean * mul + add, want.mean(axis=(1, 2)), atol=1e-5, rtol=0)
  assert np.abs(want.mean(axis=(1, 2))).max() > 0.05  # per-sample means are not all zero
  for key in ("mean", "var"):
    np.testing.assert_allclose(upd_fold["batch_stats"][key], upd["batch_stats"][key],
                               rtol=1e-6)
  if train:
    assert not np.allclose(upd["batch_stats"]["mean"], variables["batch_stats"]["mean"])
