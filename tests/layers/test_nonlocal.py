"""Parity of ``NonLocal`` ("nl") and ``BilinearAttnTransform`` ("bat") with timm 1.0.31.

Each layer gets the weights of timm's ``NonLocalAttn`` / ``BatNonLocalAttn`` (random
weights and biases, perturbed batch-norm parameters and running statistics) through
``attention_flax.convert.convert_variables``; outputs on the same random non-square batch
(NCHW there, NHWC here) must agree to 1e-5 in float32 at the highest matmul precision, for
two channel counts, in eval and in train mode, where every updated running mean and
variance must equal PyTorch's. The sown maps are checked against the values timm
computes inside its forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm.layers")

from attention_flax.layers import (  # noqa: E402
    BilinearAttnTransform, NonLocal, create_attention, list_attentions)
from tests.layers.test_parity import (  # noqa: E402
    _apply, _check_running_stats, _convert, _images, _nhwc, _randomise_norms)
from timm.layers.non_local_attn import BatNonLocalAttn, NonLocalAttn  # noqa: E402

TOL = 1e-5


def _randomised(factory, seed: int):
  """``factory()`` built under ``seed``, with random norms (running means ~ N(0, 0.2),
  variances ~ U(0.5, 1.5)) and values in its zero-initialised parameters."""
  torch.manual_seed(seed)
  ref = factory()
  _randomise_norms(ref)
  with torch.no_grad():
    for p in ref.parameters():
      if not p.any():
        p.normal_(0.0, 0.3)
  return ref


def _warm_statistics(ref, x_t) -> None:
  """Running statistics of a trained network: each batch norm's batch mean on ``x_t``
  plus N(0, 0.02) and its batch variance times U(0.5, 1.5) (one train-mode forward with
  momentum 1, then perturbed); momenta restored."""
  norms = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  was_training = ref.training
  with torch.no_grad():
    for m in norms:
      m.momentum = 1.0
    ref.train()(x_t)
    for m in norms:
      m.momentum = 0.1
      m.running_mean.add_(0.02 * torch.randn_like(m.running_mean))
      m.running_var.mul_(torch.rand_like(m.running_var) + 0.5)
  ref.train(was_training)


def _float64(ref, x_t):
  """timm's output in float64 (the module is converted in place): the reference against
  which float32 rounding is judged, since timm's own float32 sums of H * W terms drift by
  about 1e-5 at these output scales."""
  ref.double()
  return _nhwc(ref(x_t.double()))


def _torch_stats(ref) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in ref.state_dict().items()
          if k.endswith(("running_mean", "running_var"))}


def _check_all_running_stats(batch_stats, ref) -> None:
  """Every Flax batch statistic equals the timm buffer of the same name."""
  torch_stats = _torch_stats(ref)
  seen = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch_stats)[0]:
    names = [k.key for k in path]
    key = ".".join(names[:-1]) + {"mean": ".running_mean", "var": ".running_var"}[names[-1]]
    np.testing.assert_allclose(leaf, torch_stats[key], atol=1e-6, rtol=1e-6)
    seen.add(key)
  assert seen == set(torch_stats)


# ---- NonLocal ("nl") ------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("channels, inner", [(16, 8), (96, 16)])
def test_nonlocal_matches_timm(channels, inner, train):
  ref = _randomised(lambda: NonLocalAttn(channels), seed=40 + channels)
  ref.train(train)
  x_t, x = _images((2, channels, 5, 7), seed=41)
  ours = create_attention("nl")
  variables = _convert(ours, ref, x)
  assert variables["params"]["t"]["kernel"].shape == (1, 1, channels, inner)
  assert variables["params"]["z"]["kernel"].shape == (1, 1, inner, channels)
  old = {"var": ref.norm.running_var.clone().numpy()}
  with torch.no_grad():  # timm's attention weights, recomputed from its own layers
    t = ref.t(x_t).flatten(2).transpose(1, 2)
    p = ref.p(x_t).flatten(2)
    weights = torch.softmax(torch.bmm(t, p) * channels ** -0.5, dim=2).numpy()
  out, state = _apply(ours, variables, x, train)
  np.testing.assert_allclose(out, _float64(ref, x_t), atol=TOL, rtol=0)
  sown = state["intermediates"]["nl_attention"][0]
  assert sown.shape == (2, 35, 35)
  np.testing.assert_allclose(sown, weights, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(sown).sum(-1), 1.0, atol=1e-6)
  if train:  # 2 * 5 * 7 = 70 values per channel reach the BatchNorm
    _check_running_stats(state["batch_stats"]["norm"], old, ref.norm, count=2 * 5 * 7)
    _check_all_running_stats(state["batch_stats"], ref)
  else:
    assert "batch_stats" not in state


def test_nonlocal_without_scale_and_explicit_width_match_timm():
  ref = _randomised(lambda: NonLocalAttn(24, use_scale=False, rd_channels=4), seed=42).eval()
  # Unscaled scores of unit-variance inputs reach 100, where any float32 softmax is 2e-5
  # off (timm's own too); inputs of a quarter the scale keep them near 6.
  x_t, x = _images((2, 24, 6, 3), seed=43)
  x_t, x = 0.25 * x_t, 0.25 * x
  ours = NonLocal(use_scale=False, rd_channels=4)
  variables = _convert(ours, ref, x)
  out, _ = _apply(ours, variables, x)
  np.testing.assert_allclose(out, _float64(ref, x_t), atol=TOL, rtol=0)


def test_fresh_nonlocal_is_the_identity_as_in_timm():
  """timm zero-initialises the BatchNorm's scale and bias; so do we."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 6, 16))
  layer = NonLocal()
  variables = layer.init(jax.random.PRNGKey(0), x)
  params = variables["params"]
  assert not np.asarray(params["norm"]["scale"]).any()
  assert not np.asarray(params["norm"]["bias"]).any()
  for name in ("t", "p", "g", "z"):
    assert not np.asarray(params[name]["bias"]).any()
  np.testing.assert_array_equal(layer.apply(variables, x), x)


# ---- BilinearAttnTransform ("bat") ----------------------------------------------------------


def _bat_transforms(ref, x_t):
  """timm's normalised p and q (N, groups, b, b), recomputed from its own layers."""
  ba, b = ref.ba, ref.ba.block_size
  with torch.no_grad():
    out = ba.conv1(ref.conv1(x_t))
    n = out.shape[0]
    rows = torch.nn.functional.adaptive_max_pool2d(out, (b, 1))
    cols = torch.nn.functional.adaptive_max_pool2d(out, (1, b))
    p = ba.conv_p(rows).view(n, ba.groups, b, b).sigmoid()
    q = ba.conv_q(cols).view(n, ba.groups, b, b).sigmoid()
    return (p / p.sum(dim=3, keepdim=True)).numpy(), (q / q.sum(dim=2, keepdim=True)).numpy()


# In training, TorchBatchNorm computes the batch variance in one pass shifted by the running
# mean, E[(x - s)^2] - E[x - s]^2; its float32 rounding grows with
# ((batch mean - s) / batch std)^2. The block transform averages rectified maps, so BAT's
# inner batch norms see channels with means up to 0.4 and stds of 0.03 - 0.08: running
# means drawn at N(0, 0.2) put that ratio near 100 and the output 1e-4 off PyTorch's
# (two-pass) result. The strict train-mode check therefore starts from the statistics of a
# trained network (_warm_statistics: batch means + N(0, 0.02)); the far running means are
# kept as a strict xfail below.
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("channels, inner, hw", [(32, 8, (14, 21)), (64, 16, (7, 14))])
def test_bat_matches_timm(channels, inner, hw, train, warm=None):
  # Dropout2d draws its own masks in PyTorch; parity in train mode is checked without it
  # (test_bat_channel_dropout checks the dropout itself).
  drop = 0.0 if train else 0.2
  ref = _randomised(lambda: BatNonLocalAttn(channels, drop_rate=drop), seed=44 + channels)
  x_t, x = _images((2, channels) + hw, seed=45)
  if train if warm is None else warm:
    _warm_statistics(ref, x_t)
  ref.train(train)
  p_ref, q_ref = _bat_transforms(ref, x_t) if not train else (None, None)
  ours = create_attention("bat", drop_rate=drop)
  variables = _convert(ours, ref, x)
  params = variables["params"]
  assert params["conv1"]["conv"]["kernel"].shape == (1, 1, channels, inner)
  assert params["ba"]["conv1"]["conv"]["kernel"].shape == (1, 1, inner, 2)
  assert params["ba"]["conv_p"]["kernel"].shape == (7, 1, 2, 7 * 7 * 2)
  assert params["ba"]["conv_q"]["kernel"].shape == (1, 7, 2, 7 * 7 * 2)
  old = {"var": ref.ba.conv1.bn.running_var.clone().numpy()}
  out, state = _apply(ours, variables, x, train)
  np.testing.assert_allclose(out, _float64(ref, x_t), atol=TOL, rtol=0)
  sown = np.asarray(state["intermediates"]["bat_transforms"][0])
  assert sown.shape == (2, 2, 2, 7, 7)
  np.testing.assert_allclose(sown.sum(-1), 1.0, atol=1e-6)
  if train:
    _check_running_stats(state["batch_stats"]["ba"]["conv1"]["bn"], old, ref.ba.conv1.bn,
                         count=2 * hw[0] * hw[1])
    _check_all_running_stats(state["batch_stats"], ref)
  else:
    np.testing.assert_allclose(sown[:, :, 0], p_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(sown[:, :, 1], np.swapaxes(q_ref, -1, -2), atol=TOL, rtol=0)
    assert "batch_stats" not in state


@pytest.mark.xfail(strict=True, reason="TorchBatchNorm's one-pass variance, shifted by a "
                   "running mean far from the batch mean, loses ~1e-4 (see above)")
def test_bat_train_mode_with_far_running_means():
  test_bat_matches_timm(64, 16, (7, 14), True, warm=False)


def test_bat_other_block_size_and_groups_match_timm():
  ref = _randomised(lambda: BatNonLocalAttn(48, block_size=3, groups=4, rd_channels=8),
                    seed=46).eval()
  x_t, x = _images((2, 48, 9, 6), seed=47)
  ours = BilinearAttnTransform(block_size=3, groups=4, rd_channels=8)
  variables = _convert(ours, ref, x)
  out, _ = _apply(ours, variables, x)
  np.testing.assert_allclose(out, _float64(ref, x_t), atol=TOL, rtol=0)


def test_bat_channel_dropout():
  """Training zeroes whole channels of the branch per image and scales the rest by
  1 / (1 - rate), as PyTorch's Dropout2d; evaluation never drops."""
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 7, 32))
  layer = BilinearAttnTransform(drop_rate=0.5)
  variables = layer.init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)
  with jax.default_matmul_precision("highest"):
    kept, _ = BilinearAttnTransform(drop_rate=0.0).apply(
        variables, x, train=True, mutable=["batch_stats"])
    dropped, _ = layer.apply(variables, x, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.PRNGKey(5)})
  branch, branch_dropped = np.asarray(kept - x), np.asarray(dropped - x)
  zero = np.all(np.abs(branch_dropped) < 1e-6, axis=(1, 2))  # (N, C)
  assert zero.any() and (~zero).any()
  np.testing.assert_allclose(branch_dropped, 2.0 * branch * (~zero)[:, None, None, :],
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(layer.apply(variables, x),
                                BilinearAttnTransform(drop_rate=0.0).apply(variables, x))
  with pytest.raises(Exception, match="dropout"):
    layer.apply(variables, x, train=True, mutable=["batch_stats"])


def test_bat_needs_sizes_divisible_by_block_size():
  layer = BilinearAttnTransform()
  with pytest.raises(ValueError, match="multiples of 7"):
    layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 14, 10, 32)))
  with pytest.raises(ValueError, match="groups"):
    BilinearAttnTransform(groups=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 7, 32)))


def test_registered():
  assert {"nl", "bat"} <= set(list_attentions())
  assert isinstance(create_attention("nl"), NonLocal)
  assert isinstance(create_attention("bat"), BilinearAttnTransform)
