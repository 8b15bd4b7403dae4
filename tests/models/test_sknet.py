"""Selective Kernel ResNets: parameter counts and state-dict names against timm 1.0.31, and
``from_timm`` parity of skresnet18 (random weights, perturbed batch norms, eval and train
mode, every running statistic after one train-mode forward)."""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from attention_flax.convert import from_timm, list_timm_models  # noqa: E402
from attention_flax.models import count_params, create_model  # noqa: E402
from attention_flax.models.sknet import SelectiveKernelBasic  # noqa: E402
from tests.models.test_resnet import KEY, apply, images, init  # noqa: E402
from tests.test_convert import (  # noqa: E402
    check_statistics_match_timm, one_torch_thread, shape_only_state_dict)

# timm 1.0.31, 1000 classes.
TIMM_PARAMS = {"skresnet18": 11_958_056, "skresnet34": 22_282_376,
               "skresnext50_32x4d": 27_479_784}


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_param_count_matches_timm(name):
  model = create_model(name)
  variables = jax.eval_shape(model.init, KEY,
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert count_params(variables) == TIMM_PARAMS[name]


def test_block_structure():
  params = jax.eval_shape(create_model("skresnext50_32x4d").init, KEY,
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]
  block = params["layer1_0"]
  # ResNeXt 32x4d: inner width 128, the SK branches grouped 32-fold on the whole input.
  assert block["conv1"]["conv"]["kernel"].shape == (1, 1, 64, 128)
  assert block["conv2"]["paths_1"]["conv"]["kernel"].shape == (3, 3, 4, 128)
  assert block["conv2"]["attn"]["fc_reduce"]["kernel"].shape == (128, 32)  # 128/16 -> 32
  assert block["conv2"]["attn"]["fc_select"]["kernel"].shape == (32, 256)
  assert block["conv3"]["conv"]["kernel"].shape == (1, 1, 128, 256)
  assert block["downsample_0"]["kernel"].shape == (1, 1, 64, 256)
  with pytest.raises(ValueError, match="cardinality"):
    jax.eval_shape(SelectiveKernelBasic(8, cardinality=2).init, KEY, jnp.zeros((1, 4, 4, 8)))


def test_tiny_model_trains_its_statistics_and_sows_branch_weights():
  model = create_model("test_skresnet_tiny", num_classes=5)
  x = images((2, 16, 16, 3), seed=1)
  variables = init(model, x)
  logits, state = apply(model, variables, x, train=True,
                        mutable=["batch_stats", "intermediates"])
  assert logits.shape == (2, 5) and np.isfinite(np.asarray(logits)).all()
  weights = state["intermediates"]["layer2_0"]["conv1"]["attn"]["branch_weights"][0]
  assert weights.shape == (2, 2, 16)
  np.testing.assert_allclose(np.sum(weights, axis=1), 1.0, atol=1e-6)
  before = variables["batch_stats"]["layer1_0"]["conv1"]["attn"]["bn"]["mean"]
  after = state["batch_stats"]["layer1_0"]["conv1"]["attn"]["bn"]["mean"]
  assert not np.allclose(before, after)


# ---- timm weights ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_every_tensor_maps(name):
  assert name in list_timm_models()
  state = shape_only_state_dict(name)
  _, variables = from_timm(name, state)
  assert count_params(variables["params"]) == TIMM_PARAMS[name]
  buffers = sum(int(np.prod(v.shape)) for k, v in state.items()
                if k.endswith(("running_mean", "running_var")))
  assert count_params(variables["batch_stats"]) == buffers


def _record_input(seen, name, _module, inputs, _output) -> None:
  """A forward hook keeping the (N, C) input of a norm on pooled vectors (returns None, so
  the output stays)."""
  seen[name] = inputs[0][:, :, 0, 0]


def _random_skresnet18(x_t):
  """timm's skresnet18 with random batch norms; the last norm of every block small, as
  trained nets have (logits of order one); the SK attention norms' running means near
  their train-mode batch means (they see 2 values per channel, where a running mean far
  off costs TorchBatchNorm's one-pass statistics float32 digits)."""
  torch.manual_seed(0)
  model = timm.create_model("skresnet18", pretrained=False)
  with torch.no_grad():
    for name, m in model.named_modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        low, high = (0.1, 0.3) if name.endswith("conv2.bn") else (0.5, 1.5)
        m.weight.uniform_(low, high)
        m.bias.normal_(0.0, 0.2)
    attn_norms = {n: m for n, m in model.named_modules() if n.endswith("attn.bn")}
    seen = {}
    probe = copy.deepcopy(model).train()
    for n, m in probe.named_modules():
      if n in attn_norms:
        m.register_forward_hook(functools.partial(_record_input, seen, n))
    probe(x_t)
    g = torch.Generator().manual_seed(2)
    for n, m in attn_norms.items():
      z = seen[n]
      m.running_mean.copy_(z.mean(0) + 0.5 * z.std(0) * torch.randn(z.shape[1], generator=g))
  return model


def test_skresnet18_logits_and_statistics_match_timm():
  x_t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  x = jnp.asarray(x_t.numpy().transpose(0, 2, 3, 1))
  with one_torch_thread():
    ref = _random_skresnet18(x_t)
  model, variables = from_timm("skresnet18", ref.state_dict())
  old = {k: v.clone().numpy() for k, v in ref.state_dict().items()}
  with one_torch_thread(), torch.no_grad():
    expected_eval = ref.eval()(x_t).numpy()
    expected_train = ref.train()(x_t).numpy()
  with jax.default_matmul_precision("highest"):
    logits = model.apply(variables, x)
    train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  for ours, theirs in ((logits, expected_eval), (train_logits, expected_train)):
    scale = np.abs(theirs).max()
    assert scale > 0.1
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale, rtol=0)
  assert np.abs(expected_train - expected_eval).max() > 0.1

  check_statistics_match_timm(updates["batch_stats"], ref.state_dict(), old)
