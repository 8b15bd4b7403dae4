"""Module-level numerical parity with timm / PyTorch.

Each attention layer gets the weights of a randomly initialised timm module (through
``attention_flax.convert.convert_variables``, the converter the models use) and must give
the same output on the same random input (NCHW there, NHWC here); ``affine_grid`` and
``grid_sample`` must match ``torch.nn.functional`` in values and gradients. In train mode
the batch norms inside CBAM and CoordAttention (``TorchBatchNorm`` by default) must leave
the running mean and variance PyTorch leaves, and the Flax factory the layers also accept
must differ from them by exactly the n / (n - 1) of the biased variance.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
timm_layers = pytest.importorskip("timm.layers")

from attention_flax.convert import convert_variables  # noqa: E402
from attention_flax.layers.channel import ECA, EffectiveSE, SqueezeExcite  # noqa: E402
from attention_flax.layers.hybrid import CBAM, GlobalContext  # noqa: E402
from attention_flax.layers.norm import TorchBatchNorm  # noqa: E402
from attention_flax.layers.spatial import CoordAttention  # noqa: E402
from attention_flax.layers.transformer import affine_grid, grid_sample  # noqa: E402
from timm.layers.cbam import CbamModule  # noqa: E402
from timm.layers.coord_attn import CoordAttn  # noqa: E402
from timm.layers.eca import EcaModule  # noqa: E402
from timm.layers.global_context import GlobalContext as TimmGlobalContext  # noqa: E402
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule  # noqa: E402

KEY = jax.random.PRNGKey(0)
TOL = 2e-5
MOMENTUM = 0.1  # PyTorch's default; Flax's 0.9


def _randomise_norms(module) -> None:
  """Fresh norms are identity-like and hide mapping mistakes: give them random affine
  parameters and (for batch norms) running statistics."""
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 1.5)


def _images(shape_nchw, seed=0):
  """The same random batch as a torch NCHW tensor and a jax NHWC array."""
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(*shape_nchw, generator=g)
  return x, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _convert(module, torch_module, x):
  abstract = jax.eval_shape(module.init, KEY, x)
  return convert_variables(abstract, torch_module.state_dict())


def _apply(module, variables, x, train=False):
  with jax.default_matmul_precision("highest"):
    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    return module.apply(variables, x, train=train, mutable=mutable)


def _capture(torch_module):
  """Records the output of ``torch_module`` (a gate) on every forward."""
  seen = []
  torch_module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
  return seen


@pytest.mark.parametrize("channels", [64, 96])
def test_squeeze_excite_matches_timm(channels):
  torch.manual_seed(0)
  ref = SEModule(channels).eval()  # rd_ratio 1/16, divisor 8: 64 -> 8 (not 4), 96 -> 8
  gates = _capture(ref.gate)
  x_t, x = _images((2, channels, 5, 6))
  ours = SqueezeExcite()
  variables = _convert(ours, ref, x)
  assert variables["params"]["fc1"]["kernel"].shape == (channels, 8)
  out, state = _apply(ours, variables, x)
  np.testing.assert_allclose(out, _nhwc(ref(x_t)), atol=TOL, rtol=0)
  np.testing.assert_allclose(state["intermediates"]["channel_gate"][0], _nhwc(gates[0]),
                             atol=TOL, rtol=0)


def test_effective_se_matches_timm_including_saturated_gates():
  torch.manual_seed(1)
  ref = EffectiveSEModule(32).eval()
  with torch.no_grad():  # push part of the pre-activations past +-3, hard_sigmoid's knees
    ref.fc.weight.mul_(40.0)
  gates = _capture(ref.gate)
  x_t, x = _images((2, 32, 4, 5), seed=1)
  ours = EffectiveSE()
  variables = _convert(ours, ref, x)
  out, state = _apply(ours, variables, x)
  np.testing.assert_allclose(out, _nhwc(ref(x_t)), atol=TOL, rtol=0)
  gate = np.asarray(state["intermediates"]["channel_gate"][0])
  np.testing.assert_allclose(gate, _nhwc(gates[0]), atol=TOL, rtol=0)
  assert (gate == 0).any() and (gate == 1).any() and ((gate > 0) & (gate < 1)).any()


@pytest.mark.parametrize("channels, kernel", [(64, 3), (256, 5), (2048, 7)])
def test_eca_matches_timm(channels, kernel):
  torch.manual_seed(2)
  ref = EcaModule(channels).eval()
  assert ref.conv.weight.shape == (1, 1, kernel)
  x_t, x = _images((2, channels, 3, 4), seed=2)
  ours = ECA()
  variables = _convert(ours, ref, x)
  assert variables["params"]["conv"]["kernel"].shape == (kernel, 1, 1)
  out, _ = _apply(ours, variables, x)
  np.testing.assert_allclose(out, _nhwc(ref(x_t)), atol=TOL, rtol=0)


FLAX_BN = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def _check_running_stats(stats, old, torch_bn, count):
  """Our updated statistics equal PyTorch's after one train-mode forward."""
  moved_mean = torch_bn.running_mean.numpy()
  moved_var = torch_bn.running_var.numpy()
  assert not np.allclose(moved_var, old["var"], atol=1e-3, rtol=0)  # the forward moved them
  np.testing.assert_allclose(stats["mean"], moved_mean, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(stats["var"], moved_var, atol=1e-6, rtol=1e-6)
  # PyTorch folds in the unbiased batch variance: recovered from its update, the biased
  # one is what Flax's rule would have stored instead.
  unbiased = (moved_var - (1 - MOMENTUM) * old["var"]) / MOMENTUM
  biased = (1 - MOMENTUM) * old["var"] + MOMENTUM * unbiased * (count - 1) / count
  # The two rules differ by far more than the tolerance of the equality above.
  assert not np.allclose(biased, moved_var, atol=1e-5, rtol=0)
  return biased


@pytest.mark.parametrize("train", [False, True])
def test_cbam_matches_timm(train):
  torch.manual_seed(3)
  ref = CbamModule(32)  # channel MLP 32 -> 2 (divisor 1), spatial 7x7 conv + BN
  _randomise_norms(ref)
  ref.train(train)
  x_t, x = _images((2, 32, 6, 5), seed=3)
  ours = CBAM()
  variables = _convert(ours, ref, x)
  old = {"var": ref.spatial.conv.bn.running_var.clone().numpy()}
  out, state = _apply(ours, variables, x, train)
  np.testing.assert_allclose(out, _nhwc(ref(x_t)), atol=TOL, rtol=0)
  inter = state["intermediates"]
  assert inter["channel"]["channel_gate"][0].shape == (2, 1, 1, 32)
  assert inter["spatial"]["spatial_mask"][0].shape == (2, 6, 5, 1)
  if train:
    # 2 * 6 * 5 = 60 values per channel reach the spatial gate's BatchNorm.
    biased = _check_running_stats(state["batch_stats"]["spatial"]["bn"], old,
                                  ref.spatial.conv.bn, count=2 * 6 * 5)
    out_flax, state_flax = _apply(CBAM(norm=FLAX_BN), variables, x, train)
    np.testing.assert_allclose(out_flax, out, atol=1e-6, rtol=0)  # same normalisation
    np.testing.assert_allclose(state_flax["batch_stats"]["spatial"]["bn"]["var"], biased,
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fuse", ["scale", "both"])
def test_global_context_matches_timm(fuse):
  torch.manual_seed(4)
  ref = TimmGlobalContext(32, fuse_add=fuse == "both", fuse_scale=True).eval()
  _randomise_norms(ref)
  if ref.mlp_add is not None:  # zero-initialised by timm: give it weights to compare
    with torch.no_grad():
      ref.mlp_add.fc2.weight.normal_(0.0, 0.3)
  x_t, x = _images((2, 32, 5, 4), seed=4)
  ours = GlobalContext(fuse=fuse)
  variables = _convert(ours, ref, x)
  assert variables["params"]["mlp_scale"]["fc1"]["kernel"].shape == (32, 4)  # rd 1/8
  out, state = _apply(ours, variables, x)
  np.testing.assert_allclose(out, _nhwc(ref(x_t)), atol=TOL, rtol=0)
  with torch.no_grad():
    scores = ref.conv_attn(x_t).reshape(2, -1).softmax(-1).reshape(2, 5, 4, 1).numpy()
  np.testing.assert_allclose(state["intermediates"]["context_weights"][0], scores,
                             atol=1e-6, rtol=0)


@pytest.mark.parametrize("train", [False, True])
def test_coord_attention_matches_timm(train):
  torch.manual_seed(5)
  ref = CoordAttn(384)  # timm: make_divisible(384 / 16 * 2 / 3, 8) = 16 hidden channels
  _randomise_norms(ref)
  ref.train(train)
  gates = _capture(ref.gate)
  x_t, x = _images((2, 384, 3, 4), seed=5)
  # timm scales rd_ratio by se_factor 2/3; our rd_ratio is the product.
  ours = CoordAttention(rd_ratio=1.0 / 16 * 2.0 / 3.0)
  variables = _convert(ours, ref, x)
  assert variables["params"]["conv1"]["kernel"].shape == (384, 16)
  old = {"var": ref.bn1.running_var.clone().numpy()}
  out, state = _apply(ours, variables, x, train)
  np.testing.assert_allclose(out, _nhwc(ref(x_t)), atol=TOL, rtol=0)
  inter = state["intermediates"]
  # gates[0] is a_h (N, C, H, 1), gates[1] a_w (N, C, 1, W).
  np.testing.assert_allclose(inter["coord_gate_h"][0], _nhwc(gates[0]), atol=TOL, rtol=0)
  np.testing.assert_allclose(inter["coord_gate_w"][0], _nhwc(gates[1]), atol=TOL, rtol=0)
  if train:
    # Statistics over N and the H + W strip positions: 2 * (3 + 4) = 14 values, so the
    # unbiased and biased rules differ by 14 / 13.
    biased = _check_running_stats(state["batch_stats"]["bn1"], old, ref.bn1,
                                  count=2 * (3 + 4))
    flax_layer = CoordAttention(rd_ratio=1.0 / 16 * 2.0 / 3.0, norm=FLAX_BN)
    _, state_flax = _apply(flax_layer, variables, x, train)
    np.testing.assert_allclose(state_flax["batch_stats"]["bn1"]["var"], biased, atol=1e-6,
                               rtol=1e-6)


def test_torch_batch_norm_follows_pytorch_over_two_steps_then_evaluates():
  torch.manual_seed(6)
  ref = torch.nn.BatchNorm2d(3)
  _randomise_norms(ref)
  ours = TorchBatchNorm()
  x_t, x = _images((2, 3, 2, 3), seed=6)  # n = 12 values per channel: factor 12 / 11
  abstract = jax.eval_shape(lambda k, v: ours.init(k, v, use_running_average=False), KEY, x)
  variables = convert_variables(abstract, ref.state_dict())
  ref.train()
  for step in range(2):
    x_t, x = _images((2, 3, 2, 3), seed=7 + step)
    y, updates = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, _nhwc(ref(x_t)), atol=1e-5, rtol=0)
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    np.testing.assert_allclose(variables["batch_stats"]["mean"], ref.running_mean.numpy(),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(variables["batch_stats"]["var"], ref.running_var.numpy(),
                               atol=1e-6, rtol=1e-6)
  ref.eval()
  y = ours.apply(variables, x, use_running_average=True)
  np.testing.assert_allclose(y, _nhwc(ref(x_t)), atol=1e-5, rtol=0)


def test_torch_batch_norm_biased_option_is_flax_batch_norm():
  x = jax.random.normal(KEY, (2, 3, 2, 4)) * 3.0 + 1.0
  theirs = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  ours = TorchBatchNorm(unbiased_running_var=False)
  variables = theirs.init(KEY, x, use_running_average=False)
  _, expected = theirs.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  _, got = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(got["batch_stats"]["var"], expected["batch_stats"]["var"],
                             atol=1e-5, rtol=1e-5)
  _, unbiased = TorchBatchNorm().apply(variables, x, use_running_average=False,
                                       mutable=["batch_stats"])
  # 0.9 * 1 + 0.1 * v * 12 / 11 against 0.9 * 1 + 0.1 * v: differ by 0.1 * v / 11.
  np.testing.assert_allclose(unbiased["batch_stats"]["var"] - 0.9,
                             (got["batch_stats"]["var"] - 0.9) * 12 / 11, rtol=1e-5)
  with pytest.raises(ValueError, match="x\\[None\\]"):
    ours.apply(variables, jnp.ones((4,)), use_running_average=False, mutable=["batch_stats"])


# ---- the spatial-transformer sampler ------------------------------------------------------

F = torch.nn.functional


def _random_theta(seed):
  g = torch.Generator().manual_seed(seed)
  # Around the identity, with enough scale and shift to reach past the image's edges.
  return torch.eye(2, 3).expand(2, 2, 3) + 0.6 * torch.randn(2, 2, 3, generator=g)


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid_matches_torch(align_corners):
  theta = _random_theta(10)
  ref = F.affine_grid(theta, (2, 3, 5, 7), align_corners=align_corners)
  with jax.default_matmul_precision("highest"):
    ours = affine_grid(jnp.asarray(theta.numpy()), (2, 5, 7), align_corners=align_corners)
  np.testing.assert_allclose(ours, ref.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid_gradient_matches_torch(align_corners):
  theta_t = _random_theta(14).requires_grad_(True)
  weights_t = torch.randn(2, 5, 7, 2, generator=torch.Generator().manual_seed(15))
  loss = (F.affine_grid(theta_t, (2, 3, 5, 7), align_corners=align_corners) * weights_t).sum()
  (dtheta_t,) = torch.autograd.grad(loss, (theta_t,))
  weights = jnp.asarray(weights_t.numpy())

  def our_loss(theta):
    return jnp.sum(affine_grid(theta, (2, 5, 7), align_corners=align_corners) * weights)

  with jax.default_matmul_precision("highest"):
    dtheta = jax.grad(our_loss)(jnp.asarray(theta_t.detach().numpy()))
  np.testing.assert_allclose(dtheta, dtheta_t.numpy(), atol=1e-5, rtol=1e-5)
  assert np.abs(dtheta_t.numpy()).min() > 1e-3  # every entry of theta gets a gradient


def _sampler_case(seed, channels=3):
  """Images (2, 5, 6, channels) and a (2, 4, 7) grid in [-1.6, 1.6]: about a third of the
  points fall outside the image, where the padding modes differ."""
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(2, channels, 5, 6, generator=g)
  grid = 3.2 * torch.rand(2, 4, 7, 2, generator=g) - 1.6
  return x, grid


@pytest.mark.parametrize(
    "mode, padding_mode, align_corners",
    list(itertools.product(["bilinear", "nearest"], ["zeros", "border", "reflection"],
                           [False, True])))
@pytest.mark.parametrize("channels", [1, 3])  # one channel takes its own path on CPU
def test_grid_sample_values_match_torch(mode, padding_mode, align_corners, channels):
  x_t, grid_t = _sampler_case(11, channels)
  assert ((grid_t.abs() > 1).any(-1)).float().mean() > 0.2
  ref = F.grid_sample(x_t, grid_t, mode=mode, padding_mode=padding_mode,
                      align_corners=align_corners)
  ours = grid_sample(jnp.asarray(x_t.numpy().transpose(0, 2, 3, 1)), jnp.asarray(grid_t.numpy()),
                     mode=mode, padding_mode=padding_mode, align_corners=align_corners)
  np.testing.assert_allclose(ours, _nhwc(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding_mode, align_corners",
                         list(itertools.product(["zeros", "border"], [False, True])))
@pytest.mark.parametrize("channels", [1, 3])
def test_grid_sample_far_points_match_torch(padding_mode, align_corners, channels):
  # Coordinates of +-1e10 (far beyond int32 once in pixels) beside points just outside the
  # border: zeros padding reads nothing for them, border padding clamps them. (Reflection
  # of 1e10 in float32 is rounding noise in both libraries, so it is not compared.)
  x_t = torch.randn(1, channels, 4, 5, generator=torch.Generator().manual_seed(21))
  grid_t = torch.tensor([[[[1e10, 0.0], [-1e10, 0.3], [0.5, 1e10], [0.1, -3e9], [0.2, 0.3],
                           [1.1, -1.05], [-1.2, 1.3]]]])
  x_t.requires_grad_(True)
  grid_t.requires_grad_(True)
  ref = F.grid_sample(x_t, grid_t, padding_mode=padding_mode, align_corners=align_corners)
  dx_t, dgrid_t = torch.autograd.grad(ref.sum(), (x_t, grid_t))

  def ours(x, grid):
    return grid_sample(x, grid, padding_mode=padding_mode, align_corners=align_corners)

  x = jnp.asarray(x_t.detach().numpy().transpose(0, 2, 3, 1))
  grid = jnp.asarray(grid_t.detach().numpy())
  out = jax.jit(ours)(x, grid)
  dx, dgrid = jax.jit(jax.grad(lambda a, b: jnp.sum(ours(a, b)), argnums=(0, 1)))(x, grid)
  np.testing.assert_allclose(out, _nhwc(ref.detach()), atol=1e-5, rtol=0)
  np.testing.assert_allclose(dx, _nhwc(dx_t), atol=1e-5, rtol=0)
  np.testing.assert_allclose(dgrid, dgrid_t.numpy(), atol=1e-4, rtol=0)
  if padding_mode == "border":
    assert np.abs(np.asarray(out)[0, 0, :4]).min() > 0  # far points read the border


@pytest.mark.parametrize(
    "mode, padding_mode, align_corners",
    list(itertools.product(["bilinear", "nearest"], ["zeros", "border", "reflection"],
                           [False, True])))
@pytest.mark.parametrize("channels", [1, 3])
def test_grid_sample_gradients_match_torch(mode, padding_mode, align_corners, channels):
  x_t, grid_t = _sampler_case(12, channels)
  x_t.requires_grad_(True)
  grid_t.requires_grad_(True)
  weights_t = torch.randn(2, channels, 4, 7, generator=torch.Generator().manual_seed(13))
  loss = (F.grid_sample(x_t, grid_t, mode=mode, padding_mode=padding_mode,
                        align_corners=align_corners) * weights_t).sum()
  dx_t, dgrid_t = torch.autograd.grad(loss, (x_t, grid_t))

  weights = jnp.asarray(weights_t.numpy().transpose(0, 2, 3, 1))

  def our_loss(x, grid):
    out = grid_sample(x, grid, mode=mode, padding_mode=padding_mode,
                      align_corners=align_corners)
    return jnp.sum(out * weights)

  dx, dgrid = jax.grad(our_loss, argnums=(0, 1))(
      jnp.asarray(x_t.detach().numpy().transpose(0, 2, 3, 1)),
      jnp.asarray(grid_t.detach().numpy()))
  np.testing.assert_allclose(dx, _nhwc(dx_t), atol=1e-5, rtol=0)
  assert np.abs(dx_t.numpy()).max() > 0.1  # the sampled pixels receive gradient
  np.testing.assert_allclose(dgrid, dgrid_t.numpy(), atol=1e-4, rtol=0)
  if mode == "bilinear":
    assert np.abs(dgrid_t.numpy()).max() > 0.1  # the grid gradient is not trivially zero
  else:
    # Nearest sampling is piecewise constant in the grid: PyTorch's grid gradient is 0.
    assert not np.abs(dgrid_t.numpy()).any()
