"""ResNeSt family: timm's parameter counts, names, average downsampling, and logits and
running statistics of a converted timm ResNeSt-14d in eval and train mode."""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from attention_flax.convert import convert_variables, from_timm, list_timm_models  # noqa: E402
from attention_flax.layers.norm import TorchBatchNorm  # noqa: E402
from attention_flax.models import MODELS, count_params, create_model  # noqa: E402
from attention_flax.models.resnest import ResNestBottleneck, avg_pool_3x3  # noqa: E402
from tests.test_convert import check_statistics_match_timm, one_torch_thread  # noqa: E402
from timm.models.resnest import ResNestBottleneck as TimmResNestBottleneck  # noqa: E402

# timm 1.0.31, 1000 classes.
TIMM_PARAMS = {"resnest14d": 10_611_688, "resnest26d": 17_069_448, "resnest50d": 27_483_240}
KEY = jax.random.key(0, impl="rbg")


def _abstract(name: str):
  model = create_model(name)
  return jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_param_counts_equal_timms(name):
  assert count_params(_abstract(name)) == TIMM_PARAMS[name]
  assert "arXiv 2004.08955" in MODELS[name].paper
  assert name in list_timm_models()


def _shape_only_state_dict(name):
  with torch.device("meta"):
    model = timm.create_model(name)
  return {k: np.zeros(tuple(v.shape), np.int64 if "num_batches" in k else np.float32)
          for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["resnest26d", "resnest50d"])
def test_every_timm_tensor_maps(name):
  state = _shape_only_state_dict(name)
  model, variables = from_timm(name, state)
  assert count_params(variables["params"]) == TIMM_PARAMS[name]
  buffers = sum(math.prod(v.shape) for k, v in state.items()
                if k.endswith(("running_mean", "running_var")))
  assert count_params(variables["batch_stats"]) == buffers
  assert model.norm is TorchBatchNorm


def test_names_widths_and_strides_follow_timm():
  params = _abstract("resnest50d")["params"]
  assert [params[f"conv1_{i}"]["kernel"].shape for i in (0, 3, 6)] == [
      (3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64)]
  split = params["layer2_0"]["conv2"]
  # 128 channels, radix 2: a 3x3 conv 128 -> 256 in 2 groups; hidden width 64.
  assert split["conv"]["kernel"].shape == (3, 3, 64, 256)
  assert split["fc1"]["kernel"].shape == (1, 1, 128, 64)
  assert split["fc2"]["kernel"].shape == (1, 1, 64, 256)
  assert params["layer2_0"]["downsample_1"]["kernel"].shape == (1, 1, 256, 512)
  assert "downsample_1" in params["layer1_0"] and "downsample_1" not in params["layer1_1"]


def test_avg_pool_3x3_counts_the_padding_as_pytorch():
  x = np.arange(2 * 5 * 6 * 3, dtype=np.float32).reshape(2, 5, 6, 3)
  pool = torch.nn.AvgPool2d(3, 2, padding=1)
  expected = pool(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(avg_pool_3x3(jnp.asarray(x), 2), expected, rtol=1e-6)


@pytest.mark.parametrize("avd_first", [False, True])
def test_strided_block_matches_timm(avd_first):
  """One downsampling bottleneck (avd before or after the split attention), eval mode."""
  torch.manual_seed(3)
  down = torch.nn.Sequential(torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                             torch.nn.Conv2d(16, 32, 1, bias=False), torch.nn.BatchNorm2d(32))
  ref = TimmResNestBottleneck(16, 8, stride=2, downsample=down, radix=2, avd=True,
                              avd_first=avd_first).eval()
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
  x_t = torch.randn(2, 16, 7, 6, generator=torch.Generator().manual_seed(4))
  x = jnp.asarray(x_t.numpy().transpose(0, 2, 3, 1))
  ours = ResNestBottleneck(features=8, strides=2, down="avg", avd_first=avd_first,
                           norm=TorchBatchNorm)
  abstract = jax.eval_shape(ours.init, KEY, x)
  variables = convert_variables(abstract, ref.state_dict())
  with jax.default_matmul_precision("highest"):
    out = ours.apply(variables, x)
  with torch.no_grad():
    expected = ref(x_t).numpy().transpose(0, 2, 3, 1)
  assert out.shape == expected.shape == (2, 4, 3, 32)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)


def _random_resnest(name, seed=0):
  """timm's model with random batch-norm affines and statistics; the last norm of each
  block gets small scales, as trained nets have, so the logits stay of order one."""
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
    for block in model.modules():
      if isinstance(block, TimmResNestBottleneck):
        block.bn3.weight.uniform_(0.1, 0.3)
  return model


def _center_split_norms(model, x_t):
  """Moves the running mean of every split-attention ``bn1`` to within 0.02 of its
  train-mode batch mean on ``x_t``, as training leaves it.

  That norm sees one pooled value per image, N = 2 per channel here, whose spread is tiny
  against their mean (about 1e-3 against 5). TorchBatchNorm's one-pass variance is shifted
  by the running mean; a random running mean many spreads away (not what training leaves)
  costs the float32 digits of that variance and moves the train-mode logits by 1e-3 of
  their scale, against 1e-5 with the running mean near the batch mean.
  """
  probe = copy.deepcopy(model).train()
  means = {}
  for name, m in probe.named_modules():
    if name.endswith("conv2.fc1"):
      m.register_forward_hook(
          lambda _m, _i, out, name=name: means.update({name: out.mean(dim=(0, 2, 3))}))
  with one_torch_thread(), torch.no_grad():
    probe(x_t)
    for name, m in model.named_modules():
      if name.endswith("conv2.bn1"):
        m.running_mean.copy_(means[name[:-len("bn1")] + "fc1"]
                             + 0.02 * torch.randn(m.num_features))


def test_resnest14d_logits_and_statistics_match_timm():
  ref = _random_resnest("resnest14d")
  x_t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  x = jnp.asarray(x_t.numpy().transpose(0, 2, 3, 1))
  _center_split_norms(ref, x_t)
  model, variables = from_timm("resnest14d", ref.state_dict())
  old = {k: v.clone().numpy() for k, v in ref.state_dict().items()}
  with one_torch_thread(), torch.no_grad():
    expected_eval = ref.eval()(x_t).numpy()
    expected_train = ref.train()(x_t).numpy()  # updates timm's running statistics
  with jax.default_matmul_precision("highest"):
    logits = model.apply(variables, x)
    train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

  for ours, theirs in ((logits, expected_eval), (train_logits, expected_train)):
    scale = np.abs(theirs).max()
    assert scale > 0.1  # the comparison is not between two near-zeros
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale, rtol=0)
  assert np.abs(expected_train - expected_eval).max() > 0.1  # the two modes differ

  check_statistics_match_timm(updates["batch_stats"], ref.state_dict(), old)


def test_tiny_variant_runs_and_downsamples():
  model = MODELS["test_resnest_tiny"].factory(num_classes=5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 26, 26, 3)), jnp.float32)
  variables = model.init(KEY, x)
  logits, state = model.apply(variables, x, mutable=["intermediates"])
  assert logits.shape == (2, 5) and np.isfinite(np.asarray(logits)).all()
  inter = state["intermediates"]
  assert inter["stage1"][0].shape == (2, 7, 7, 16)
  assert inter["stage2"][0].shape == (2, 4, 4, 32)  # avd: (7 - 1) // 2 + 1
  weights = inter["layer2_0"]["conv2"]["radix_weights"][0]
  assert weights.shape == (2, 2, 8)
  np.testing.assert_allclose(np.asarray(weights).sum(axis=1), 1.0, atol=1e-6)
