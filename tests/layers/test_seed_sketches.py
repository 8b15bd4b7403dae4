"""The survey's two PyTorch sketches, SALayer and CALayer, against our layers.

The sketches are written out below from the survey's text. Its SALayer uses two helpers
it does not define; they are those of the CBAM authors' code: ``BasicConv`` (a convolution
without bias, then ``BatchNorm2d(eps=1e-5, momentum=0.01)``, then an optional ReLU, which
the sketch turns off) and ``ChannelPool``. The sketch convolves ``BasicConv(1, 1, ...)``,
one pooled map, where the authors' ChannelPool stacks two (max and mean): so the pool
here is one of them, and both are tested. Each torch module gets random weights (and
random batch-norm statistics), the same weights go into our layer, and the outputs must
agree in float32, in evaluation and in training mode (where the running statistics must
move as PyTorch's with its momentum 0.01).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax.layers.channel import SqueezeExcite
from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.layers.spatial import SpatialAttention

torch = pytest.importorskip("torch")
nn = torch.nn

ATOL = 1e-5
KEY = jax.random.PRNGKey(0)


class BasicConv(nn.Module):
  """The CBAM authors' conv-BN-ReLU block (bias off, BN momentum 0.01 by default)."""

  def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, relu=True,
               bn=True, bias=False):
    super().__init__()
    self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride,
                          padding=padding, bias=bias)
    self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
    self.relu = nn.ReLU() if relu else None

  def forward(self, x):
    x = self.conv(x)
    if self.bn is not None:
      x = self.bn(x)
    if self.relu is not None:
      x = self.relu(x)
    return x


class ChannelPool(nn.Module):
  """One map pooled over the channels: the mean or the max (BasicConv(1, 1) takes one)."""

  def __init__(self, pool):
    super().__init__()
    self.pool = pool

  def forward(self, x):
    if self.pool == "mean":
      return torch.mean(x, 1, keepdim=True)
    return torch.max(x, 1, keepdim=True)[0]


class SALayer(nn.Module):
  """The survey's spatial attention sketch (its ``reduction`` is unused there too)."""

  def __init__(self, channel, reduction=16, pool="mean"):
    super().__init__()
    kernel_size = 7
    self.compress = ChannelPool(pool)
    self.spatial = BasicConv(1, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2,
                             relu=False)
    self.channel = channel

  def forward(self, x):
    x_compress = self.compress(x)
    x_out = self.spatial(x_compress)
    scale = torch.sigmoid(x_out)
    return x * scale


class CALayer(nn.Module):
  """The survey's channel attention sketch: C -> C // reduction -> C, biases, ReLU."""

  def __init__(self, channel, reduction=16):
    super().__init__()
    self.avg_pool = nn.AdaptiveAvgPool2d(1)
    self.conv_du = nn.Sequential(
        nn.Conv2d(channel, channel // reduction, 1, padding=0, bias=True),
        nn.ReLU(inplace=True),
        nn.Conv2d(channel // reduction, channel, 1, padding=0, bias=True),
        nn.Sigmoid())

  def forward(self, x):
    y = self.avg_pool(x)
    y = self.conv_du(y)
    return x * y


def _images(channels, seed):
  """An odd-sized random batch (N, C, H, W) for torch and (N, H, W, C) for us."""
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(4, channels, 9, 11, generator=g)
  return x, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _numpy(t):
  """A copy: torch updates its running statistics in place."""
  return np.array(t.detach().numpy(), np.float32)


def _sa_pair(channels, pool, seed):
  torch.manual_seed(seed)
  ref = SALayer(channels, pool=pool)
  with torch.no_grad():
    ref.spatial.conv.weight.normal_(0.0, 0.3)
    ref.spatial.bn.weight.uniform_(0.5, 1.5)
    ref.spatial.bn.bias.normal_(0.0, 0.3)
    ref.spatial.bn.running_mean.normal_(0.0, 0.3)
    ref.spatial.bn.running_var.uniform_(0.5, 1.5)
  # PyTorch momentum 0.01 is Flax's 0.99; TorchBatchNorm keeps PyTorch's unbiased
  # running variance.
  ours = SpatialAttention(kernel_size=7, pool_order=(pool,), use_bn=True,
                          norm=functools.partial(TorchBatchNorm, momentum=0.99))
  bn = ref.spatial.bn
  variables = {
      "params": {"conv": {"kernel": _numpy(ref.spatial.conv.weight).transpose(2, 3, 1, 0)},
                 "bn": {"scale": _numpy(bn.weight), "bias": _numpy(bn.bias)}},
      "batch_stats": {"bn": {"mean": _numpy(bn.running_mean),
                             "var": _numpy(bn.running_var)}},
  }
  return ref, ours, variables


@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("channels", [24, 64])
def test_sa_layer_matches_the_sketch_in_eval_mode(channels, pool):
  ref, ours, variables = _sa_pair(channels, pool, seed=channels)
  x_t, x = _images(channels, seed=1)
  ref.eval()
  with torch.no_grad():
    want = _numpy(ref(x_t)).transpose(0, 2, 3, 1)
  got = ours.apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)
  # Not vacuous: the gate varies over the positions, so a wrong pool or padding shows.
  gate = want / np.asarray(x)
  assert np.ptp(gate[..., 0]) > 0.1


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_sa_layer_matches_the_sketch_in_training_mode(pool):
  channels = 24
  ref, ours, variables = _sa_pair(channels, pool, seed=7)
  x_t, x = _images(channels, seed=2)
  ref.train()
  with torch.no_grad():
    want = _numpy(ref(x_t)).transpose(0, 2, 3, 1)
  got, updates = ours.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)
  bn = ref.spatial.bn
  np.testing.assert_allclose(np.asarray(updates["batch_stats"]["bn"]["mean"]),
                             _numpy(bn.running_mean), atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(updates["batch_stats"]["bn"]["var"]),
                             _numpy(bn.running_var), atol=1e-6, rtol=0)
  # The statistics moved by PyTorch's 1 %, not by Flax's default 10 %.
  moved = np.abs(_numpy(bn.running_mean) - variables["batch_stats"]["bn"]["mean"])
  assert 0 < moved.max() < 0.05


@pytest.mark.parametrize("channels", [24, 64])
def test_ca_layer_matches_the_sketch_with_the_floor_width(channels):
  torch.manual_seed(channels)
  ref = CALayer(channels).eval()
  first, second = ref.conv_du[0], ref.conv_du[2]
  with torch.no_grad():
    for conv in (first, second):
      conv.weight.normal_(0.0, 0.5)
      conv.bias.normal_(0.0, 0.5)
  hidden = channels // 16
  assert first.out_channels == hidden  # 1 for 24 channels, 4 for 64
  ours = SqueezeExcite(rd_channels=lambda c: c // 16)
  variables = {"params": {
      "fc1": {"kernel": _numpy(first.weight)[:, :, 0, 0].T, "bias": _numpy(first.bias)},
      "fc2": {"kernel": _numpy(second.weight)[:, :, 0, 0].T, "bias": _numpy(second.bias)},
  }}
  x_t, x = _images(channels, seed=3)
  with torch.no_grad():
    want = _numpy(ref(x_t)).transpose(0, 2, 3, 1)
  # The layer builds exactly these shapes (it would refuse a (24, 2) kernel).
  init_shapes = {k: {n: a.shape for n, a in v.items()}
                 for k, v in ours.init(KEY, x)["params"].items()}
  assert init_shapes["fc1"]["kernel"] == (channels, hidden)
  got = ours.apply(variables, x)
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


def test_timm_rounding_and_the_floor_differ_at_24_channels():
  """The reason for the callable width: timm's rounding of 24 / 16 = 1.5 is 2."""
  x = jnp.ones((1, 2, 2, 24), jnp.float32)
  rounded = SqueezeExcite(rd_divisor=1).init(KEY, x)["params"]["fc1"]["kernel"]
  floor = SqueezeExcite(rd_channels=lambda c: c // 16).init(KEY, x)["params"]["fc1"]["kernel"]
  assert rounded.shape == (24, 2) and floor.shape == (24, 1)


def test_a_width_function_that_gives_zero_is_refused():
  x = jnp.ones((1, 2, 2, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"rd_channels\(8\) gave 0.*max\(1, c // 16\)"):
    SqueezeExcite(rd_channels=lambda c: c // 16).init(KEY, x)
