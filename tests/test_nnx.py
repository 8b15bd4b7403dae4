"""Flax NNX through attention_flax.nnx_bridge: the documented example trains, and a bridged
layer or model computes what the linen module computes with the same variables: outputs,
parameter gradients, train-mode batch statistics and sown maps."""

from __future__ import annotations

import functools
import re
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_flax as af
from attention_flax import nnx_bridge
from attention_flax.models import create_model
from attention_flax.nnx_bridge import linen_variables, load_linen_variables, sown_maps, to_nnx

ROOT = Path(__file__).resolve().parent.parent


# --- the documented example ----------------------------------------------------------


def _docstring_example() -> str:
  doc = nnx_bridge.__doc__
  block = doc.split("trained with ``nnx.Optimizer``::\n", 1)[1].split("\nSee docs/nnx.md", 1)[0]
  return textwrap.dedent(block)


def _docs_example() -> str:
  text = (ROOT / "docs" / "nnx.md").read_text()
  return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("source", [_docstring_example, _docs_example],
                         ids=["docstring", "docs_nnx_md"])
def test_documented_example_trains_and_exposes_maps_and_statistics(source):
  namespace: dict = {}
  exec(compile(source(), f"<{source.__name__}>", "exec"), namespace)  # pylint: disable=exec-used
  model, optimizer = namespace["model"], namespace["optimizer"]
  train_step, images, labels = namespace["train_step"], namespace["images"], namespace["labels"]
  images = jax.random.normal(jax.random.key(1), images.shape)  # a batch worth learning

  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  assert set(stats) == {"cbam"}  # CBAM's spatial BatchNorm; SE has none
  losses = [float(train_step(model, optimizer, images, labels)) for _ in range(6)]
  assert losses[-1] < losses[0] - 0.05, losses
  trained = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), trained, stats)
  assert min(jax.tree.leaves(moved)) > 1e-4  # train mode updated mean and var

  logits = model(images)  # eval mode reads the statistics and leaves them
  after_eval = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  jax.tree.map(np.testing.assert_array_equal, after_eval, trained)
  assert logits.shape == (4, 10)

  maps = sown_maps(model)
  (gate,) = maps["se"]["channel_gate"]
  (mask,) = maps["cbam"]["spatial"]["spatial_mask"]
  (cbam_gate,) = maps["cbam"]["channel"]["channel_gate"]
  assert gate.shape == cbam_gate.shape == (4, 1, 1, 16) and mask.shape == (4, 8, 8, 1)
  # The SE gate of this very forward: recomputed from the conv features with linen.
  features = nnx.relu(model.conv(images))
  _, linen_maps = model.se.to_nnx__module.apply(
      linen_variables(model.se), features, mutable=["intermediates"])
  np.testing.assert_allclose(gate, linen_maps["intermediates"]["channel_gate"][0], atol=1e-6)
  assert 0.0 < float(mask.min()) and float(mask.max()) < 1.0


# --- NNX against linen with the same variables ---------------------------------------


def _perturbed(variables: dict, seed: int = 0) -> dict:
  """Fresh norms are identity-like and would hide a statistics mix-up: random affine
  parameters and running statistics for every batch norm."""
  keys = iter(jax.random.split(jax.random.key(seed), 4 * len(jax.tree.leaves(variables))))

  def change(path, leaf):
    name, collection = path[-1].key, path[0].key
    shape = leaf.shape
    if collection == "batch_stats" and name == "mean":
      return 0.2 * jax.random.normal(next(keys), shape)
    if collection == "batch_stats" and name == "var":
      return jax.random.uniform(next(keys), shape, minval=0.5, maxval=1.5)
    if name == "scale":
      return jax.random.uniform(next(keys), shape, minval=0.5, maxval=1.5)
    if name == "bias":
      return 0.2 * jax.random.normal(next(keys), shape)
    return leaf

  return jax.tree_util.tree_map_with_path(change, variables)


def _close(actual, expected, atol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=atol), actual, expected)


CASES = {
    "se": (lambda: af.SqueezeExcite(), (2, 6, 6, 16)),
    "cbam": (lambda: af.CBAM(rd_ratio=1 / 4), (2, 6, 6, 16)),
    "test_resnet_tiny_cbam": (lambda: create_model("test_resnet_tiny_cbam", num_classes=5),
                              (2, 32, 32, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bridged_module_matches_linen(name):
  make, shape = CASES[name]
  module = make()
  x = jax.random.normal(jax.random.key(1), shape)
  bridged = to_nnx(module, jnp.zeros(shape), rngs=nnx.Rngs(0))
  variables = _perturbed(linen_variables(bridged))
  load_linen_variables(bridged, variables)
  _close(linen_variables(bridged), variables, 0)
  has_stats = "batch_stats" in variables
  assert has_stats == (name != "se")
  cotangent = jax.random.normal(jax.random.key(2), module.apply(variables, x).shape)

  # Both sides jitted (a whole model op by op is slow on CPU), float32 at full precision:
  # the output, the sown maps and statistics, and the gradient of <output, cotangent>.
  @functools.partial(jax.jit, static_argnames="train")
  def linen_step(params, train):
    def loss(params):
      mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
      y, updates = module.apply({**variables, "params": params}, x, train=train,
                                mutable=mutable)
      return jnp.sum(y * cotangent), (y, updates)
    (_, (y, updates)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return y, updates, grads

  @functools.partial(nnx.jit, static_argnames="train")
  def nnx_step(model, train):
    def loss(model):
      y = model(x, train=train)
      return jnp.sum(y * cotangent), y
    (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return y, grads

  with jax.default_matmul_precision("highest"):
    for train in (False, True):
      expected, updates, expected_grads = linen_step(variables["params"], train)
      model = nnx.clone(bridged)
      out, grads = nnx_step(model, train)
      _close(out, expected, 1e-6)
      _close(nnx.to_pure_dict(grads), expected_grads, 1e-5)
      # The maps sown by this call, and only those, read through NNX.
      _close(sown_maps(model), updates["intermediates"], 1e-6)
      stats = linen_variables(model).get("batch_stats")
      if has_stats:
        _close(stats, updates["batch_stats"] if train else variables["batch_stats"], 1e-6)
        if train:  # the statistics did move, so the comparison means something
          moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                               stats, variables["batch_stats"])
          assert max(jax.tree.leaves(moved)) > 1e-3
      nnx_step(model, train)  # a second call replaces the maps instead of adding to them
      assert all(len(maps) == 1 for maps in jax.tree.leaves(
          sown_maps(model), is_leaf=lambda t: isinstance(t, tuple)))


def test_bridged_model_trains_under_nnx_jit_like_linen():
  """Two SGD steps under nnx.jit equal the same two steps of linen apply + jax.grad."""
  module = af.CBAM(rd_ratio=1 / 4)
  x = jax.random.normal(jax.random.key(3), (2, 6, 6, 8))
  bridged = to_nnx(module, x, rngs=nnx.Rngs(1), sow=False)
  variables = _perturbed(linen_variables(bridged), seed=1)
  load_linen_variables(bridged, variables)

  @nnx.jit
  def nnx_step(model):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x, train=True) ** 2))(model)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(model, nnx.Param), grads))
    return loss

  @jax.jit
  def linen_step(variables):
    def loss_fn(params):
      y, updates = module.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
      return jnp.mean(y ** 2), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - 0.5 * g, variables["params"], grads)
    return loss, {"params": params, **updates}

  for _ in range(2):
    loss = nnx_step(bridged)
    expected, variables = linen_step(variables)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
  _close(linen_variables(bridged), variables, 1e-6)
  assert sown_maps(bridged) == {}  # sow=False keeps no maps


def test_other_methods_go_through_the_bridge():
  """CBAM's gate_from_pooled / after_gate through NNX equal linen's ``method=`` calls."""
  module = af.CBAM(rd_ratio=1 / 4)
  x = jax.random.normal(jax.random.key(4), (2, 6, 6, 8))
  bridged = to_nnx(module, x, rngs=nnx.Rngs(2))
  variables = _perturbed(linen_variables(bridged), seed=2)
  load_linen_variables(bridged, variables)
  mean, top = x.mean(axis=(1, 2)), x.max(axis=(1, 2))
  expected, sown = module.apply(variables, mean, top, method="gate_from_pooled",
                                mutable=["intermediates"])
  _close(bridged.gate_from_pooled(mean, top), expected, 1e-6)
  _close(sown_maps(bridged), sown["intermediates"], 1e-6)
  expected, updates = module.apply(variables, x, True, method="after_gate",
                                   mutable=["batch_stats"])
  _close(bridged.after_gate(x, train=True), expected, 1e-6)
  _close(linen_variables(bridged)["batch_stats"], updates["batch_stats"], 1e-6)


# Layers with a factory field named like one of their children (``conv``), which plain
# ToNNX mistakes for a method; the whole registry passes the same check (run by hand).
@pytest.mark.parametrize("name", ["spatial", "residual", "stn"])
def test_registered_layers_bridge_in_train_mode(name):
  from tests.layers.test_registry import CASES as LAYER_CASES  # pylint: disable=import-outside-toplevel
  kwargs, shape, sown = LAYER_CASES[name]
  module = af.create_attention(name, **kwargs)
  x = jax.random.normal(jax.random.key(5), shape)
  bridged = to_nnx(module, x, rngs=nnx.Rngs(3))
  variables = _perturbed(linen_variables(bridged), seed=3)
  load_linen_variables(bridged, variables)
  expected, updates = jax.jit(lambda v: module.apply(
      v, x, train=True, mutable=["batch_stats", "intermediates"]))(variables)
  _close(nnx.jit(lambda m: m(x, train=True))(bridged), expected, 1e-6)
  _close(sown_maps(bridged), updates["intermediates"], 1e-6)
  if "batch_stats" in updates:
    _close(linen_variables(bridged)["batch_stats"], updates["batch_stats"], 1e-6)
