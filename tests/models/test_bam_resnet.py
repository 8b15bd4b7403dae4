"""BAM-ResNet-50 (Park et al. 2018, arXiv 1807.06514): size, placement, forward, train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from attention_flax.layers import BAM
from attention_flax.models import MODELS, count_params, create_model
from attention_flax.models.bam_resnet import BAMResNet

KEY = jax.random.PRNGKey(0)
IMAGENET = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)


def _count(model) -> int:
  return count_params(jax.eval_shape(model.init, KEY, IMAGENET))


def test_parameter_count_against_the_paper():
  """jax.eval_shape, 1000 classes, params only (BN scale and bias in, running stats out).

  ResNet-50 has 25,557,032. The BAMs after stages 1-3 (C = 256, 512, 1024, rd = C / 16):
  channel branch 2*C*rd + rd + C (Linear layers) + 2*rd (BN in the MLP) + 2*C (the
  paper's BN at its end); spatial branch C*rd + rd + 2 * (9*rd*rd + rd) + rd + 1 (convs)
  + 2*rd * 3 (BNs after the hidden convs) + 2 (the paper's BN at its end):
  17,875 + 69,539 + 274,243 = 361,657, so 25,918,689 in all. Without the paper's two
  end-of-branch BNs (the authors' released code) each BAM has 2*C + 2 fewer: 25,915,099,
  the count of pytorchcv's conversion of the authors' ImageNet weights. The paper's
  ImageNet table lists ResNet50 + BAM at 25.92M: both round to it.
  """
  assert _count(create_model("resnet50")) == 25_557_032
  ours = _count(create_model("bam_resnet50"))
  assert ours == 25_557_032 + 17_875 + 69_539 + 274_243 == 25_918_689
  assert round(ours / 1e6, 2) == 25.92
  released = _count(create_model("bam_resnet50", stage_attn_kwargs={"branch_norm": False}))
  assert released == 25_915_099 and round(released / 1e6, 2) == 25.92
  assert "arXiv 1807.06514" in MODELS["bam_resnet50"].paper


def _variables(model, x, seed=2):
  """Variables of ``model`` without compiling its init (shapes from jax.eval_shape):
  kernels He-normal over their fan-in, biases and BN shifts at zero, BN scales and
  running variances at one, running means at zero."""
  shapes = jax.eval_shape(model.init, KEY, x)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape),
                         s.dtype)
    return (jnp.ones if name in ("scale", "var") else jnp.zeros)(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def case():
  model = create_model("bam_resnet50", num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  return model, x, _variables(model, x)


@pytest.fixture(scope="module")
def train_step(case):
  """One jitted train-mode forward and backward, capturing every module's output."""
  model, x, variables = case
  labels = jnp.arange(2) % 10

  def loss(params):
    logits, state = model.apply({**variables, "params": params}, x, train=True,
                                capture_intermediates=True,
                                mutable=["batch_stats", "intermediates"])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(logp[jnp.arange(2), labels]), state

  (value, state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return value, state, grads


def test_bam_sits_between_stages_with_the_stage_width(case, train_step):
  _, _, variables = case
  _, state, _ = train_step
  params, sown = variables["params"], state["intermediates"]
  assert {k for k in params if k.startswith("bam")} == {"bam1", "bam2", "bam3"}
  for i, (width, side) in enumerate(((256, 16), (512, 8), (1024, 4)), start=1):
    assert params[f"bam{i}"]["gate_c_fc_0"]["kernel"].shape == (width, width // 16)
    mask = np.asarray(sown[f"bam{i}"]["bam_mask"][0])
    assert mask.shape == (2, side, side, width)
    # bam{i} refines the last block's output of stage i, and that is what stage i sows
    # and what stage i + 1 receives.
    last = {1: "layer1_2", 2: "layer2_3", 3: "layer3_5"}[i]
    block_out = np.asarray(sown[last]["__call__"][0])
    stage = np.asarray(sown[f"stage{i}"][0])
    np.testing.assert_allclose(stage, block_out * (1 + mask), rtol=1e-5,
                               atol=1e-5 * np.abs(stage).max())
    np.testing.assert_allclose(np.asarray(sown[f"bam{i}"]["__call__"][0]), stage, rtol=1e-6)
    assert float(mask.std()) > 1e-3
  assert "bam4" not in sown and "bam4" not in params  # nothing after the last stage


def test_forward_at_64(case):
  model, x, variables = case
  logits = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all() and float(jnp.std(logits)) > 0.0
  # Without the stage modules it is ResNet-50: the same parameter tree less the BAMs, and
  # on those variables the same logits as the plain ResNet-50; with them, other logits.
  plain = create_model("resnet50", num_classes=10)
  rest = {c: {k: v for k, v in tree.items() if not k.startswith("bam")}
          for c, tree in variables.items()}
  reference = np.asarray(jax.jit(plain.apply)(rest, x))
  no_bam = model.clone(stage_attn_after=())
  np.testing.assert_allclose(np.asarray(jax.jit(no_bam.apply)(rest, x)), reference,
                             rtol=1e-6, atol=1e-6 * np.abs(reference).max())
  assert float(np.abs(np.asarray(logits) - reference).max()) > 1e-3


def test_train_step_gradient_is_finite(case, train_step):
  _, _, variables = case
  value, state, grads = train_step
  assert np.isfinite(float(value))
  flat = traverse_util.flatten_dict(grads, sep="/")
  assert all(np.isfinite(np.asarray(g)).all() for g in flat.values())
  # The BAMs learn: their gradients are not zero, in both branches.
  for i in (1, 2, 3):
    for child in ("gate_c_fc_0", "gate_s_conv_reduce0", "gate_s_conv_final"):
      assert float(jnp.abs(grads[f"bam{i}"][child]["kernel"]).max()) > 0.0, (i, child)
  # ...and their batch norms' running statistics moved.
  old, new = variables["batch_stats"]["bam2"], state["batch_stats"]["bam2"]
  for name in old:
    assert float(jnp.abs(new[name]["mean"] - old[name]["mean"]).max()) > 0.0, name


def test_stage_module_fields():
  model = create_model("bam_resnet50")
  assert isinstance(model, BAMResNet) and model.stage_attn == "bam"
  assert tuple(model.stage_attn_after) == (1, 2, 3)
  # Another registered module between stages (one without conv or norm fields).
  se = create_model("bam_resnet50", stage_attn="se", num_classes=5)
  params = jax.eval_shape(se.init, KEY, IMAGENET)["params"]
  assert params["bam1"]["fc1"]["kernel"].shape == (256, 16)
  with pytest.raises(ValueError, match="stage_attn_after"):
    jax.eval_shape(create_model("bam_resnet50", stage_attn_after=(4, 5)).init, KEY, IMAGENET)
  assert BAM.maps["bam_mask"] == "residual_mask"
