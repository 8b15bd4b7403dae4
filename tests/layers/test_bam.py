"""BAM against a hand computation in numpy (timm has no BAM).

The reference below writes out Park et al. 2018 (arXiv 1807.06514) Eqs. 1-4 in float64
numpy: the channel MLP on the spatial mean, the spatial branch's 1x1 and dilated 3x3
convolutions as explicit sums over kernel taps on a zero-padded map, every batch norm
in eval mode (running statistics) or train mode (batch statistics, and PyTorch's running
update with the unbiased variance), then ``(1 + sigmoid(Mc + Ms)) * x``. Weights, norm
parameters and running statistics are random; the layer must agree to 1e-5 in float32 at
the highest matmul precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from attention_flax import BAM, create_attention
from attention_flax.models import count_params

TOL = 1e-5
EPS = 1e-5
MOMENTUM = 0.1  # PyTorch's convention: new = (1 - m) * old + m * batch


def _images(shape, seed=0):
  rng = np.random.default_rng(seed)
  # An offset and a spread per channel, so that the batch norms have work to do, and a
  # spread per image, so that batch statistics over a few images are well conditioned.
  per_image = rng.uniform(0.5, 2.0, (shape[0], 1, 1, 1))
  return (rng.normal(size=shape) * rng.uniform(0.5, 2.0, shape[-1]) * per_image
          + rng.normal(size=shape[-1])).astype(np.float32)


def _randomise(variables, seed=1):
  """Every parameter random (biases too), BN scales around 1, running means around 0
  and running variances in [0.5, 2]."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, variables), sep="/")
  out = {}
  for key, value in flat.items():
    shape = value.shape
    if key.endswith("scale"):
      new = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("/var"):
      new = rng.uniform(0.5, 2.0, shape)
    elif key.endswith("/mean"):
      new = rng.normal(0.0, 0.5, shape)
    elif key.endswith("bias"):  # leaning positive, so that the ReLUs keep most units
      new = rng.normal(0.3, 0.5, shape)
    else:  # kernels: about unit-variance outputs
      fan_in = int(np.prod(shape[:-1]))
      new = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
    out[key] = new.astype(np.float32)
  return traverse_util.unflatten_dict(out, sep="/")


def _dilated_conv(x, kernel, bias, dilation):
  """(N, H, W, I) * (k, k, I, O), stride 1, zero padding ``dilation * (k // 2)``."""
  k = kernel.shape[0]
  pad = dilation * (k // 2)
  n, h, w, _ = x.shape
  xp = np.zeros((n, h + 2 * pad, w + 2 * pad, x.shape[-1]))
  xp[:, pad:pad + h, pad:pad + w] = x
  out = np.zeros((n, h, w, kernel.shape[-1]))
  for a in range(k):
    for b in range(k):
      window = xp[:, a * dilation:a * dilation + h, b * dilation:b * dilation + w]
      out += np.einsum("nhwi,io->nhwo", window, kernel[a, b])
  return out + bias


class _Reference:
  """BAM in float64 numpy; ``stats`` collects the updated running statistics."""

  def __init__(self, variables, train, mlp_norm=True, branch_norm=True, combine="sum",
               num_dilated=2, dilation=4):
    f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
    self.params = f64(variables["params"])
    self.running = f64(variables["batch_stats"])
    self.train, self.mlp_norm, self.branch_norm = train, mlp_norm, branch_norm
    self.combine, self.num_dilated, self.dilation = combine, num_dilated, dilation
    self.stats = {}

  def bn(self, y, name):
    p, r = self.params[name], self.running[name]
    if self.train:
      axes = tuple(range(y.ndim - 1))
      count = int(np.prod(y.shape[:-1]))
      mean, var = y.mean(axis=axes), y.var(axis=axes)
      self.stats[name] = {
          "mean": (1 - MOMENTUM) * r["mean"] + MOMENTUM * mean,
          "var": (1 - MOMENTUM) * r["var"] + MOMENTUM * var * count / (count - 1)}
    else:
      mean, var = r["mean"], r["var"]
    return (y - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]

  def dense(self, y, name):
    return y @ self.params[name]["kernel"] + self.params[name]["bias"]

  def channel(self, x):
    y = self.dense(x.mean(axis=(1, 2)), "gate_c_fc_0")
    if self.mlp_norm:
      y = self.bn(y, "gate_c_bn_1")
    y = self.dense(np.maximum(y, 0.0), "gate_c_fc_final")
    if self.branch_norm:
      y = self.bn(y, "gate_c_bn_final")
    return y[:, None, None, :]

  def conv(self, y, name, dilation=1):
    p = self.params[name]
    return _dilated_conv(y, p["kernel"], p["bias"], dilation)

  def spatial(self, x):
    y = np.maximum(self.bn(self.conv(x, "gate_s_conv_reduce0"), "gate_s_bn_reduce0"), 0.0)
    for i in range(self.num_dilated):
      y = self.conv(y, f"gate_s_conv_di_{i}", self.dilation)
      y = np.maximum(self.bn(y, f"gate_s_bn_di_{i}"), 0.0)
    y = self.conv(y, "gate_s_conv_final")
    if self.branch_norm:
      y = self.bn(y, "gate_s_bn_final")
    return y

  def __call__(self, x):
    x = np.asarray(x, np.float64)
    mc, ms = self.channel(x), self.spatial(x)
    logits = {"sum": mc + ms, "product": mc * ms, "max": np.maximum(mc, ms)}[self.combine]
    mask = 1.0 / (1.0 + np.exp(-logits))
    return (1.0 + mask) * x, mask, mc, ms


def _setup(fields, shape=(2, 11, 9, 64), seed=0):
  layer = BAM(**fields)
  x = jnp.asarray(_images(shape, seed))
  variables = _randomise(layer.init(jax.random.PRNGKey(0), x), seed + 1)
  return layer, x, variables


CONFIGS = [
    {},                                                 # the paper's equations
    {"branch_norm": False, "combine": "product"},       # the authors' released code
    {"mlp_norm": False},                                # Eq. 2 exactly: no BN in the MLP
    {"combine": "max", "num_dilated": 1, "dilation": 2},
    {"num_dilated": 3, "dilation": 1, "rd_channels": 3},
]


@pytest.mark.parametrize("fields", CONFIGS)
def test_eval_mode_matches_the_hand_computation(fields):
  layer, x, variables = _setup(fields)
  ref_fields = {k: v for k, v in fields.items() if k != "rd_channels"}
  want, mask, mc, ms = _Reference(variables, train=False, **ref_fields)(np.asarray(x))
  with jax.default_matmul_precision("highest"):
    y, state = layer.apply(variables, x, mutable=["intermediates"])
  np.testing.assert_allclose(np.asarray(y), want, rtol=TOL, atol=TOL * np.abs(want).max())
  sown = state["intermediates"]
  np.testing.assert_allclose(np.asarray(sown["bam_mask"][0]), mask, atol=TOL)
  np.testing.assert_allclose(np.asarray(sown["bam_channel"][0]), mc, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(np.asarray(sown["bam_spatial"][0]), ms, rtol=TOL, atol=TOL)
  assert sown["bam_mask"][0].shape == x.shape
  # The mask differs across channels and positions (a 3D mask, not a product of 1D ones).
  assert float(np.std(mask, axis=-1).max()) > 1e-3 and float(np.std(mask, axis=(1, 2)).max()) > 1e-3


@pytest.mark.parametrize("fields", CONFIGS[:3])
def test_train_mode_matches_and_updates_running_stats_as_pytorch(fields):
  layer, x, variables = _setup(fields, shape=(4, 11, 9, 64))
  ref = _Reference(variables, train=True, **fields)
  want = ref(np.asarray(x))[0]
  with jax.default_matmul_precision("highest"):
    y, state = layer.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(y), want, rtol=TOL, atol=TOL * np.abs(want).max())
  stats = jax.tree.map(np.asarray, state["batch_stats"])
  assert set(stats) == set(ref.stats)
  for name, expected in ref.stats.items():
    for key in ("mean", "var"):
      np.testing.assert_allclose(stats[name][key], expected[key], rtol=TOL, atol=TOL,
                                 err_msg=f"{name}/{key}")
  # Every BN of the configuration was updated: reduce, 2 dilated, and the optional ones.
  assert len(stats) == 3 + fields.get("mlp_norm", True) + 2 * fields.get("branch_norm", True)


def test_widths_and_parameter_count():
  x = jnp.zeros((1, 9, 9, 256))
  params = jax.eval_shape(BAM().init, jax.random.PRNGKey(0), x)["params"]
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes["gate_c_fc_0"]["kernel"] == (256, 16)
  assert shapes["gate_c_fc_final"]["kernel"] == (16, 256)
  assert shapes["gate_s_conv_reduce0"]["kernel"] == (1, 1, 256, 16)
  assert shapes["gate_s_conv_di_0"]["kernel"] == (3, 3, 16, 16)
  assert shapes["gate_s_conv_final"]["kernel"] == (1, 1, 16, 1)
  # Channel: 256*16 + 16 + 2*16 (BN) + 16*256 + 256 = 8,496; spatial: 256*16 + 16 + 32
  # (BN) + 2 * (9*16*16 + 16 + 32) + 16 + 1 = 8,865; the paper's two BNs: 2*256 + 2.
  assert count_params(params) == 8_496 + 8_865 + 514 == 17_875
  released = jax.eval_shape(BAM(branch_norm=False).init, jax.random.PRNGKey(0), x)
  assert count_params(released) == 17_361


def test_fields_and_registry():
  layer = create_attention("bam")
  assert isinstance(layer, BAM)
  assert (layer.rd_ratio, layer.dilation, layer.num_dilated, layer.combine) == (
      1 / 16, 4, 2, "sum")
  assert BAM.maps["bam_mask"] == "residual_mask"
  x = jnp.zeros((1, 6, 6, 16))
  for fields, match in (({"combine": "mean"}, "combine"), ({"dilation": 0}, "dilation"),
                        ({"num_dilated": -1}, "num_dilated")):
    with pytest.raises(ValueError, match=match):
      BAM(**fields).init(jax.random.PRNGKey(0), x)


def test_plain_conv_gives_the_same_values():
  layer, x, variables = _setup({})
  with jax.default_matmul_precision("highest"):
    fast = layer.apply(variables, x)
    plain = layer.clone(conv=nn.Conv).apply(variables, x)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(plain), rtol=1e-6, atol=1e-5)
