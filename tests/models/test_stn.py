"""STN classifiers: hand-counted parameters, identity at init, jit == eager, the registry."""

from __future__ import annotations

import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax.models.stn import MODELS, DigitsCNN, STNClassifier

# Random initialisers compile about ten times faster from an "rbg" key than from the
# default threefry key on this CPU; the tests need values, not a particular stream.
INIT_KEY = jax.random.key(0, impl="rbg")

# The localization net's parameters: conv 7x7xCx8, conv 5x5x8x10, FC 90 -> 32, FC 32 -> 6.
LOC_PARAMS_1CH = (7 * 7 * 1 * 8 + 8) + (5 * 5 * 8 * 10 + 10) + (90 * 32 + 32) + (32 * 6 + 6)
# DigitsCNN at 60 x 60, 10 classes: conv 9x9x1x32, conv 9x9x32x64, 60 -> 30 -> 15 so the
# head is Dense(15 * 15 * 64 -> 10).
CNN_PARAMS_60 = (9 * 9 * 1 * 32 + 32) + (9 * 9 * 32 * 64 + 64) + (15 * 15 * 64 * 10 + 10)


def _images(shape, seed=0):
  """Test images from numpy: no PRNG kernels to compile."""
  return jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, shape), jnp.float32)


def _param_count(model, shape):
  shapes = jax.eval_shape(model.init, INIT_KEY, jax.ShapeDtypeStruct(shape, jnp.float32))
  return sum(a.size for a in jax.tree.leaves(shapes["params"]))


def _create(name, **kwargs):
  return MODELS[name].factory(**kwargs)


def test_registry_entries():
  assert {"stn_cnn", "cnn_digits", "stn_resnet20"} <= set(MODELS)
  assert MODELS["stn_cnn"].input_size == MODELS["cnn_digits"].input_size == 60
  assert MODELS["stn_cnn"].in_channels == MODELS["cnn_digits"].in_channels == 1
  assert (MODELS["stn_resnet20"].input_size, MODELS["stn_resnet20"].in_channels) == (32, 3)
  tiny = {name for name, entry in MODELS.items() if entry.test_only}
  assert tiny == {"stn_cnn_tiny", "cnn_digits_tiny"}
  for entry in MODELS.values():
    assert "1506.02025" in entry.paper


def test_parameter_counts_by_hand():
  assert _param_count(_create("cnn_digits"), (1, 60, 60, 1)) == CNN_PARAMS_60 == 312_586
  assert _param_count(_create("stn_cnn"), (1, 60, 60, 1)) == CNN_PARAMS_60 + LOC_PARAMS_1CH
  # num_classes reaches the backbone's head: 4 more classes, 4 * (14400 + 1) more params.
  assert (_param_count(_create("stn_cnn", num_classes=14), (1, 60, 60, 1))
          == CNN_PARAMS_60 + LOC_PARAMS_1CH + 4 * (15 * 15 * 64 + 1))
  # The RTS size 42: 42 -> 21 -> 10, head 10 * 10 * 64 -> 10; the localization is unchanged.
  head_42 = 10 * 10 * 64 * 10 + 10
  assert (_param_count(_create("stn_cnn"), (1, 42, 42, 1))
          == CNN_PARAMS_60 - (15 * 15 * 64 * 10 + 10) + head_42 + LOC_PARAMS_1CH)


def test_stn_cnn_forward_and_identity_at_init():
  model = _create("stn_cnn")
  x = _images((2, 60, 60, 1))
  variables = jax.jit(model.init)(INIT_KEY, x)
  assert set(variables["params"]) == {"stn", "backbone"}
  logits, state = jax.jit(lambda v, a: model.apply(v, a, mutable=["intermediates"]))(
      variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  inter = state["intermediates"]
  np.testing.assert_array_equal(inter["stn"]["stn_output"][0], x)
  np.testing.assert_array_equal(inter["stn"]["stn_theta"][0],
                                jnp.tile(jnp.array([[[1.0, 0, 0], [0, 1.0, 0]]]), (2, 1, 1)))
  # The backbone sees exactly the input, so it gives the plain CNN's logits with its params.
  cnn = _create("cnn_digits")
  np.testing.assert_allclose(jax.jit(cnn.apply)({"params": variables["params"]["backbone"]}, x),
                             logits, rtol=1e-5, atol=1e-5)
  assert inter["backbone"]["stage1"][0].shape == (2, 30, 30, 32)
  assert inter["backbone"]["stage2"][0].shape == (2, 15, 15, 64)


@pytest.mark.parametrize("name", ["stn_cnn_tiny", "cnn_digits_tiny"])
def test_tiny_models_jit_matches_eager(name):
  entry = MODELS[name]
  model = entry.factory()
  x = _images((2, entry.input_size, entry.input_size, entry.in_channels), seed=1)
  variables = jax.jit(model.init)(INIT_KEY, x)
  if "stn" in variables["params"]:
    # Tilt theta's head so that the transformer really warps.
    head = variables["params"]["stn"]["fc_theta"]
    head["kernel"] = jnp.full(head["kernel"].shape, 0.05, jnp.float32)
  eager = model.apply(variables, x, train=True)
  jitted = jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x)
  assert eager.shape == (2, 10)
  chex.assert_trees_all_close(eager, jitted, atol=1e-5)


def test_bfloat16_compute_gives_float32_logits():
  model = _create("stn_cnn_tiny", dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 24, 24, 1), jnp.bfloat16)
  shapes = jax.eval_shape(model.init, INIT_KEY, x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes["params"]))
  out = jax.eval_shape(model.apply, shapes, x)
  assert out.shape == (2, 10) and out.dtype == jnp.float32


def test_stn_wraps_any_backbone_and_crops_with_out_size():
  # out_size hands the backbone a 16 x 16 view of a 24 x 24 input.
  model = STNClassifier(backbone=DigitsCNN, num_classes=3, out_size=(16, 16),
                        loc_features=(4, 4), loc_hidden=8)
  x = jax.ShapeDtypeStruct((1, 24, 24, 1), jnp.float32)
  shapes = jax.eval_shape(model.init, INIT_KEY, x)
  assert shapes["params"]["backbone"]["head"]["kernel"].shape == (4 * 4 * 64, 3)
  (logits, state) = jax.eval_shape(
      lambda v, a: model.apply(v, a, mutable=["intermediates"]), shapes, x)
  assert logits.shape == (1, 3)
  assert state["intermediates"]["stn"]["stn_output"][0].shape == (1, 16, 16, 1)


def test_bad_inputs_raise():
  init = lambda model, shape, dtype=jnp.float32: jax.eval_shape(
      model.init, INIT_KEY, jax.ShapeDtypeStruct(shape, dtype))
  with pytest.raises(ValueError, match="NHWC"):
    init(_create("stn_cnn"), (60, 60, 1))
  with pytest.raises(TypeError, match="floating"):
    init(_create("cnn_digits"), (1, 60, 60, 1), jnp.uint8)
  with pytest.raises(ValueError, match="at least 18 x 18"):
    init(_create("stn_cnn"), (1, 16, 16, 1))
  with pytest.raises(ValueError, match="at least 4 x 4"):
    init(_create("cnn_digits"), (1, 3, 8, 1))


def _resnet20_registered() -> bool:
  if importlib.util.find_spec("attention_flax.models.resnet") is None:
    return False
  from attention_flax.models import resnet  # pylint: disable=import-outside-toplevel
  return "resnet20" in getattr(resnet, "MODELS", {})


@pytest.mark.skipif(not _resnet20_registered(),
                    reason="attention_flax.models.resnet does not register resnet20 yet")
def test_stn_resnet20_adds_only_the_localization_net():
  from attention_flax.models import resnet  # pylint: disable=import-outside-toplevel
  shape = (1, 32, 32, 3)
  plain = _param_count(resnet.MODELS["resnet20"].factory(num_classes=10), shape)
  # With 3 input channels the first localization conv has 7 * 7 * 3 * 8 + 8 parameters.
  loc_params_3ch = LOC_PARAMS_1CH + 7 * 7 * 2 * 8
  assert _param_count(_create("stn_resnet20"), shape) == plain + loc_params_3ch
  out = jax.eval_shape(_create("stn_resnet20").apply,
                       jax.eval_shape(_create("stn_resnet20").init, INIT_KEY,
                                      jax.ShapeDtypeStruct(shape, jnp.float32)),
                       jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.shape == (2, 10) and out.dtype == jnp.float32
