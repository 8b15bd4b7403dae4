"""timm weights -> Flax: coverage of every supported model, model-level parity, file
loading and the converter's errors.

Parity runs every supported timm model, randomly initialised (random batch-norm statistics
and affine parameters too), against the converted Flax model, in eval mode (logits) and in
train mode (logits and every updated running mean and variance). The converter's coverage
and error tests use shape-only ("meta") timm models, which allocate nothing.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")

from attention_flax.convert import from_timm, list_timm_models, load_pretrained  # noqa: E402
from attention_flax.layers.norm import TorchBatchNorm  # noqa: E402
from attention_flax.models import count_params  # noqa: E402
from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402
from tests.models.test_resnet import TIMM_PARAMS  # noqa: E402  (timm 1.0.31, 1000 classes)

SUPPORTED = ["cbam_resnet18", "cbam_resnet50", "ecaresnet50d", "resnet101", "resnet152",
             "resnet18", "resnet34", "resnet50", "resnet50d", "seresnet101", "seresnet152",
             "seresnet18", "seresnet34", "seresnet50"]

# timm families whose parity is tested in their own files (tests/models/test_resnest.py,
# tests/models/test_sknet.py, tests/models/test_byoanet.py).
OTHER_FAMILIES = ["resnest14d", "resnest26d", "resnest50d",
                  "skresnet18", "skresnet34", "skresnext50_32x4d",
                  "botnet26t_256", "halonet26t", "lambda_resnet26t"]

def build_timm(name: str):
  """A timm model; the CBAM ResNets are timm's ResNet with attn_layer="cbam"."""
  if name.startswith("cbam_resnet"):
    block, layers = {"18": (BasicBlock, [2, 2, 2, 2]),
                     "50": (Bottleneck, [3, 4, 6, 3])}[name[len("cbam_resnet"):]]
    return ResNet(block=block, layers=layers, block_args=dict(attn_layer="cbam"))
  return timm.create_model(name, pretrained=False)


def random_timm(name: str, seed: int = 0):
  """A timm model with random batch-norm statistics and affine parameters.

  Fresh batch norms are identity-like and would hide a swapped mean/var or scale/bias. The
  last norm of every residual branch gets small scales, as trained nets have, so that the
  logits stay of order one and an absolute tolerance means something.
  """
  torch.manual_seed(seed)
  model = build_timm(name)
  with torch.no_grad():
    for module_name, m in model.named_modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
    for block in model.modules():
      if isinstance(block, (BasicBlock, Bottleneck)):
        last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        with torch.no_grad():
          last.weight.uniform_(0.1, 0.3)
  return model


@functools.cache
def shape_only_state_dict(name: str) -> dict[str, np.ndarray]:
  """Zero arrays of the shapes and dtypes of timm's state dict, from a "meta" model that
  allocates nothing."""
  with torch.device("meta"):
    model = build_timm(name)
  return {k: np.zeros(tuple(v.shape), np.int64 if "num_batches" in k else np.float32)
          for k, v in model.state_dict().items()}


def test_supported_names():
  assert list_timm_models() == sorted(SUPPORTED + OTHER_FAMILIES)


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_tensor_maps_and_counts_match_timm(name):
  state = shape_only_state_dict(name)
  assert any(k.endswith("num_batches_tracked") for k in state)  # accepted and ignored
  model, variables = from_timm(name, state)
  assert set(variables) == {"params", "batch_stats"}
  assert count_params(variables["params"]) == TIMM_PARAMS[name]
  # Every BN contributes mean + var buffers and one ignored counter.
  buffers = sum(math.prod(v.shape) for k, v in state.items()
                if k.endswith(("running_mean", "running_var")))
  assert count_params(variables["batch_stats"]) == buffers
  assert model.num_classes == 1000 and model.norm is TorchBatchNorm


def test_num_classes_comes_from_fc():
  state = dict(shape_only_state_dict("resnet18"))
  state["fc.weight"] = np.zeros((7, 512), np.float32)
  state["fc.bias"] = np.zeros((7,), np.float32)
  model, variables = from_timm("resnet18", state)
  assert model.num_classes == 7
  assert variables["params"]["fc"]["kernel"].shape == (512, 7)


@contextlib.contextmanager
def one_torch_thread():
  """PyTorch on one thread: on these small inputs its intra-op threads mostly wait for one
  another, and on a busy two-core machine that makes a forward ten times slower."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(threads)


def _flat_stats(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat_stats(value, prefix + (key,))
    else:
      yield prefix + (key,), np.asarray(value)


def _timm_stat_key(path):
  """('layer1_0', 'se', 'spatial', 'bn', 'var') -> 'layer1.0.se.spatial.conv.bn.running_var'.

  Written independently of the converter's mapping, so that the two check each other.
  """
  names = []
  for part in path[:-1]:
    head, _, index = part.rpartition("_")
    names.append(f"{head}.{index}" if index.isdigit() and head else part)
  if names[-2:] == ["spatial", "bn"]:
    names = names[:-1] + ["conv", "bn"]
  return ".".join(names + ["running_" + path[-1]])


def check_statistics_match_timm(batch_stats, timm_state, old):
  """Every running mean and variance of ``batch_stats`` (after one train-mode forward) equals
  timm's in ``timm_state``, each moved from ``old``, and none of timm's is left unchecked."""
  checked = 0
  for path, ours in _flat_stats(batch_stats):
    key = _timm_stat_key(path)
    theirs = timm_state[key].numpy()
    assert not np.allclose(theirs, old[key])  # one train step moved the statistics
    # Deep in a ResNet-152 float32 round-off reaches 1e-5 relative; a wrong rule is off by
    # far more (Flax's biased variance: 1e-4 to 7e-4 even in CBAM's small spatial gates).
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=5e-5, err_msg=key)
    checked += 1
  assert checked == sum(k.endswith(("running_mean", "running_var")) for k in timm_state)


# Two 64x64 images: 2x2 maps in the last stage, so every train-mode batch norm sees at least
# 8 values per channel (fewer make the normalisation of near-equal values ill-conditioned).
PARITY_INPUT = (2, 3, 64, 64)


@pytest.mark.parametrize("name", SUPPORTED)
def test_logits_and_statistics_match_timm(name):
  ref = random_timm(name)
  model, variables = from_timm(name, ref.state_dict())
  old = {k: v.clone().numpy() for k, v in ref.state_dict().items()}
  x_t = torch.randn(*PARITY_INPUT, generator=torch.Generator().manual_seed(1))
  x = jnp.asarray(x_t.numpy().transpose(0, 2, 3, 1))
  with one_torch_thread(), torch.no_grad():
    expected_eval = ref.eval()(x_t).numpy()
    expected_train = ref.train()(x_t).numpy()  # updates timm's running statistics
  # Not jitted: dispatching the layers one by one costs a few seconds, compiling a
  # ResNet-152 twice (eval and train) several times that.
  with jax.default_matmul_precision("highest"):
    logits = model.apply(variables, x)
    train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

  for ours, theirs in ((logits, expected_eval), (train_logits, expected_train)):
    assert np.abs(theirs).max() > 0.1  # the comparison is not between two near-zeros
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(expected_train - expected_eval).max() > 0.1  # the two modes differ

  check_statistics_match_timm(updates["batch_stats"], ref.state_dict(), old)


def test_missing_extra_and_misshaped_tensors_are_all_named():
  state = dict(shape_only_state_dict("resnet18"))
  del state["layer1.0.bn1.running_var"]
  del state["layer3.1.conv2.weight"]
  state["layer9.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
  state["layer2.0.conv1.weight"] = np.zeros((128, 64, 1, 1), np.float32)
  with pytest.raises(ValueError) as err:
    from_timm("resnet18", state)
  message = str(err.value)
  for key in ("layer1.0.bn1.running_var", "layer3.1.conv2.weight", "layer9.0.conv1.weight",
              "layer2.0.conv1.weight: expected (128, 64, 3, 3), got (128, 64, 1, 1)"):
    assert key in message
  assert "missing 2" in message and "unexpected 1" in message and "mis-shaped 1" in message


@pytest.mark.parametrize("change", ["missing", "extra", "misshaped"])
def test_each_kind_of_mismatch_alone_is_a_value_error(change):
  state = dict(shape_only_state_dict("seresnet18"))
  key = "layer1.0.se.fc1.weight"
  if change == "missing":
    del state[key]
  elif change == "extra":
    key = "layer1.0.se.fc3.weight"
    state[key] = np.zeros((8, 8, 1, 1), np.float32)
  else:
    state[key] = np.zeros((8, 64), np.float32)  # a Linear weight where a 1x1 conv belongs
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    from_timm("seresnet18", state)


def test_wrong_architecture_and_unknown_name():
  with pytest.raises(ValueError, match="unexpected .*se.fc1"):
    from_timm("resnet18", shape_only_state_dict("seresnet18"))
  with pytest.raises(ValueError, match="resnet50d.*seresnet152|seresnet152.*resnet50d"):
    from_timm("resnet51", {})
  with pytest.raises(ValueError, match="fc.weight"):
    from_timm("resnet18", {})
  # Pretrained tags and the hub prefix name the same architecture.
  model, _ = from_timm("timm/resnet18.a1_in1k", shape_only_state_dict("resnet18"))
  assert model.num_classes == 1000


def _assert_same_tree(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_safetensors_and_pth_round_trips(tmp_path):
  ref = random_timm("seresnet18", seed=3)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  _, expected = from_timm("seresnet18", ref.state_dict())

  path = tmp_path / "seresnet18.safetensors"
  safetensors_numpy.save_file(state, str(path))
  _, variables = load_pretrained("seresnet18", path)
  _assert_same_tree(variables, expected)

  wrapped = tmp_path / "checkpoint.pth"
  torch.save({"state_dict": ref.state_dict(), "epoch": 3}, wrapped)
  _, variables = load_pretrained("seresnet18", wrapped)
  _assert_same_tree(variables, expected)

  plain = tmp_path / "weights.bin"
  torch.save(ref.state_dict(), plain)
  _, variables = load_pretrained("seresnet18", str(plain))
  _assert_same_tree(variables, expected)


def test_bfloat16_safetensors_load_as_float32(tmp_path):
  # numpy has no bfloat16: such a file takes the JAX reader, then matches the torch path.
  state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
           for k, v in random_timm("resnet18", seed=4).state_dict().items()}
  path = tmp_path / "resnet18_bf16.safetensors"
  safetensors_torch.save_file(state, str(path))
  _, variables = load_pretrained("resnet18", path)
  _, expected = from_timm("resnet18", state)  # torch bfloat16 tensors, widened
  _assert_same_tree(variables, expected)
  kernel = variables["params"]["conv1"]["kernel"]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(  # exactly the bfloat16 values, nothing rounded twice
      kernel, state["conv1.weight"].float().numpy().transpose(2, 3, 1, 0))


def test_load_pretrained_refuses_bad_files(tmp_path):
  with pytest.raises(ValueError, match=r"\.safetensors"):
    load_pretrained("resnet18", tmp_path / "weights.npz")
  with pytest.raises(FileNotFoundError, match="download"):
    load_pretrained("resnet18", tmp_path / "absent.safetensors")
  with pytest.raises(ValueError, match="Unsupported timm model"):
    load_pretrained("vit_base_patch16_224", tmp_path / "absent.safetensors")
  # weights_only: a pickled arbitrary object is refused, not executed.
  evil = tmp_path / "evil.pth"
  torch.save({"state_dict": {}, "obj": _Opaque()}, evil)
  with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
    load_pretrained("resnet18", evil)


class _Opaque:
  """A class torch's weights-only unpickler does not allow."""
