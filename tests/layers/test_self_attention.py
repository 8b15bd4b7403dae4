"""Self-attention layers (BoTNet, HaloNet, Lambda) against timm's.

Each layer gets the weights of a randomly initialised timm layer (relative position tables
and batch-norm statistics randomised too) by the mapping its docstring states, and must
give timm's output on the same random input, in eval and train mode (train mode: also the
running statistics timm leaves), within 1e-5 at the highest matmul precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm_layers = pytest.importorskip("timm.layers")

from attention_flax.convert import convert_variables  # noqa: E402
from attention_flax.layers import create_attention  # noqa: E402
from attention_flax.layers.lambda_layer import LambdaLayer  # noqa: E402
from attention_flax.layers.self_attention import (  # noqa: E402
    BottleneckAttn, HaloAttn, rel_logits_1d)
from tests.layers.test_parity import (  # noqa: E402
    _apply, _check_running_stats, _images, _nhwc, _randomise_norms)
from timm.layers.bottleneck_attn import BottleneckAttn as TimmBottleneckAttn  # noqa: E402
from timm.layers.halo_attn import HaloAttn as TimmHaloAttn  # noqa: E402
from timm.layers.lambda_layer import LambdaLayer as TimmLambdaLayer  # noqa: E402

KEY = jax.random.PRNGKey(0)
TOL = 1e-5
TABLES = ("height_rel", "width_rel", "pos_emb")


def _randomise(ref, norm_gain=1.0) -> None:
  """Random projections, position tables and lambda conv, at a scale where the softmax is
  far from uniform (mapping mistakes then show), plus random batch-norm statistics and
  affine parameters (those scaled by ``norm_gain``, which keeps the lambda layers' outputs
  of order 1, where a float32 rounding is well below the tolerance)."""
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.split(".")[-1] in TABLES:
        p.normal_(0.0, 0.5)
      elif p.ndim > 1:
        p.normal_(0.0, 1.0 / np.sqrt(p[0].numel()) * 1.5)
      else:
        p.normal_(0.0, 0.3)
  _randomise_norms(ref)
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.mul_(norm_gain)
        m.bias.mul_(norm_gain)


def _convert(ours, ref, x):
  """Flax variables from timm's state dict by the docstrings' rule: tables copied, the
  lambda conv's trailing 1 dropped, the rest by attention_flax.convert."""
  abstract = jax.eval_shape(ours.init, KEY, x)
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  tables = {}
  params = dict(abstract["params"])
  if "pos_embed" in params:
    del params["pos_embed"]
    tables["pos_embed"] = {t: jnp.asarray(state.pop(f"pos_embed.{t}"))
                           for t in ("height_rel", "width_rel")}
  if "pos_emb" in params:
    del params["pos_emb"]
    tables["pos_emb"] = jnp.asarray(state.pop("pos_emb"))
  if "conv_lambda.weight" in state:
    state["conv_lambda.weight"] = state["conv_lambda.weight"][..., 0]
  variables = convert_variables({**abstract, "params": params}, state)
  variables["params"] = {**variables["params"], **tables}
  return variables


def _check(ours, ref, shape_nchw, train, seed):
  ref.train(train)
  x_t, x = _images(shape_nchw, seed=seed)
  variables = _convert(ours, ref, x)
  norms = {name: m for name, m in ref.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
  old = {name: {"var": m.running_var.clone().numpy()} for name, m in norms.items()}
  out, state = _apply(ours, variables, x, train)
  expected = _nhwc(ref(x_t))
  assert out.shape == expected.shape
  assert np.abs(expected).max() > 0.1  # not a vanishing output
  np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)
  if train:
    n, _, h, w = shape_nchw
    for name, m in norms.items():
      _check_running_stats(state["batch_stats"][name], old[name], m, count=n * h * w)
  return state["intermediates"]


def test_rel_logits_1d_is_the_relative_to_absolute_shift():
  q = jax.random.normal(KEY, (2, 3, 4))
  table = jax.random.normal(jax.random.PRNGKey(1), (2 * 6 - 1, 4))
  got = rel_logits_1d(q, table)
  assert got.shape == (2, 3, 6)
  for i in range(3):
    for j in range(6):
      np.testing.assert_allclose(got[:, i, j], q[:, i] @ table[5 + j - i], rtol=1e-5)


# (dim, H, W, kwargs) -- the second of each pair with stride 2 and non-default widths.
BOTTLENECK = [
    (16, 6, 5, dict(num_heads=4)),
    (12, 6, 8, dict(dim_out=24, stride=2, num_heads=2, dim_head=6, qkv_bias=True,
                    scale_pos_embed=True)),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dim,h,w,kwargs", BOTTLENECK)
def test_bottleneck_matches_timm(dim, h, w, kwargs, train):
  torch.manual_seed(1)
  ref = TimmBottleneckAttn(dim, feat_size=(h, w), **kwargs)
  _randomise(ref)
  inter = _check(BottleneckAttn(**kwargs), ref, (2, dim, h, w), train, seed=1)
  attn = np.asarray(inter["pixel_attention"][0])
  heads = kwargs["num_heads"]
  assert attn.shape == (2, heads, h, w, h, w)
  np.testing.assert_allclose(attn.sum(axis=(-2, -1)), 1.0, atol=1e-5)


def test_bottleneck_feat_size_is_checked():
  layer = BottleneckAttn()
  x = jnp.ones((1, 6, 6, 8))
  variables = layer.init(KEY, x)
  with pytest.raises(ValueError, match="init the layer on a 4x4 input"):
    layer.apply(variables, jnp.ones((1, 4, 4, 8)))
  with pytest.raises(ValueError, match=r"feat_size=\(4, 4\)"):
    BottleneckAttn(feat_size=(6, 6)).init(KEY, jnp.ones((1, 4, 4, 8)))


HALO = [
    (16, 8, 12, dict(num_heads=4, block_size=4, halo_size=1)),
    (16, 8, 8, dict(dim_out=8, stride=2, num_heads=2, block_size=4, halo_size=2,
                    qkv_bias=True, scale_pos_embed=True)),  # strided queries
    (8, 6, 9, dict(stride=2, num_heads=2, dim_head=4, block_size=3, halo_size=1)),  # avg pool
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dim,h,w,kwargs", HALO)
def test_halo_matches_timm(dim, h, w, kwargs, train):
  torch.manual_seed(2)
  ref = TimmHaloAttn(dim, **kwargs)
  _randomise(ref)
  inter = _check(HaloAttn(**kwargs), ref, (2, dim, h, w), train, seed=2)
  attn = np.asarray(inter["window_attention"][0])
  bs, halo = kwargs["block_size"], kwargs["halo_size"]
  bq = bs // 2 if kwargs.get("stride", 1) == 2 and bs % 2 == 0 else bs
  win = bs + 2 * halo
  assert attn.shape == (2, kwargs["num_heads"], h // bs, w // bs, bq, bq, win, win)
  np.testing.assert_allclose(attn.sum(axis=(-2, -1)), 1.0, atol=1e-5)


def test_halo_block_size_is_checked():
  with pytest.raises(ValueError, match="multiples of block_size=4"):
    HaloAttn(num_heads=2, block_size=4, halo_size=1).init(KEY, jnp.ones((1, 8, 6, 8)))


LAMBDA = [
    (16, 6, 7, dict(num_heads=4, dim_head=8, r=5)),
    (16, 6, 6, dict(stride=2, num_heads=2, dim_head=None, r=3)),  # make_divisible widths
    (8, 5, 4, dict(num_heads=2, dim_head=4, r=None, feat_size=(5, 4))),  # relative table
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dim,h,w,kwargs", LAMBDA)
def test_lambda_matches_timm(dim, h, w, kwargs, train):
  torch.manual_seed(3)
  ref = TimmLambdaLayer(dim, **kwargs)
  _randomise(ref, norm_gain=0.3)
  inter = _check(LambdaLayer(**kwargs), ref, (2, dim, h, w), train, seed=3)
  keys = np.asarray(inter["key_weights"][0])
  np.testing.assert_allclose(keys.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_lambda_default_r_is_timms_nine():
  torch.manual_seed(4)
  ref = TimmLambdaLayer(16)  # dim_head 16, 4 heads, r 9
  _randomise(ref, norm_gain=0.3)
  _check(LambdaLayer(), ref, (1, 16, 5, 6), False, seed=4)


def test_lambda_relative_table_size_is_checked():
  layer = LambdaLayer(num_heads=2, dim_head=4, r=None)
  variables = layer.init(KEY, jnp.ones((1, 5, 4, 8)))
  with pytest.raises(ValueError, match="init the layer on a 4x4 input"):
    layer.apply(variables, jnp.ones((1, 4, 4, 8)))


def test_registered_names_build_the_layers():
  assert isinstance(create_attention("bottleneck"), BottleneckAttn)
  assert isinstance(create_attention("halo"), HaloAttn)
  assert isinstance(create_attention("lambda"), LambdaLayer)
