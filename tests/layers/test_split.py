"""Split attention (ResNeSt) against timm's ``SplitAttn``: values, radix weights, running
statistics, widths, and the layer contract beyond the registry's conformance suite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from attention_flax.layers import create_attention  # noqa: E402
from attention_flax.layers.split import (  # noqa: E402
    SplitAttention, radix_softmax, split_attention_width)
from tests.layers.test_parity import (  # noqa: E402
    _apply, _capture, _check_running_stats, _convert, _images, _nhwc, _randomise_norms)
from timm.layers.split_attn import RadixSoftmax, SplitAttn  # noqa: E402

TOL = 2e-5


def _timm(channels, seed, **kwargs):
  torch.manual_seed(seed)
  ref = SplitAttn(channels, norm_layer=torch.nn.BatchNorm2d, **kwargs)
  _randomise_norms(ref)
  return ref


@pytest.mark.parametrize("channels, out, radix, groups, stride, train", [
    (16, None, 2, 1, 1, False),
    (16, None, 2, 1, 1, True),
    (24, 32, 2, 2, 2, False),
    (24, 32, 2, 2, 2, True),
    (12, 8, 1, 2, 1, True),   # radix 1: a sigmoid gate
    (18, 12, 3, 1, 2, False),
])
def test_split_attention_matches_timm(channels, out, radix, groups, stride, train):
  ref = _timm(channels, seed=radix + groups, out_channels=out, radix=radix, groups=groups,
              stride=stride)
  ref.train(train)
  attn = _capture(ref.rsoftmax)
  # Train mode normalises bn1 over the batch alone (1x1 pooled maps): four images keep
  # its statistics well conditioned.
  batch = 4 if train else 2
  x_t, x = _images((batch, channels, 7, 6), seed=radix)
  if train:
    # TorchBatchNorm's one-pass variance is shifted by the running mean; bn1 sees N pooled
    # values per channel with a small spread, so a running mean many spreads away (as a
    # random one is, not a trained one) costs float32 digits. Keep it near the batch mean.
    pre = _capture(ref.fc1)
    ref.eval()
    ref(x_t)
    ref.train()
    with torch.no_grad():
      ref.bn1.running_mean.copy_(pre[0].mean(dim=(0, 2, 3))
                                 + 0.02 * torch.randn(ref.bn1.num_features))
  ours = SplitAttention(features=out, radix=radix, groups=groups, strides=stride)
  variables = _convert(ours, ref, x)
  hidden = split_attention_width(channels, radix, 0.25, 8)
  assert variables["params"]["fc1"]["kernel"].shape == (1, 1, (out or channels) // groups,
                                                        hidden)
  old = {"var": ref.bn0.running_var.clone().numpy()}
  old1 = {"var": ref.bn1.running_var.clone().numpy()}
  out_ours, state = _apply(ours, variables, x, train)
  expected = _nhwc(ref(x_t))
  assert out_ours.shape == expected.shape
  np.testing.assert_allclose(out_ours, expected, atol=TOL, rtol=0)
  weights = state["intermediates"]["radix_weights"][0]
  assert weights.shape == (batch, radix, out or channels)
  np.testing.assert_allclose(weights.reshape(batch, -1),
                             attn[-1].numpy().reshape(batch, -1), atol=TOL, rtol=0)
  if radix > 1:
    per_channel = np.asarray(weights).sum(axis=1)
    np.testing.assert_allclose(per_channel, 1.0, atol=1e-6)
  if train:
    h, w = expected.shape[1:3]
    _check_running_stats(state["batch_stats"]["bn0"], old, ref.bn0, count=batch * h * w)
    _check_running_stats(state["batch_stats"]["bn1"], old1, ref.bn1, count=batch)


@pytest.mark.parametrize("radix, groups", [(2, 1), (2, 4), (4, 2), (1, 3)])
def test_radix_softmax_matches_timm(radix, groups):
  torch.manual_seed(7)
  logits = torch.randn(3, radix * groups * 5)
  expected = RadixSoftmax(radix, groups)(logits).numpy()
  got = radix_softmax(jnp.asarray(logits.numpy()), radix, groups)
  np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels, radix, rd_channels, width", [
    (64, 2, None, 32), (128, 2, None, 64), (256, 2, None, 128), (512, 2, None, 256),
    (16, 2, None, 32), (200, 2, None, 104), (64, 4, None, 64), (64, 2, 20, 40)])
def test_hidden_width_is_timms(channels, radix, rd_channels, width):
  assert split_attention_width(channels, radix, 0.25, 8, rd_channels) == width
  ref = SplitAttn(channels, radix=radix, rd_channels=rd_channels)
  assert ref.fc1.out_channels == width


def test_registered_as_splat_and_keeps_the_shape_by_default():
  layer = create_attention("splat")
  assert isinstance(layer, SplitAttention)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 16))
  variables = layer.init(jax.random.PRNGKey(1), x)
  y, state = layer.apply(variables, x, mutable=["intermediates"])
  assert y.shape == x.shape
  assert state["intermediates"]["radix_weights"][0].shape == (2, 2, 16)
  assert SplitAttention.maps == {"radix_weights": "branch_weights"}
  # timm's parameter count: conv 16*32*9/2, bn0 2*32, fc1 16*32+32, bn1 2*32, fc2 32*32+32.
  count = sum(p.size for p in jax.tree.leaves(variables["params"]))
  assert count == 16 * 32 * 9 // 2 + 64 + 16 * 32 + 32 + 64 + 32 * 32 + 32


def test_indivisible_channels_are_refused():
  with pytest.raises(ValueError, match="divisible"):
    SplitAttention(groups=2).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 6)))
