"""Parity of ``SimpleCoordAttn`` ("scoord"), ``EfficientLocalAttn`` ("ela") and
``StripAttn`` ("strip") with timm 1.0.31's ``layers/coord_attn.py``.

Each layer gets the weights of the timm module (random weights, biases where enabled,
and random GroupNorm scales and shifts for ELA) through
``attention_flax.convert.convert_variables``; outputs and sown gates on the same random
non-square batch (NCHW there, NHWC here) must agree to 1e-5 in float32 at the highest
matmul precision, for two channel counts, in eval and in train mode. None of the three
has a batch norm (ELA's GroupNorm keeps no running statistics), so training must leave
no ``batch_stats`` and give the evaluation output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
timm_layers = pytest.importorskip("timm.layers")

from attention_flax.convert import convert_variables  # noqa: E402
from attention_flax.layers import (  # noqa: E402
    EfficientLocalAttn, SimpleCoordAttn, StripAttn, create_attention, list_attentions)
from tests.layers.test_parity import KEY, _apply, _convert, _images, _nhwc  # noqa: E402
from timm.layers.coord_attn import EfficientLocalAttn as TimmELA  # noqa: E402
from timm.layers.coord_attn import SimpleCoordAttn as TimmSimpleCoord  # noqa: E402
from timm.layers.coord_attn import StripAttn as TimmStrip  # noqa: E402

TOL = 1e-5
SHAPE_HW = (6, 9)


def _randomised(factory, seed: int):
  """``factory()`` built under ``seed``, with random GroupNorm affine parameters and
  values in any zero parameter (biases)."""
  torch.manual_seed(seed)
  ref = factory()
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
    for p in ref.parameters():
      if not p.any():
        p.normal_(0.0, 0.3)
  return ref


def _gate_outputs(ref):
  """Records every output of ``ref.gate`` (ELA calls it twice: a_h, then a_w)."""
  seen = []
  ref.gate.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
  return seen


def _check_modes(ours, variables, x, expected):
  """Eval and train mode give ``expected``; train mode leaves no batch statistics."""
  out, state = _apply(ours, variables, x)
  np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)
  out_train, state_train = _apply(ours, variables, x, train=True)
  np.testing.assert_allclose(out_train, expected, atol=TOL, rtol=0)
  assert "batch_stats" not in variables and not state_train.get("batch_stats")
  return state["intermediates"]


# ---- SimpleCoordAttn ("scoord") -------------------------------------------------------------


@pytest.mark.parametrize("channels, hidden", [(32, 8), (96, 16)])
def test_simple_coord_matches_timm(channels, hidden):
  ref = _randomised(lambda: TimmSimpleCoord(channels), seed=50 + channels).eval()
  x_t, x = _images((2, channels) + SHAPE_HW, seed=51)
  ours = create_attention("scoord")
  abstract = jax.eval_shape(ours.init, KEY, x)
  variables = convert_variables(abstract, ref.state_dict(),
                                linear=[("fc1",), ("fc_h",), ("fc_w",)])
  assert variables["params"]["fc1"]["kernel"].shape == (channels, hidden)
  assert variables["params"]["fc_h"]["bias"].shape == (channels,)
  with torch.no_grad():  # timm's gate, recomputed from its own layers
    a_h = ref.fc_h(ref.act(ref.fc1(x_t.mean(3).transpose(1, 2))))  # (N, H, C)
    a_w = ref.fc_w(ref.act(ref.fc1(x_t.mean(2).transpose(1, 2))))  # (N, W, C)
    mask = torch.sigmoid(a_h[:, :, None, :] + a_w[:, None, :, :]).numpy()
  inter = _check_modes(ours, variables, x, _nhwc(ref(x_t)))
  np.testing.assert_allclose(inter["coord_mask"][0], mask, atol=TOL, rtol=0)


def test_simple_coord_options_match_timm():
  ref = _randomised(lambda: TimmSimpleCoord(24, rd_channels=5, bias=False, has_skip=True,
                                            act_layer=torch.nn.ReLU), seed=52).eval()
  x_t, x = _images((2, 24, 5, 3), seed=53)
  ours = SimpleCoordAttn(rd_channels=5, use_bias=False, has_skip=True, act="relu")
  abstract = jax.eval_shape(ours.init, KEY, x)
  variables = convert_variables(abstract, ref.state_dict(),
                                linear=[("fc1",), ("fc_h",), ("fc_w",)])
  _check_modes(ours, variables, x, _nhwc(ref(x_t)))


# ---- EfficientLocalAttn ("ela") -------------------------------------------------------------


@pytest.mark.parametrize("channels", [16, 48])
def test_efficient_local_attention_matches_timm(channels):
  ref = _randomised(lambda: TimmELA(channels), seed=54 + channels).eval()
  gates = _gate_outputs(ref)
  x_t, x = _images((2, channels) + SHAPE_HW, seed=55)
  ours = create_attention("ela")
  variables = _convert(ours, ref, x)
  params = variables["params"]
  assert params["conv_h"]["kernel"].shape == (7, 1, 1, channels)
  assert params["conv_w"]["kernel"].shape == (1, 7, 1, channels)
  assert "bias" not in params["conv_h"]
  assert params["norm_h"]["scale"].shape == (channels,)
  expected = _nhwc(ref(x_t))
  inter = _check_modes(ours, variables, x, expected)
  assert inter["coord_gate_h"][0].shape == (2, SHAPE_HW[0], 1, channels)
  assert inter["coord_gate_w"][0].shape == (2, 1, SHAPE_HW[1], channels)
  np.testing.assert_allclose(inter["coord_gate_h"][0], _nhwc(gates[0]), atol=TOL, rtol=0)
  np.testing.assert_allclose(inter["coord_gate_w"][0], _nhwc(gates[1]), atol=TOL, rtol=0)


@pytest.mark.parametrize("norm", ["none", "group16"])
def test_efficient_local_attention_options_match_timm(norm):
  """Biases, another kernel, skip, and the norm left out or the paper's 16 groups."""
  if norm == "none":
    torch_norm, our_norm = None, None
  else:
    torch_norm = functools.partial(torch.nn.GroupNorm, 16)
    our_norm = functools.partial(nn.GroupNorm, num_groups=16, epsilon=1e-5)
  ref = _randomised(lambda: TimmELA(32, kernel_size=5, bias=True, has_skip=True,
                                    norm_layer=torch_norm), seed=56).eval()
  x_t, x = _images((2, 32, 7, 4), seed=57)
  ours = EfficientLocalAttn(kernel_size=5, use_bias=True, has_skip=True, norm=our_norm)
  variables = _convert(ours, ref, x)
  assert variables["params"]["conv_w"]["kernel"].shape == (1, 5, 1, 32)
  _check_modes(ours, variables, x, _nhwc(ref(x_t)))


# ---- StripAttn ("strip") --------------------------------------------------------------------


@pytest.mark.parametrize("channels", [16, 48])
def test_strip_attention_matches_timm(channels):
  ref = _randomised(lambda: TimmStrip(channels), seed=58 + channels).eval()
  gates = _gate_outputs(ref)
  x_t, x = _images((2, channels) + SHAPE_HW, seed=59)
  ours = create_attention("strip")
  variables = _convert(ours, ref, x)
  assert variables["params"]["conv_h"]["kernel"].shape == (3, 1, 1, channels)
  assert "bias" not in variables["params"]["conv_w"]
  inter = _check_modes(ours, variables, x, _nhwc(ref(x_t)))
  assert inter["coord_mask"][0].shape == (2,) + SHAPE_HW + (channels,)
  np.testing.assert_allclose(inter["coord_mask"][0], _nhwc(gates[0]), atol=TOL, rtol=0)


@pytest.mark.parametrize("use_conv", [True, False])
def test_strip_attention_options_match_timm(use_conv):
  ref = _randomised(lambda: TimmStrip(24, use_conv=use_conv, kernel_size=5, bias=True,
                                      has_skip=True), seed=60).eval()
  x_t, x = _images((2, 24, 4, 7), seed=61)
  ours = StripAttn(use_conv=use_conv, kernel_size=5, use_bias=True, has_skip=True)
  if use_conv:
    variables = _convert(ours, ref, x)
  else:
    variables = ours.init(KEY, x)
    assert "params" not in variables or not variables["params"]
    variables = {"params": {}}
  _check_modes(ours, variables, x, _nhwc(ref(x_t)))


def test_even_kernels_are_rejected():
  x = jnp.zeros((1, 5, 5, 8))
  for layer in (EfficientLocalAttn(kernel_size=4), StripAttn(kernel_size=2)):
    with pytest.raises(ValueError, match="odd"):
      layer.init(KEY, x)


def test_registered():
  assert {"scoord", "ela", "strip"} <= set(list_attentions())
  assert isinstance(create_attention("scoord"), SimpleCoordAttn)
  assert isinstance(create_attention("ela"), EfficientLocalAttn)
  assert isinstance(create_attention("strip"), StripAttn)
