"""ResNet family: published parameter counts, hand-checked padding and shortcuts, the
attention slot, and forward passes of the tiny test variants."""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn
from flax import traverse_util

from attention_flax import ops
from attention_flax.layers.channel import SqueezeExcite
from attention_flax.layers.norm import TorchBatchNorm
from attention_flax.models import count_params, create_model, list_models, model_info
from attention_flax.models.common import plain_tail
from attention_flax.models.resnet import (
    BasicBlock, Bottleneck, ResNet, avg_pool_2x2_ceil, cifar_resnet, max_pool_3x3_s2)

EPS = 1e-5  # batch-norm epsilon: eval-mode BN with fresh statistics divides by sqrt(1 + eps)

# timm 1.0.31, 1000 classes.
TIMM_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808, "resnet50d": 25_576_264,
    "seresnet18": 11_779_624, "seresnet34": 21_960_416, "seresnet50": 28_088_024,
    "seresnet101": 49_326_872, "seresnet152": 66_821_848, "ecaresnet50d": 25_576_350,
    "cbam_resnet50": 28_073_576, "cbam_resnet18": 11_777_352,
}
# He et al. 2016, Table 6 (CIFAR-10), in millions.
PAPER_CIFAR_PARAMS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}


# The "rbg" generator compiles in a fraction of threefry's time; inits here are jitted
# because eager flax runs op by op, both of which matter on a small shared CPU.
KEY = jax.random.key(0, impl="rbg")


def images(shape, seed: int = 0, low: float | None = None) -> jax.Array:
  """Test inputs from numpy (no PRNG program to compile): normal, or uniform above low."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) if low is None else rng.uniform(low, low + 1.0, size=shape)
  return jnp.asarray(x, jnp.float32)


@functools.lru_cache(maxsize=None)
def abstract_variables(name: str, num_classes: int = 1000, size: int = 64, **overrides):
  """Shapes of a registered model's variables (no compute; counts do not depend on size)."""
  model = create_model(name, num_classes=num_classes, **overrides)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(model.init, KEY, x)


def init(module: nn.Module, x: jax.Array):
  return jax.jit(module.init)(KEY, x)


def apply(module: nn.Module, variables, x: jax.Array, **kwargs):
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, x)


class Tiny(NamedTuple):
  model: nn.Module
  variables: dict
  x: jax.Array
  logits_jit: jax.Array
  logits_eager: jax.Array


@functools.lru_cache(maxsize=None)
def tiny(name: str) -> Tiny:
  """A tiny test variant with 5 classes, its variables, a batch of 2 and both logits.

  zero_init_last=False so that every residual branch (and its attention) contributes.
  """
  entry = model_info(name)
  model = entry.factory(num_classes=5, zero_init_last=False)
  x = images((2, entry.input_size, entry.input_size, entry.in_channels), seed=len(name))
  variables = init(model, x)
  with jax.disable_jit():
    eager = model.apply(variables, x)
  return Tiny(model, variables, x, jax.jit(model.apply)(variables, x), eager)


def module_paths(params) -> set[str]:
  return {"/".join(path[:-1]) for path in traverse_util.flatten_dict(params)}


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_param_count_matches_timm(name):
  assert count_params(abstract_variables(name)) == TIMM_PARAMS[name]


def he_cifar_params(n: int, num_classes: int = 10, option_b: bool = False) -> int:
  """Closed form: stem conv 3*16*9 + BN 2*16; each block two 3x3 convs + two BNs; option B
  adds a 1x1 conv + BN where the width doubles; fc 64*classes + classes."""
  total, c_in = 3 * 16 * 9 + 2 * 16, 16
  for c in (16, 32, 64):
    for _ in range(n):
      total += 9 * c_in * c + 9 * c * c + 4 * c
      if option_b and c_in != c:
        total += c_in * c + 2 * c
      c_in = c
  return total + 64 * num_classes + num_classes


def test_resnet20_option_a_by_hand():
  # 432 + 32 (stem) + 3 * 4672 (stage 1) + 13952 + 2 * 18560 (stage 2)
  # + 55552 + 2 * 73984 (stage 3) + 650 (fc) = 269,722: option A adds no parameters.
  assert he_cifar_params(3) == 269_722
  variables = abstract_variables("resnet20", num_classes=10, size=32)
  assert count_params(variables) == 269_722
  assert not any("downsample" in p for p in module_paths(variables["params"]))


def test_resnet20_option_b_adds_two_projections():
  # 16*32 + 2*32 + 32*64 + 2*64 = 2,752 more than option A.
  variables = abstract_variables("resnet20", num_classes=10, size=32, down="conv")
  assert count_params(variables) == he_cifar_params(3, option_b=True) == 272_474


@pytest.mark.parametrize("depth", sorted(PAPER_CIFAR_PARAMS))
def test_cifar_param_counts_match_table6(depth):
  count = count_params(abstract_variables(f"resnet{depth}", num_classes=10, size=32))
  assert count == he_cifar_params((depth - 2) // 6)
  assert abs(count / 1e6 - PAPER_CIFAR_PARAMS[depth]) <= 0.02 * PAPER_CIFAR_PARAMS[depth]


def test_timm_state_dict_names_resnet18():
  """Flax names are timm's module names with "." -> "_"."""
  expected = {"conv1", "bn1", "fc"}
  for stage in range(1, 5):
    for block in range(2):
      prefix = f"layer{stage}_{block}"
      expected |= {f"{prefix}/{m}" for m in ("conv1", "bn1", "conv2", "bn2")}
      if stage > 1 and block == 0:
        expected |= {f"{prefix}/downsample_0", f"{prefix}/downsample_1"}
  assert module_paths(abstract_variables("resnet18")["params"]) == expected


def test_resnet50d_stem_and_avg_down_names():
  params = abstract_variables("resnet50d")["params"]
  paths = module_paths(params)
  assert {"conv1_0", "conv1_1", "conv1_3", "conv1_4", "conv1_6", "bn1"} <= paths
  assert params["conv1_0"]["kernel"].shape == (3, 3, 3, 32)
  assert params["conv1_6"]["kernel"].shape == (3, 3, 32, 64)
  # Index 0 of timm's downsample is the (parameter-free) pool.
  assert params["layer1_0"]["downsample_1"]["kernel"].shape == (1, 1, 64, 256)
  assert params["layer2_0"]["downsample_2"]["scale"].shape == (512,)
  assert not any("downsample_0" in p for p in paths)


@pytest.mark.parametrize("name", ["resnet50", "resnet50d"])
def test_resnet50_stage_sizes_at_224(name):
  model = create_model(name)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = abstract_variables(name)
  logits, state = jax.eval_shape(
      lambda v, im: model.apply(v, im, mutable=["intermediates"]), variables, x)
  stages = state["intermediates"]
  assert [stages[f"stage{i}"][0].shape for i in range(1, 5)] == [
      (2, 56, 56, 256), (2, 28, 28, 512), (2, 14, 14, 1024), (2, 7, 7, 2048)]
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32


def identity_bn_block(block: nn.Module, x: jax.Array, **kernels) -> dict:
  """Initialises ``block`` and overwrites the named conv kernels."""
  variables = init(block, x)
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  for name, kernel in kernels.items():
    assert params[f"{name}/kernel"].shape == kernel.shape
    params[f"{name}/kernel"] = kernel
  return {**variables, "params": traverse_util.unflatten_dict(params, sep="/")}


def test_stride2_conv_pads_like_pytorch():
  """PyTorch pads 1 on each side: output[i] of a 3x3/2 conv sees input rows 2i-1..2i+1.

  A single 1 at (row 2, col 0) reaches only output (1, 0); Flax "SAME" (pad 0 before,
  1 after) would also light up output (0, 0).
  """
  x = jnp.zeros((1, 8, 8, 1)).at[0, 2, 0, 0].set(1.0)
  block = BasicBlock(features=1, strides=2, zero_init_last=False)
  centre = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)
  variables = identity_bn_block(block, x, conv1=jnp.ones((3, 3, 1, 1)), conv2=centre,
                                downsample_0=jnp.zeros((1, 1, 1, 1)))
  y = apply(block, variables, x)
  expected = np.zeros((1, 4, 4, 1), np.float32)
  expected[0, 1, 0, 0] = 1.0 / (1.0 + EPS)  # two eval-mode BNs, each 1 / sqrt(1 + eps)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pool", [ops.max_pool, nn.max_pool], ids=["ops", "flax"])
def test_max_pool_pads_with_minus_infinity(pool):
  # Zero padding would make every border window's max 0 on an all-negative input.
  y = max_pool_3x3_s2(pool, -jnp.ones((1, 5, 5, 2)))
  assert y.shape == (1, 3, 3, 2)
  np.testing.assert_array_equal(y, -1.0)


def avg_pool_reference(x: np.ndarray, stride: int = 2) -> np.ndarray:
  """Loops over PyTorch's ceil-mode windows, averaging only the real elements."""
  n, h, w, c = x.shape
  out_h, out_w = -(-(h - 2) // stride) + 1, -(-(w - 2) // stride) + 1
  y = np.zeros((n, out_h, out_w, c), np.float32)
  for i in range(out_h):
    for j in range(out_w):
      window = x[:, i * stride:i * stride + 2, j * stride:j * stride + 2, :]
      y[:, i, j, :] = window.sum(axis=(1, 2)) / (window.shape[1] * window.shape[2])
  return y


@pytest.mark.parametrize("size", [1, 2, 5, 7])
def test_avg_pool_ceil_mode_counts_real_elements(size):
  x = np.arange(size * size * 2, dtype=np.float32).reshape(1, size, size, 2) + 1.0
  np.testing.assert_allclose(avg_pool_2x2_ceil(jnp.asarray(x)), avg_pool_reference(x),
                             rtol=1e-6)
  if size == 7:  # The last window (row 6, col 6) holds one element: the pixel itself.
    np.testing.assert_allclose(avg_pool_2x2_ceil(jnp.asarray(x))[0, 3, 3], x[0, 6, 6])


def test_avg_pool_ceil_mode_gradient():
  # Each input element gets 1 / (size of its window) from every window that holds it.
  x = jnp.ones((1, 5, 5, 1))
  grad = jax.grad(lambda x: jnp.sum(avg_pool_2x2_ceil(x)))(x)[0, :, :, 0]
  per_axis = np.array([0.5, 0.5, 0.5, 0.5, 1.0])  # the last window of 5 holds one element
  np.testing.assert_allclose(grad, np.outer(per_axis, per_axis), rtol=1e-6)


# One tiny model per code path of the ResNet family: deep stem, average-pool shortcut and
# bottlenecks ("d"), option-A shortcut (CIFAR), and the attention layers with batch norms
# or softmax pools (the others are plain gates, differentiated in the layer tests).
TRAINABLE = ["test_resnetd_tiny", "test_resnet_cifar_tiny", "test_resnet_tiny_cbam",
             "test_resnet_tiny_coord", "test_resnet_tiny_gc"]


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_tiny_model_has_finite_nonzero_gradients(name):
  """Reverse mode through every block kind in train mode (the trainer's step differentiates
  exactly this), on the small input the model is registered for."""
  model = create_model(name, num_classes=3)
  info = model_info(name)
  x = jax.random.normal(jax.random.key(1), (2, info.input_size, info.input_size,
                                            info.in_channels))
  variables = jax.jit(functools.partial(model.init, train=False))(KEY, x)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  grads = jax.jit(jax.grad(loss))(variables["params"])
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_avg_down_shortcut_on_odd_size():
  """ResNet-D block on 7x7, stride 2: residual branch zeroed (zero_init_last), identity 1x1
  projection, so the output is relu(avg_pool(x)) scaled by the BN's 1 / sqrt(1 + eps)."""
  x = images((2, 7, 7, 3), seed=1, low=0.1)
  block = BasicBlock(features=3, strides=2, down="avg", zero_init_last=True)
  variables = identity_bn_block(block, x, downsample_1=jnp.eye(3)[None, None])
  y = apply(block, variables, x)
  assert y.shape == (2, 4, 4, 3)
  np.testing.assert_allclose(y, avg_pool_reference(np.asarray(x)) / np.sqrt(1.0 + EPS),
                             rtol=1e-5)


def test_option_a_shortcut_subsamples_and_zero_pads():
  x = images((1, 4, 4, 2), seed=2, low=0.1)
  block = BasicBlock(features=4, strides=2, down="pad", zero_init_last=True)
  variables = init(block, x)
  assert "downsample_0" not in variables["params"]
  y = apply(block, variables, x)
  expected = np.concatenate([np.asarray(x)[:, ::2, ::2, :], np.zeros((1, 2, 2, 2))], -1)
  np.testing.assert_allclose(y, expected, rtol=1e-6)


class Probe(nn.Module):
  """Stand-in attention: records its input and the train flag, adds 1."""
  dtype: object = None
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    self.sow("intermediates", "probe_input", x)
    self.sow("intermediates", "probe_train", jnp.asarray(train))
    return x + 1.0


@pytest.mark.parametrize("block_cls, features", [(BasicBlock, 8), (Bottleneck, 2)])
def test_attention_sits_after_last_bn_before_add(block_cls, features):
  """With the last BN zeroed, the attention sees exact zeros; its +1 lands before the
  residual addition and the final ReLU: out = relu(x + 1) for an identity shortcut."""
  seen = []

  def factory(**kwargs):
    seen.append(kwargs)
    return Probe(**kwargs)

  x = images((2, 4, 4, 8), seed=3)
  block = block_cls(features=features, attn=factory, dtype=jnp.float32,
                    param_dtype=jnp.float32, zero_init_last=True)
  variables = init(block, x)
  y, state = apply(block, variables, x, train=True, mutable=["intermediates", "batch_stats"])
  probe = state["intermediates"]["se"]
  np.testing.assert_array_equal(probe["probe_input"][0], 0.0)
  assert bool(probe["probe_train"][0])
  np.testing.assert_allclose(y, jax.nn.relu(x + 1.0), rtol=1e-6)
  assert seen[0] == {"name": "se", "dtype": jnp.float32, "param_dtype": jnp.float32}


def test_se_slot_sows_a_channel_gate_per_block():
  t = tiny("test_resnet_tiny_se")
  _, state = apply(t.model, t.variables, t.x, mutable=["intermediates"])
  inter = state["intermediates"]
  assert inter["layer1_0"]["se"]["channel_gate"][0].shape == (2, 1, 1, 8)
  assert inter["layer2_0"]["se"]["channel_gate"][0].shape == (2, 1, 1, 16)
  assert inter["stage1"][0].shape == (2, 8, 8, 8) and inter["stage2"][0].shape == (2, 4, 4, 16)
  gate = inter["layer2_0"]["se"]["channel_gate"][0]
  assert bool(jnp.all((gate > 0.0) & (gate < 1.0)))  # a sigmoid gate, really applied


def test_factory_equals_registry_name():
  t = tiny("test_resnet_tiny_se")  # attn="se"
  by_class = t.model.clone(attn=SqueezeExcite)
  assert (jax.tree.structure(t.variables)
          == jax.tree.structure(jax.eval_shape(by_class.init, KEY, t.x)))
  np.testing.assert_array_equal(apply(by_class, t.variables, t.x), t.logits_jit)
  # attn_kwargs reach the layer as a partial's keywords would: hidden width 3 gives
  # SE params (8*3 + 3 + 3*8 + 8) + (16*3 + 3 + 3*16 + 16) = 59 + 115 over the plain net.
  plain = count_params(jax.eval_shape(tiny("test_resnet_tiny").model.init, KEY, t.x))
  for model in (t.model.clone(attn_kwargs={"rd_channels": 3}),
                t.model.clone(attn=functools.partial(SqueezeExcite, rd_channels=3))):
    assert count_params(jax.eval_shape(model.init, KEY, t.x)) - plain == 59 + 115


@pytest.mark.parametrize("block_cls, last", [(BasicBlock, "bn2"), (Bottleneck, "bn3")])
def test_zero_init_last_sets_last_bn_scale(block_cls, last):
  x = jnp.ones((1, 4, 4, 8))
  for zero, value in ((True, 0.0), (False, 1.0)):
    params = init(block_cls(features=2, zero_init_last=zero), x)["params"]
    np.testing.assert_array_equal(params[last]["scale"], value)
    np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)


def test_train_updates_batch_stats_by_momentum():
  """Fresh running mean 0, momentum 0.9: after one step bn1's mean = 0.1 * batch mean of
  conv1's output, recomputed here with PyTorch's 7x7/2 padding of 3."""
  t = tiny("test_resnet_tiny")
  _, state = apply(t.model, t.variables, t.x, train=True, mutable=["batch_stats"])
  conv1 = jax.lax.conv_general_dilated(
      t.x, t.variables["params"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(state["batch_stats"]["bn1"]["mean"],
                             0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  flat = traverse_util.flatten_dict(state["batch_stats"], sep="/")
  # Mean and var of 6 BNs: the stem's, two per block, one in the stride-2 shortcut.
  assert len(flat) == 2 * 6
  assert all(bool(jnp.any(v != 0.0)) for k, v in flat.items() if k.endswith("mean"))


TINY = list_models("test_*", include_test=True)


class TinyForwardTest(chex.TestCase):
  """Every tiny test variant: shape, finite, jit == eager, bfloat16 compute."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*TINY)
  def test_forward(self, name):
    t = tiny(name)
    logits = self.variant(t.model.apply)(t.variables, t.x)
    chex.assert_shape(logits, (2, 5))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    # Each mode against the other: jit and eager agree to float32 rounding.
    np.testing.assert_allclose(logits, t.logits_eager, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, t.logits_jit, rtol=1e-4, atol=1e-5)
    assert float(jnp.std(logits)) > 0.0  # not a constant output

  @parameterized.parameters(*TINY)
  def test_bfloat16_compute_gives_float32_logits(self, name):
    t = tiny(name)
    logits = apply(t.model.clone(dtype=jnp.bfloat16), t.variables, t.x)
    chex.assert_type(logits, jnp.float32)
    scale = float(jnp.max(jnp.abs(t.logits_jit)))
    np.testing.assert_allclose(logits, t.logits_jit, atol=0.05 * scale + 1e-3)


def test_tiny_variants_cover_each_block_attention():
  attns = {model_info(n).factory.keywords.get("attn") for n in TINY}
  assert {"se", "ese", "eca", "ge", "spatial", "cbam", "gc", "coord"} <= attns


@pytest.mark.parametrize("fields, error, match", [
    ({"stem": "tiered"}, ValueError, "stem"),
    ({"down": "blur"}, ValueError, "down"),
    ({"widths": (8, 16, 32)}, ValueError, "equal length"),
    ({"attn": "nope"}, ValueError, "Unknown attention"),
    ({"attn": 3}, TypeError, "attn must be"),
    ({"block": nn.Dense}, TypeError, "expansion"),
])
def test_bad_configuration_names_the_fix(fields, error, match):
  model = ResNet(**{"stage_sizes": (1, 1), "widths": (8, 16), **fields})
  with pytest.raises(error, match=match):
    jax.eval_shape(model.init, KEY, jnp.ones((1, 32, 32, 3)))


def test_bad_inputs_name_the_fix():
  model = create_model("test_resnet_tiny", num_classes=5)
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(model.init, KEY, jnp.ones((32, 32, 3)))
  with pytest.raises(TypeError, match="floating"):
    jax.eval_shape(model.init, KEY, jnp.ones((1, 32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match="6n \\+ 2"):
    cifar_resnet(21)
  narrowing = BasicBlock(features=2, down="pad")
  with pytest.raises(ValueError, match="down='conv'"):
    jax.eval_shape(narrowing.init, KEY, jnp.ones((1, 4, 4, 4)))


def _block_step(block, x):
  """Loss, gradients, updated statistics and eval output of one training step of block."""
  variables = jax.jit(functools.partial(block.init, train=True))(KEY, x)

  def loss(params, x):
    y, upd = block.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats", "intermediates"])
    return jnp.sum(jnp.sin(y)), upd

  (value, upd), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x)
  evaluated = jax.jit(functools.partial(block.apply, train=False))(
      {"params": variables["params"], "batch_stats": upd["batch_stats"]}, x)
  return value, grads, upd["batch_stats"], evaluated, upd["intermediates"]


@pytest.mark.parametrize("attn", ["se", "ese", "eca"])
@pytest.mark.parametrize("block_cls, strides", [(Bottleneck, 2), (BasicBlock, 1)])
def test_gate_folded_into_the_norm_equals_the_layers_in_turn(attn, block_cls, strides):
  # The default tail (ops.residual_tail / ops.bottleneck_tail) computes BN(y) * gate as
  # y * (mul * gate) + add * gate with the squeeze taken from the norm's statistics pass:
  # same loss, gradients, statistics, eval output and sown gate as plain_tail's BN, then
  # the gate layer, one after the other.
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 16)) * 1.5 + 0.5
  runs = [_block_step(block_cls(features=16 // block_cls.expansion * 2, strides=strides,
                                attn=attn, zero_init_last=False, tail=tail), x)
          for tail in (None, plain_tail)]
  folded, layered = runs
  assert float(folded[0]) != 0.0
  chex.assert_trees_all_close(folded[:4], layered[:4], atol=2e-5, rtol=2e-5)
  gates = [r[4]["se"]["channel_gate"][0] for r in runs]
  np.testing.assert_allclose(gates[0], gates[1], atol=1e-6)
  assert float(jnp.std(gates[0])) > 1e-3


@pytest.mark.parametrize("zero_init_last", [True, False])
@pytest.mark.parametrize("block_cls, strides", [(Bottleneck, 2), (BasicBlock, 1)])
def test_cbam_channel_gate_folded_into_the_norm_equals_the_layers_in_turn(
    block_cls, strides, zero_init_last):
  # CBAM's channel gate takes its mean and max from the norm's pass; with the last scale
  # at zero (zero_init_last) the max ties everywhere and the scale's gradient must still
  # be the layered block's.
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 16)) * 1.5 + 0.5
  runs = [_block_step(block_cls(features=16 // block_cls.expansion * 2, strides=strides,
                                attn="cbam", zero_init_last=zero_init_last, tail=tail), x)
          for tail in (None, plain_tail)]
  folded, layered = runs
  chex.assert_trees_all_close(folded[:4], layered[:4], atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(folded[4], layered[4], atol=1e-5, rtol=1e-5)
  last = "bn3" if block_cls is Bottleneck else "bn2"
  assert float(jnp.abs(folded[1][0][last]["scale"]).max()) > 1e-3
  gate = folded[4]["se"]["channel"]["channel_gate"][0]
  if zero_init_last:  # a zero map's pools are zero: the gate is sigmoid(0) everywhere
    np.testing.assert_allclose(gate, 0.5)
  else:
    assert float(jnp.std(gate)) > 1e-3


def _jaxpr_text(attn, tail):
  block = Bottleneck(features=8, attn=attn, tail=tail)
  x = jnp.ones((2, 8, 8, 32))
  variables = block.init(KEY, x, train=True)
  return str(jax.make_jaxpr(
      lambda v: block.apply(v, x, train=True, mutable=["batch_stats"]))(variables))


def test_cbam_folds_only_with_the_default_tail():
  # Only the folded block takes a minimum: the conv output's, for channels whose batch
  # norm scale is negative (the layered CBAM pools the maximum of the normalised map).
  assert "reduce_min" in _jaxpr_text("cbam", None)
  assert "reduce_min" not in _jaxpr_text("cbam", plain_tail)


def _full_size_ops(tail):
  """Equations of a Bottleneck training step (forward and backward) whose output has the
  block output's shape: the passes over the widest tensors."""
  block = Bottleneck(features=8, attn="se", tail=tail)
  x = jnp.ones((2, 8, 8, 32))
  variables = jax.jit(functools.partial(block.init, train=True))(KEY, x)

  def loss(params):
    y, _ = block.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                       train=True, mutable=["batch_stats"])
    return jnp.sum(y)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr
  return sum(1 for eqn in jaxpr.eqns for v in eqn.outvars
             if getattr(v.aval, "shape", None) == (2, 8, 8, 32))


def _materialized_plain_tail(y, shortcut, **kwargs):
  """plain_tail with the Bottleneck default's one extra step, its output materialized."""
  return ops.materialize(plain_tail(y, shortcut, **kwargs))


@pytest.mark.parametrize("folded_tail, plain", [
    (ops.residual_tail, plain_tail), (None, _materialized_plain_tail)])
def test_folding_the_gate_removes_passes_over_the_block_output(folded_tail, plain):
  # Forward: no normalised map in float32 and in the compute dtype, no separate scaling;
  # backward likewise (22 against 27 equations through the tails alone, 25 against 30 with
  # the Bottleneck's materialized output on both sides, when written).
  folded, layered = _full_size_ops(folded_tail), _full_size_ops(plain)
  assert folded <= layered - 4, (folded, layered)


def test_a_norm_that_cannot_fold_applies_the_gate_after_it():
  # Flax's own BatchNorm has no fold(): the default tail normalises, then gates; the result
  # is the layered block's with TorchBatchNorm's biased running variance aside (identical
  # outputs in training mode).
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 16)) + 1.0
  outs = []
  for norm in (functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5),
               functools.partial(TorchBatchNorm, momentum=0.9, epsilon=1e-5)):
    block = Bottleneck(features=4, attn="se", zero_init_last=False, norm=norm)
    variables = jax.jit(functools.partial(block.init, train=True))(KEY, x)
    y, state = block.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
    outs.append((y, state["intermediates"]["se"]["channel_gate"][0]))
  np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-6)
  assert float(jnp.std(outs[0][1])) > 1e-3
