"""Extending the library from outside: an attention layer defined here, registered with
``register_attention``, used BY NAME as the ``attn`` of ResNet-18, trained one SGD step,
its maps found by ``inspect.attention_maps`` from its own ``maps`` declaration and drawn
by ``train.visualize``; and the registry's errors."""

from __future__ import annotations

import functools
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from PIL import Image

import attention_flax
from attention_flax import inspect as ins
from attention_flax import models
from attention_flax import plot
from train import visualize


class MeanGate(nn.Module):
  """A channel gate defined outside the package: sigmoid(Dense(mean_hw(x))) * x.

  Takes no ``pools`` / ``gate_from_pooled``, so a block runs it as it is."""
  maps: ClassVar[dict[str, str]] = {"my_gate": "channel_gate"}

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    mean = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    gate = jax.nn.sigmoid(nn.Dense(x.shape[-1], param_dtype=self.param_dtype, name="fc")(mean))
    self.sow("intermediates", "my_gate", gate)
    return (x * gate).astype(x.dtype)


NAME = "my_gate"


@pytest.fixture
def registered():
  """MeanGate registered as NAME for one test, removed afterwards."""
  assert NAME not in attention_flax.ATTENTIONS
  attention_flax.register_attention(NAME, MeanGate)
  try:
    yield NAME
  finally:
    attention_flax.ATTENTIONS.pop(NAME, None)
  assert NAME not in attention_flax.list_attentions()


def _gate_inputs(model, variables, x):
  """The input each ``se`` layer sees, by block: recorded as the model runs (inference)."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    if context.module.path and context.module.path[-1] == "se":
      seen[context.module.path[0]] = np.asarray(args[0], np.float32)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, x, train=False)
  return seen


def test_registered_layer_trains_is_inspected_and_drawn_by_name(registered, tmp_path,
                                                                monkeypatch):
  assert registered in attention_flax.list_attentions()
  assert ins.map_kinds()[registered] == "channel_gate"
  # zero_init_last=False: the last BN of each block does not start at 0, so the gate's
  # input, and the gradient of its kernel, are not zero on the first step. 64 x 64 images
  # leave stage 4 at 2 x 2: at 32 x 32 its batch norm would see 2 values per channel,
  # and so amplify float rounding into the gradients.
  model = models.create_model("resnet18", num_classes=10, attn=registered,
                              zero_init_last=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  labels = jnp.array([3, 7])
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(1), x)
  params, batch_stats = variables["params"], variables["batch_stats"]
  assert set(params["layer1_0"]["se"]) == {"fc"}

  tx = optax.sgd(0.1)

  @jax.jit
  def train_step(params, batch_stats, opt_state):
    def loss_fn(p):
      logits, state = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, state["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss, grads

  new_params, new_stats, _, loss, grads = train_step(params, batch_stats, tx.init(params))
  assert np.isfinite(float(loss))
  for block in ("layer1_0", "layer2_1", "layer4_1"):
    for leaf in ("kernel", "bias"):
      before = np.asarray(params[block]["se"]["fc"][leaf])
      after = np.asarray(new_params[block]["se"]["fc"][leaf])
      g = np.asarray(grads[block]["se"]["fc"][leaf])
      assert np.abs(g).max() > 0, (block, leaf)
      np.testing.assert_allclose(after, before - np.float32(0.1) * g, rtol=1e-5, atol=1e-7)

  variables = {"params": new_params, "batch_stats": new_stats}
  maps = jax.jit(functools.partial(ins.attention_maps, model))(variables, x)
  widths = {1: 64, 2: 128, 3: 256, 4: 512}
  expected_keys = [f"layer{i}_{j}/se/my_gate" for i in range(1, 5) for j in range(2)]
  assert list(maps) == expected_keys
  inputs = _gate_inputs(model, variables, x)
  for key, m in maps.items():
    block = key.split("/")[0]
    assert m.kind == "channel_gate" and m.path == key
    assert m.value.shape == (2, 1, 1, widths[int(block[5])])
    v = np.asarray(m.value)
    assert 0.0 < v.min() and v.max() < 1.0
    # By hand: sigmoid(mean_hw(input) @ kernel + bias) of the trained layer's params.
    fc = new_params[block]["se"]["fc"]
    z = inputs[block].mean(axis=(1, 2)) @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"])
    np.testing.assert_allclose(v[:, 0, 0, :], 1.0 / (1.0 + np.exp(-z)), rtol=1e-5,
                               atol=1e-6, err_msg=key)
    # The gate depends on the image.
    assert np.abs(v[0] - v[1]).max() > 1e-4, key
  # The module applied on its own gives the same gate.
  _, state = MeanGate().apply({"params": new_params["layer3_1"]["se"]},
                              jnp.asarray(inputs["layer3_1"]), mutable=["intermediates"])
  np.testing.assert_allclose(maps["layer3_1/se/my_gate"].value,
                             state["intermediates"]["my_gate"][0], rtol=1e-6)

  drawn = {}
  original = plot.plot_channel_gates

  def spy(gates, *args, **kwargs):
    drawn.update({k: np.asarray(v) for k, v in gates.items()})
    return original(gates, *args, **kwargs)

  monkeypatch.setattr(plot, "plot_channel_gates", spy)
  written = visualize.write_maps(model, variables, x, str(tmp_path), labels=[3, 7],
                                 num_classes=10, grad_cam_layer="stage3")
  names = [os.path.basename(p) for p in written]
  assert names == ["channel_gates.png", "grad_cam_stage3.png"]
  assert list(drawn) == expected_keys
  for key in expected_keys:
    np.testing.assert_allclose(drawn[key], maps[key].value, rtol=1e-6)
  gates_png = tmp_path / "channel_gates.png"
  assert os.path.getsize(gates_png) > 1000
  with Image.open(gates_png) as im:
    pixels = np.asarray(im.convert("L"))
  assert pixels.std() > 1.0  # not a blank page


def test_an_unregistered_factory_is_found_by_its_declaration():
  # A partial of the class, passed straight to the model: nothing is registered, the
  # sowing module's own `maps` names the kind.
  assert NAME not in attention_flax.ATTENTIONS and NAME not in ins.map_kinds()
  model = models.create_model("test_resnet_tiny", num_classes=10,
                              attn=functools.partial(MeanGate))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  maps = ins.attention_maps(model, variables, x)
  assert {k: (m.kind, m.value.shape) for k, m in maps.items()} == {
      "layer1_0/se/my_gate": ("channel_gate", (2, 1, 1, 8)),
      "layer2_0/se/my_gate": ("channel_gate", (2, 1, 1, 16))}
  # zero_init_last: the gate's input starts at 0, so the gate is sigmoid(0) = 0.5.
  for m in maps.values():
    np.testing.assert_allclose(m.value, 0.5, rtol=1e-6)


def test_register_attention_errors(registered):
  # Registering the same factory again is a no-op; another one needs overwrite=True.
  assert attention_flax.register_attention(registered, MeanGate) is MeanGate
  other = functools.partial(MeanGate, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="already registered.*overwrite=True"):
    attention_flax.register_attention(registered, other)
  assert attention_flax.ATTENTIONS[registered] is MeanGate
  assert attention_flax.register_attention(registered, other, overwrite=True) is other
  assert attention_flax.ATTENTIONS[registered] is other
  # The declaration is read through the partial.
  assert ins.map_kinds()[registered] == "channel_gate"
  with pytest.raises(ValueError, match="already registered"):
    attention_flax.register_attention("se", MeanGate)
  for bad in ("My_Gate", "my-gate", "1gate", "", 3):
    with pytest.raises(ValueError, match="lower-case identifiers"):
      attention_flax.register_attention(bad, MeanGate)
  for not_callable in ("se", object()):
    with pytest.raises(TypeError, match="module class or factory"):
      attention_flax.register_attention("not_callable", not_callable)
  assert "not_callable" not in attention_flax.ATTENTIONS
  with pytest.raises(ValueError, match="Unknown attention 'nope'"):
    attention_flax.create_attention("nope")
  layer = attention_flax.create_attention(registered.upper(), name="gate")
  assert isinstance(layer, MeanGate) and layer.dtype == jnp.bfloat16 and layer.name == "gate"
