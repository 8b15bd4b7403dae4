"""Selective Kernel (Li et al. 2019): branch derivation, widths and parity with timm 1.0.31's
``SelectiveKernel`` (random weights, perturbed batch norms, eval and train mode, the
running statistics of every batch norm after one train-mode forward, the branch weights).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
timm_layers = pytest.importorskip("timm.layers")

from attention_flax.layers import SelectiveKernel, create_attention  # noqa: E402
from attention_flax.layers.selective import branch_kernels, conv_padding  # noqa: E402
from tests.layers.test_parity import (  # noqa: E402
    _apply, _convert, _images, _nhwc, _randomise_norms)

TOL = 1e-5
# The "rbg" generator compiles in a fraction of threefry's time.
KEY = jax.random.key(0, impl="rbg")


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, prefix + (key,))
    else:
      yield prefix + (key,), np.asarray(value)


def _torch_key(path) -> str:
  """('paths_0', 'bn', 'mean') -> 'paths.0.bn.running_mean' (independent of convert.py)."""
  names = [p.replace("paths_", "paths.") for p in path[:-1]]
  return ".".join(names + ["running_" + path[-1]])


def _settle_attention_means(ref, x_t, seed):
  """Running means of the attention's batch norm near its train-mode batch means.

  That norm sees N values per channel (pooled vectors). A random running mean far from so
  small a batch makes the one-pass statistics of TorchBatchNorm (shifted by the running
  mean) lose float32 digits; once training has run the two are close. The other norms
  keep random statistics.
  """
  seen = []
  probe = copy.deepcopy(ref).train()
  probe.attn.bn.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
  with torch.no_grad():
    probe(x_t)
    z = seen[0][:, :, 0, 0]
    noise = torch.randn(z.shape[1], generator=torch.Generator().manual_seed(seed))
    ref.attn.bn.running_mean.copy_(z.mean(0) + 0.5 * z.std(0) * noise)


def test_branch_kernels_follow_timm():
  assert branch_kernels() == ((3, 3), (1, 2))  # 3x3 and 5x5 as a dilated 3x3
  assert branch_kernels(5) == ((3, 3), (2, 2))
  assert branch_kernels((3, 5, 7), dilation=2) == ((3, 3, 3), (2, 4, 6))
  assert branch_kernels((3, 5), keep_3x3=False) == ((3, 5), (1, 1))
  with pytest.raises(ValueError, match="odd"):
    branch_kernels((3, 4))
  # timm's get_padding: ((stride - 1) + dilation * (k - 1)) // 2.
  assert conv_padding(3, 2, 2) == [(2, 2), (2, 2)]
  assert conv_padding(5, 2, 1) == [(2, 2), (2, 2)]


# (timm kwargs, our fields, NCHW input)
CONFIGS = {
    "default": ({"in_channels": 32}, {}, (4, 32, 7, 6)),
    "wide_strided_grouped_three_paths": (
        {"in_channels": 32, "out_channels": 48, "stride": 2, "groups": 4, "split_input": False,
         "rd_divisor": 16, "kernel_size": [3, 5, 7]},
        {"features": 48, "strides": 2, "groups": 4, "split_input": False, "rd_divisor": 16,
         "kernel_size": (3, 5, 7)}, (4, 32, 7, 6)),
    "true_kernels": ({"in_channels": 16, "keep_3x3": False, "stride": 2},
                     {"keep_3x3": False, "strides": 2}, (4, 16, 8, 9)),
}


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_selective_kernel_matches_timm(config, train):
  timm_kwargs, fields, shape = CONFIGS[config]
  torch.manual_seed(7)
  ref = timm_layers.SelectiveKernel(**timm_kwargs)
  _randomise_norms(ref)
  x_t, x = _images(shape, seed=8)
  _settle_attention_means(ref, x_t, seed=9)
  ref.train(train)
  weights = []
  ref.attn.register_forward_hook(lambda _m, _i, out: weights.append(out.detach().clone()))
  ours = SelectiveKernel(**fields)
  variables = _convert(ours, ref, x)
  old = {k: v.clone().numpy() for k, v in ref.state_dict().items()}
  out, state = _apply(ours, variables, x, train)
  with torch.no_grad():
    expected = _nhwc(ref(x_t))
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)
  sown = state["intermediates"]["attn"]["branch_weights"][0]
  paths = len(ref.paths)
  np.testing.assert_allclose(sown, weights[0].reshape(shape[0], paths, -1), atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.sum(sown, axis=1), 1.0, atol=1e-6)
  if train:
    torch_state = ref.state_dict()
    checked = 0
    for path, value in _flat(state["batch_stats"]):
      key = _torch_key(path)
      assert not np.allclose(torch_state[key].numpy(), old[key])  # the forward moved them
      np.testing.assert_allclose(value, torch_state[key].numpy(), atol=1e-6, rtol=1e-5,
                                 err_msg=key)
      checked += 1
    assert checked == 2 * (paths + 1)  # every branch norm and the attention's


def test_widths_and_parameter_tree():
  x = jnp.zeros((2, 6, 6, 32))
  params = jax.eval_shape(SelectiveKernel().init, KEY, x)["params"]
  # split input: each 3x3 branch maps 16 of the 32 channels to 32; attention 32 -> 8 -> 64.
  assert params["paths_0"]["conv"]["kernel"].shape == (3, 3, 16, 32)
  assert params["paths_1"]["conv"]["kernel"].shape == (3, 3, 16, 32)
  assert params["attn"]["fc_reduce"]["kernel"].shape == (32, 8)
  assert params["attn"]["fc_select"]["kernel"].shape == (8, 64)
  assert "bias" not in params["attn"]["fc_reduce"]
  # timm's make_divisible keeps 90% of the value: 40 / 1 rounds to 32 < 36, so 64.
  layer = SelectiveKernel(rd_ratio=1.0, rd_divisor=32, split_input=False)
  params = jax.eval_shape(layer.init, KEY, jnp.zeros((1, 4, 4, 40)))["params"]
  timm_rd = timm_layers.SelectiveKernel(40, rd_ratio=1.0, rd_divisor=32).attn.fc_reduce
  assert params["attn"]["fc_reduce"]["kernel"].shape == (40, timm_rd.out_channels) == (40, 64)


def test_registry_and_plain_conv_give_the_same_values():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 5, 16)), jnp.float32)
  layer = create_attention("sk", features=24, strides=2)
  assert isinstance(layer, SelectiveKernel)
  variables = jax.jit(layer.init)(KEY, x)
  with jax.default_matmul_precision("highest"):
    y = layer.apply(variables, x)
    plain = layer.clone(conv=nn.Conv).apply(variables, x)
  assert y.shape == (2, 3, 3, 24)
  np.testing.assert_allclose(y, plain, atol=1e-5, rtol=0)


def test_split_input_needs_a_multiple_of_the_paths():
  with pytest.raises(ValueError, match="split_input"):
    jax.eval_shape(SelectiveKernel().init, KEY, jnp.zeros((1, 4, 4, 15)))
  # Without the split any width works.
  y, _ = jax.eval_shape(SelectiveKernel(split_input=False).init_with_output, KEY,
                        jnp.ones((1, 4, 4, 15)))
  assert y.shape == (1, 4, 4, 15)
