"""Self-attention ResNets (BoTNet, HaloNet, Lambda-ResNet): timm 1.0.31's parameter counts,
the block layout, the input-size errors, and ``from_timm`` parity of all three (random
weights, perturbed batch norms; eval mode, and for the Lambda-ResNet train mode with every
running statistic after one forward).

BoTNet's position tables fix its input at 256x256 and HaloNet's 8x8 blocks in the last
stage need multiples of 256, so those two are compared at 256x256 on one image; the
Lambda-ResNet takes two 64x64 images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from attention_flax.convert import from_timm, list_timm_models  # noqa: E402
from attention_flax.models import MODELS, count_params, create_model  # noqa: E402
from tests.test_convert import check_statistics_match_timm, one_torch_thread  # noqa: E402

# timm 1.0.31, 1000 classes.
TIMM_PARAMS = {"botnet26t_256": 12_488_672, "halonet26t": 12_480_288,
               "lambda_resnet26t": 10_958_272}
PAPERS = {"botnet26t_256": "arXiv 2101.11605", "halonet26t": "arXiv 2103.12731",
          "lambda_resnet26t": "arXiv 2102.08602"}
KEY = jax.random.key(0, impl="rbg")


def _abstract(name, size=256):
  model = create_model(name)
  return jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_param_counts_equal_timms(name):
  assert count_params(_abstract(name)) == TIMM_PARAMS[name]
  assert PAPERS[name] in MODELS[name].paper and MODELS[name].input_size == 256
  assert name in list_timm_models()


def test_layout_follows_timm():
  params = _abstract("botnet26t_256")["params"]
  assert [params["stem"][f"conv{i}"]["conv"]["kernel"].shape for i in (1, 2, 3)] == [
      (3, 3, 3, 24), (3, 3, 24, 32), (3, 3, 32, 64)]
  # Stage 3: a strided bottleneck, then self-attention; stage 4: self-attention only.
  assert params["stages_2"]["0"]["conv2_kxk"]["conv"]["kernel"].shape == (3, 3, 256, 256)
  assert "conv2_kxk" not in params["stages_2"]["1"]
  assert "post_attn" in params["stages_2"]["1"]
  # On the 512-channel inner map: q, k, v of 4 heads of 128; tables for the 16x16 map
  # (the strided block pools after attending) and the 8x8 one.
  assert params["stages_3"]["0"]["conv1_1x1"]["conv"]["kernel"].shape == (1, 1, 1024, 512)
  assert params["stages_3"]["0"]["self_attn"]["qkv"]["kernel"].shape == (512, 1536)
  assert params["stages_3"]["0"]["self_attn"]["pos_embed"]["height_rel"].shape == (31, 128)
  assert params["stages_3"]["1"]["self_attn"]["pos_embed"]["width_rel"].shape == (15, 128)
  assert params["stages_3"]["0"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 1024, 2048)
  assert "shortcut" not in params["stages_3"]["1"]
  assert params["head"]["fc"]["kernel"].shape == (2048, 1000)


@pytest.mark.parametrize("name, size, match", [
    ("botnet26t_256", 224, r"256x256 images .* got 224x224; resize .* img_size=\(224, 224\)"),
    ("halonet26t", 128, r"stages_3/1 would see a 4x4 map .* multiples of 256"),
    ("lambda_resnet26t", 80, r"stages_3/0 would see a 5x5 map .* multiples of 32")])
def test_sizes_the_attention_cannot_take_are_refused(name, size, match):
  model = create_model(name)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def _random_timm(name):
  """timm's model with random batch norms; the last norm of every block small, as trained
  nets have (logits of order one)."""
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False)
  with torch.no_grad():
    for module_name, m in model.named_modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        low, high = (0.1, 0.3) if module_name.endswith("conv3_1x1.bn") else (0.5, 1.5)
        m.weight.uniform_(low, high)
        m.bias.normal_(0.0, 0.2)
  return model


def _images(batch, size):
  x_t = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
  return x_t, jnp.asarray(x_t.numpy().transpose(0, 2, 3, 1))


def _assert_close(ours, theirs):
  scale = np.abs(theirs).max()
  assert scale > 0.1
  np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("name", ["botnet26t_256", "halonet26t"])
def test_logits_match_timm_at_256(name):
  x_t, x = _images(1, 256)
  with one_torch_thread():
    ref = _random_timm(name).eval()
    with torch.no_grad():
      expected = ref(x_t).numpy()
  model, variables = from_timm(name, ref.state_dict())
  assert count_params(variables["params"]) == TIMM_PARAMS[name]
  with jax.default_matmul_precision("highest"):
    _assert_close(jax.jit(model.apply)(variables, x), expected)


def test_lambda_resnet_logits_and_statistics_match_timm():
  name = "lambda_resnet26t"
  x_t, x = _images(2, 64)
  with one_torch_thread():
    ref = _random_timm(name)
  model, variables = from_timm(name, ref.state_dict())
  assert count_params(variables["params"]) == TIMM_PARAMS[name]
  old = {k: v.clone().numpy() for k, v in ref.state_dict().items()}
  with one_torch_thread(), torch.no_grad():
    expected_eval = ref.eval()(x_t).numpy()
    expected_train = ref.train()(x_t).numpy()
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(model.apply)(variables, x)
    train_logits, updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  _assert_close(logits, expected_eval)
  _assert_close(train_logits, expected_train)
  assert np.abs(expected_train - expected_eval).max() > 0.1

  timm_state = ref.state_dict()
  # Every batch norm, the lambda layers' norm_q and norm_v among them.
  check_statistics_match_timm(updates["batch_stats"], timm_state, old)
  assert any("norm_q" in k for k in timm_state)
