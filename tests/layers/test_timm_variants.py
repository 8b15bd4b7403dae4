"""Parity with timm 1.0.31's ``create_attn`` variants ``ecam``, ``ceca``, ``lcbam`` and ``gca``.

Each registered name is built with ``create_attention(name)`` and given the weights of
``timm.layers.create_attn(name, channels)`` (random weights, perturbed norm parameters and
running statistics) through ``attention_flax.convert.convert_variables``, the converter the
models use; the outputs on the same random non-square batch (NCHW there, NHWC here) must
agree to 1e-5 in float32 at the highest matmul precision, for two channel counts. The
light CBAM's BatchNorm is checked in eval and in train mode, where its updated running
mean and variance must equal PyTorch's. Finally each variant sits in a ResNet basic
block (where the channel gates are folded into the block's last BatchNorm) and must match
timm's ``BasicBlock(attn_layer=name)``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm_layers = pytest.importorskip("timm.layers")

from attention_flax.convert import convert_variables  # noqa: E402
from attention_flax.layers import (  # noqa: E402
    CBAM, ECA, GlobalContext, create_attention, list_attentions)
from attention_flax.layers.spatial import SpatialAttention  # noqa: E402
from attention_flax.models.resnet import BasicBlock  # noqa: E402
from tests.layers.test_parity import (  # noqa: E402
    _apply, _check_running_stats, _convert, _images, _nhwc, _randomise_norms)
from timm.models.resnet import BasicBlock as TimmBasicBlock  # noqa: E402

TOL = 1e-5
VARIANTS = ("ecam", "ceca", "lcbam", "gca")


def _timm(name: str, channels: int, seed: int):
  """``timm.layers.create_attn(name, channels)`` with random weights and norms."""
  torch.manual_seed(seed)
  ref = timm_layers.create_attn(name, channels)
  _randomise_norms(ref)
  with torch.no_grad():
    for p in ref.parameters():  # biases and zero-initialised layers get values too
      if not p.any():
        p.normal_(0.0, 0.3)
  return ref


# ---- the registry ----------------------------------------------------------------------


@pytest.mark.parametrize("name, cls, fields", [
    ("ecam", ECA, {"use_mlp": True, "padding": "zeros"}),
    ("ceca", ECA, {"use_mlp": False, "padding": "circular"}),
    ("lcbam", CBAM, {"light": True}),
    ("gca", GlobalContext, {"fuse": "add"}),
])
def test_registry_builds_each_variant(name, cls, fields):
  assert name in list_attentions()
  layer = create_attention(name)
  assert type(layer) is cls
  for field, value in fields.items():
    assert getattr(layer, field) == value
  # Keywords still reach the layer, and the registered defaults can be overridden.
  assert create_attention(name.upper(), gate="hard_sigmoid").gate == "hard_sigmoid"


def test_variants_default_to_the_base_layers():
  assert ECA().use_mlp is False and ECA().padding == "zeros"
  assert CBAM().light is False
  assert GlobalContext().fuse == "scale"


# ---- ECA with the per-channel MLP (timm "ecam") -------------------------------------------


@pytest.mark.parametrize("channels, kernel, hidden", [
    (64, 3, 8),     # 64 / 8 = 8
    (256, 5, 32),   # 256 / 8 = 32
    (88, 3, 16),    # 11 rounds to 8, below 0.9 * 11: timm's round limit adds 8
])
def test_ecam_matches_timm(channels, kernel, hidden):
  ref = _timm("ecam", channels, seed=20).eval()
  assert ref.conv.weight.shape == (hidden, 1, 1)
  assert ref.conv2.weight.shape == (1, hidden, kernel)
  gates = []
  ref.gate.register_forward_hook(lambda _m, _i, out: gates.append(out.detach().clone()))
  x_t, x = _images((2, channels, 5, 7), seed=21)
  ours = create_attention("ecam")
  variables = _convert(ours, ref, x)
  params = variables["params"]
  assert params["conv"]["kernel"].shape == (1, 1, hidden)
  assert params["conv2"]["kernel"].shape == (kernel, hidden, 1)
  np.testing.assert_array_equal(params["conv2"]["kernel"][:, :, 0],
                                ref.conv2.weight.detach().numpy()[0].T)
  out, state = _apply(ours, variables, x)
  np.testing.assert_allclose(out, _nhwc(ref(x_t)), atol=TOL, rtol=0)
  np.testing.assert_allclose(state["intermediates"]["channel_gate"][0][:, 0, 0, :],
                             gates[0].reshape(2, channels), atol=TOL, rtol=0)


def test_ecam_explicit_width_and_gate_from_pooled():
  x_t, x = _images((2, 32, 4, 3), seed=22)
  layer = ECA(use_mlp=True, rd_channels=5)
  variables = layer.init(jax.random.PRNGKey(0), x)
  assert variables["params"]["conv"]["kernel"].shape == (1, 1, 5)
  with jax.default_matmul_precision("highest"):
    out = layer.apply(variables, x)
    gate = layer.apply(variables, x.mean(axis=(1, 2)), method=ECA.gate_from_pooled)
  np.testing.assert_allclose(out, x * gate, atol=1e-6, rtol=0)


# ---- circular ECA (timm "ceca") -----------------------------------------------------------


@pytest.mark.parametrize("channels, kernel", [(64, 3), (256, 5)])
def test_ceca_matches_timm(channels, kernel):
  ref = _timm("ceca", channels, seed=23).eval()
  assert ref.conv.weight.shape == (1, 1, kernel) and ref.conv.bias is None
  x_t, x = _images((2, channels, 6, 3), seed=24)
  ours = create_attention("ceca")
  variables = _convert(ours, ref, x)
  assert set(variables["params"]["conv"]) == {"kernel"}
  out, state = _apply(ours, variables, x)
  expected = _nhwc(ref(x_t))
  np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)
  # The padding matters at both ends of the channel axis, and only there.
  plain, _ = _apply(ECA(), variables, x)
  pad = (kernel - 1) // 2
  edge = np.abs(np.asarray(plain) - expected).max(axis=(0, 1, 2))
  assert (edge[:pad] > 1e-4).all() and (edge[-pad:] > 1e-4).all()
  assert edge[pad:-pad].max() < TOL


# ---- light CBAM (timm "lcbam") ------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("channels, hidden", [(64, 4), (256, 16)])
def test_lcbam_matches_timm(channels, hidden, train):
  ref = _timm("lcbam", channels, seed=25)
  ref.train(train)
  masks = []
  ref.spatial.gate.register_forward_hook(lambda _m, _i, out: masks.append(out.detach().clone()))
  x_t, x = _images((2, channels, 6, 5), seed=26)
  with torch.no_grad():  # the light channel gate (timm computes it inline)
    pooled = 0.5 * x_t.mean((2, 3), keepdim=True) + 0.5 * x_t.amax((2, 3), keepdim=True)
    channel_gate = torch.sigmoid(ref.channel.fc2(ref.channel.act(ref.channel.fc1(pooled))))
  ours = create_attention("lcbam")
  variables = _convert(ours, ref, x)
  params = variables["params"]
  assert params["channel"]["fc1"]["kernel"].shape == (channels, hidden)
  assert params["spatial"]["conv"]["kernel"].shape == (7, 7, 1, 1)
  bn = ref.spatial.conv.bn
  old = {"var": bn.running_var.clone().numpy()}
  out, state = _apply(ours, variables, x, train)
  np.testing.assert_allclose(out, _nhwc(ref(x_t)), atol=TOL, rtol=0)
  inter = state["intermediates"]
  np.testing.assert_allclose(inter["channel"]["channel_gate"][0], _nhwc(channel_gate),
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(inter["spatial"]["spatial_mask"][0], _nhwc(masks[0]),
                             atol=TOL, rtol=0)
  if train:  # 2 * 6 * 5 = 60 values per channel reach the spatial BatchNorm
    _check_running_stats(state["batch_stats"]["spatial"]["bn"], old, bn, count=2 * 6 * 5)
  else:
    assert "batch_stats" not in state


def test_lcbam_after_gate_is_the_light_spatial_gate():
  x_t, x = _images((2, 16, 5, 4), seed=27)
  layer = CBAM(light=True)
  variables = layer.init(jax.random.PRNGKey(0), x)
  with jax.default_matmul_precision("highest"):
    mean, top = x.mean(axis=(1, 2)), x.max(axis=(1, 2))
    gate = layer.apply(variables, mean, top, method=CBAM.gate_from_pooled)
    y = layer.apply(variables, x * gate, method=CBAM.after_gate)
    light_spatial = SpatialAttention(pool_order=("mean_max",), use_bn=True)
    spatial = light_spatial.apply({"params": variables["params"]["spatial"],
                                   "batch_stats": variables["batch_stats"]["spatial"]}, x * gate)
    np.testing.assert_allclose(layer.apply(variables, x), y, atol=1e-6, rtol=0)
  np.testing.assert_allclose(y, spatial, atol=1e-6, rtol=0)


# ---- add-fused Global Context (timm "gca") ------------------------------------------------


@pytest.mark.parametrize("channels, hidden", [(64, 8), (256, 32)])
def test_gca_matches_timm(channels, hidden):
  torch.manual_seed(28)
  fresh = timm_layers.create_attn("gca", channels)
  assert fresh.mlp_scale is None and not fresh.mlp_add.fc2.weight.any()
  ref = _timm("gca", channels, seed=28).eval()
  x_t, x = _images((2, channels, 5, 7), seed=29)
  ours = create_attention("gca")
  # timm starts the add branch's last layer at zero; so do we.
  fresh_params = ours.init(jax.random.PRNGKey(0), x)["params"]
  assert not np.asarray(fresh_params["mlp_add"]["fc2"]["kernel"]).any()
  variables = _convert(ours, ref, x)  # no mlp_scale on either side
  assert variables["params"]["mlp_add"]["fc1"]["kernel"].shape == (channels, hidden)
  out, state = _apply(ours, variables, x)
  np.testing.assert_allclose(out, _nhwc(ref(x_t)), atol=TOL, rtol=0)
  with torch.no_grad():
    scores = ref.conv_attn(x_t).reshape(2, -1).softmax(-1).reshape(2, 5, 7, 1).numpy()
  np.testing.assert_allclose(state["intermediates"]["context_weights"][0], scores,
                             atol=1e-6, rtol=0)
  assert "channel_gate" not in state["intermediates"]


# ---- inside a ResNet basic block ----------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_in_a_basic_block_matches_timm(name, train):
  channels = 64
  torch.manual_seed(30)
  ref = TimmBasicBlock(channels, channels, attn_layer=name)
  _randomise_norms(ref)
  with torch.no_grad():
    for p in ref.se.parameters():
      if not p.any():
        p.normal_(0.0, 0.3)
  ref.train(train)
  x_t, x = _images((2, channels, 6, 5), seed=31)
  ours = BasicBlock(channels, attn=name)
  abstract = jax.eval_shape(functools.partial(ours.init, train=False), jax.random.PRNGKey(0), x)
  variables = convert_variables(abstract, ref.state_dict())
  out, state = _apply(ours, variables, x, train)
  np.testing.assert_allclose(out, _nhwc(ref(x_t)), atol=TOL, rtol=0)
  if train:
    torch_stats = ref.state_dict()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["batch_stats"])[0]:
      names = [k.key for k in path]
      key = ".".join(names[:-1]).replace("spatial.bn", "spatial.conv.bn")
      key += {"mean": ".running_mean", "var": ".running_var"}[names[-1]]
      np.testing.assert_allclose(leaf, torch_stats[key].numpy(), atol=1e-6, rtol=1e-6)
