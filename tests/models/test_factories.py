"""Every model family takes the same factories: built from plain Flax (``nn.Conv``,
``nn.max_pool``, the plain tail, the plain sampler) a model has the default model's
parameter tree, logits, gradients and running statistics; forward mode works through the
plain model; a factory the user passes is the one that runs; ``plain_factories`` fills
them in."""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from attention_flax import sampling
from attention_flax.layers.hybrid import CBAM
from attention_flax.models import (
    PLAIN_FACTORIES, create_model, list_models, model_info, plain_factories)
from attention_flax.models.common import plain_tail
from attention_flax.models.residual_attention import ResidualAttentionNet
from attention_flax.models.resnet import BasicBlock, Bottleneck, ResNet
from attention_flax.models.stn import DigitsCNN, STNClassifier

KEY = jax.random.key(0, impl="rbg")  # compiles faster than threefry on a small CPU


class Case(NamedTuple):
  model: nn.Module  # built with the default (fast) factories
  plain: dict  # the fields that build it from plain Flax
  shape: tuple[int, ...]  # input batch


def _resnet(block, attn):
  # zero_init_last=False: every residual branch and its attention reach the logits.
  model = ResNet(stage_sizes=(1, 1), block=block, widths=(8, 16) if block is BasicBlock
                 else (4, 8), attn=attn, num_classes=5, zero_init_last=False)
  plain = dict(conv=nn.Conv, pool=nn.max_pool, tail=plain_tail)
  if attn == "cbam":
    plain["attn_kwargs"] = {"conv": nn.Conv}
  return Case(model, plain, (2, 32, 32, 3))


CASES = {
    "resnet_basic_se": lambda: _resnet(BasicBlock, "se"),
    "resnet_basic_cbam": lambda: _resnet(BasicBlock, "cbam"),
    "resnet_bottleneck_se": lambda: _resnet(Bottleneck, "se"),
    "resnet_bottleneck_cbam": lambda: _resnet(Bottleneck, "cbam"),
    "attention_tiny": lambda: Case(create_model("attention_tiny", num_classes=5),
                                   dict(conv=nn.Conv, pool=nn.max_pool), (2, 32, 32, 3)),
    "stn_cnn_tiny": lambda: Case(create_model("stn_cnn_tiny", num_classes=5),
                                 dict(conv=nn.Conv, sampler=sampling.grid_sample),
                                 (2, 24, 24, 1)),
    "cnn_digits_tiny": lambda: Case(create_model("cnn_digits_tiny", num_classes=5),
                                    dict(conv=nn.Conv, pool=nn.max_pool), (2, 24, 24, 1)),
}


def _images(shape, seed=0):
  """Inputs from numpy (no PRNG program to compile)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _tangent_like(tree, seed):
  """A random direction with the structure of ``tree``, each array's entries scaled to
  the array's root mean square (plus 0.01, for arrays of zeros): every parameter moves
  in proportion to its size."""
  rng = np.random.default_rng(seed)

  def draw(a):
    scale = float(np.sqrt(np.mean(np.square(np.asarray(a))))) + 0.01
    return jnp.asarray(rng.normal(size=a.shape) * scale, a.dtype)

  return jax.tree.map(draw, tree)


def _read_out(logits):
  """A scalar whose gradient differs at every logit."""
  weights = jnp.arange(1.0, logits.size + 1.0).reshape(logits.shape) / logits.size
  return jnp.sum(jnp.sin(logits) * weights)


def _loss(model, variables, params, x):
  """The read-out in train mode (batch statistics, as the trainer's step); also returns
  the updated statistics."""
  logits, state = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
  return _read_out(logits), state


class Run(NamedTuple):
  logits: jax.Array  # eval mode
  loss: jax.Array
  grads: tuple  # (params, x)
  stats: dict  # batch statistics after one train-mode pass


def _run(model, variables, x) -> Run:
  def step(variables, x):
    logits = model.apply(variables, x)
    (loss, state), grads = jax.value_and_grad(
        functools.partial(_loss, model, variables), argnums=(0, 1), has_aux=True)(
            variables["params"], x)
    return Run(logits, loss, grads, state.get("batch_stats", {}))
  return jax.jit(step)(variables, x)


@functools.lru_cache(maxsize=None)
def _setup(name):
  """The case's models, shared variables (the default model's), input and both runs."""
  case = CASES[name]()
  x = _images(case.shape, seed=len(name))
  variables = jax.jit(case.model.init)(KEY, x)
  if "stn" in variables["params"]:
    # A warp away from the identity, different per image, so that the sampler and its
    # derivatives really work: a generic zoom that keeps every sample inside the image.
    # A symmetric theta would put whole lines of samples exactly on pixel centres, where
    # bilinear sampling has a kink (a finite difference averages the two one-sided
    # derivatives there), and samples outside read zeros that tie in the max pools.
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    kernel = params["stn/fc_theta/kernel"]
    params["stn/fc_theta/kernel"] = _images(kernel.shape, seed=5) * 0.05
    params["stn/fc_theta/bias"] = jnp.array([0.83, 0.11, 0.037, -0.07, 0.86, -0.029])
    variables = {**variables, "params": traverse_util.unflatten_dict(params, sep="/")}
  plain = case.model.clone(**case.plain)
  return case, plain, variables, x, _run(case.model, variables, x), _run(plain, variables, x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_plain_factories_give_the_same_model(name):
  case, plain, variables, x, fast, slow = _setup(name)
  # The same parameter tree: names, shapes and dtypes.
  shapes = jax.eval_shape(plain.init, KEY, x)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, variables)
  assert float(jnp.std(fast.logits)) > 1e-3  # not a constant output
  np.testing.assert_allclose(slow.logits, fast.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(slow.loss, fast.loss, rtol=1e-5, atol=1e-5)
  # Gradients of every parameter and of the input, and the updated running statistics.
  chex.assert_trees_all_close(slow.grads, fast.grads, rtol=1e-4, atol=2e-5)
  chex.assert_trees_all_close(slow.stats, fast.stats, rtol=1e-5, atol=1e-5)
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(fast.grads[0])) > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_mode_through_the_plain_model(name):
  """jax.jvp of the plain model along a random direction in parameters and input: in
  train mode it equals that direction's dot product with the default model's
  reverse-mode gradient; in eval mode, a central finite difference."""
  _, plain, variables, x, fast, _ = _setup(name)
  params = variables["params"]
  t_params, t_x = _tangent_like(params, 1), _tangent_like(x, 2)

  def loss(params, x):
    return _loss(plain, variables, params, x)[0]

  value, derivative = jax.jit(lambda p, x: jax.jvp(loss, (p, x), (t_params, t_x)))(params, x)
  np.testing.assert_allclose(value, fast.loss, rtol=1e-5, atol=1e-5)
  dots = [jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(fast.grads),
                                         jax.tree.leaves((t_params, t_x)))]
  reverse = float(sum(dots))
  assert abs(reverse) > 1e-2
  np.testing.assert_allclose(float(derivative), reverse, rtol=1e-4, atol=1e-5)

  # Eval mode: batch statistics of 2x2 maps would make the loss too curved for a finite
  # difference in float32. The step is small enough that few units cross a ReLU or max
  # pool kink (the error falls with it) and large enough for float32 round-off.
  def evaluated(params, x):
    return _read_out(plain.apply({**variables, "params": params}, x))

  _, derivative = jax.jit(lambda p, x: jax.jvp(evaluated, (p, x), (t_params, t_x)))(params, x)
  moved = jax.jit(lambda s: evaluated(
      jax.tree.map(lambda p, t: p + s * t, params, t_params), x + s * t_x))
  eps = 1e-4
  difference = (float(moved(eps)) - float(moved(-eps))) / (2 * eps)
  assert abs(float(derivative)) > 1e-2
  np.testing.assert_allclose(difference, float(derivative), rtol=0.05, atol=1e-2)


def test_forward_mode_matches_linearize_on_a_cbam_resnet():
  # jax.linearize (a jvp, then partial evaluation) gives the tangent map of the plain model;
  # applied along the input direction it is the jvp's tangent.
  _, plain, variables, x, _, _ = _setup("resnet_basic_cbam")
  t_x = _tangent_like(x, 3)
  f = lambda x: plain.apply(variables, x)
  _, tangent = jax.jvp(f, (x,), (t_x,))
  _, linear = jax.linearize(f, x)
  chex.assert_trees_all_close(tangent, linear(t_x), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(tangent).max()) > 1e-3


# ------------------------------------------------------------ user factories are used


class CountingConv(nn.Conv):
  """nn.Conv that counts its calls (a class attribute: the count over a whole trace)."""
  calls = 0

  def __call__(self, inputs):
    type(self).calls += 1
    return super().__call__(inputs)


def _conv_kernels(params) -> int:
  return sum(1 for path, leaf in traverse_util.flatten_dict(params).items()
             if path[-1] == "kernel" and leaf.ndim == 4)


@pytest.mark.parametrize("name, size, kernels", [
    ("resnet18", 64, 20), ("cbam_resnet18", 64, 20 + 8), ("stn_cnn_tiny", 24, 4),
    ("cnn_digits_tiny", 24, 2), ("attention_tiny", 32, None)])
def test_a_user_conv_runs_every_convolution(name, size, kernels):
  # resnet18: the stem, 2 per block in 8 blocks, 3 shortcut projections; CBAM adds one
  # spatial convolution per block, reached through attn_kwargs. stn_cnn_tiny: two in the
  # localization net, two in the backbone (the classifier hands its conv on).
  model = create_model(name, num_classes=10)
  overrides = dict(conv=CountingConv)
  if getattr(model, "attn", None) == "cbam":
    overrides["attn_kwargs"] = {"conv": CountingConv}
  CountingConv.calls = 0
  channels = model_info(name).in_channels
  variables = jax.eval_shape(model.clone(**overrides).init, KEY,
                             jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32))
  if kernels is not None:
    assert _conv_kernels(variables["params"]) == kernels
  assert CountingConv.calls == _conv_kernels(variables["params"]) > 0


def _counting(fn, calls):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    calls.append(fn.__name__)
    return fn(*args, **kwargs)
  return wrapper


def test_user_pool_tail_and_sampler_run():
  calls = []
  resnet = create_model("test_resnet_tiny_se", num_classes=5).clone(
      pool=_counting(nn.max_pool, calls), tail=_counting(plain_tail, calls))
  jax.eval_shape(resnet.init, KEY, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert calls == ["max_pool", "plain_tail", "plain_tail"]  # the stem, then each block

  calls.clear()
  stn = create_model("stn_cnn_tiny").clone(sampler=_counting(sampling.grid_sample, calls))
  jax.eval_shape(stn.init, KEY, jax.ShapeDtypeStruct((1, 24, 24, 1), jnp.float32))
  assert calls == ["grid_sample"]

  calls.clear()
  for model, shape, pools in ((create_model("cnn_digits_tiny"), (1, 24, 24, 1), 2),
                              (create_model("attention_tiny"), (1, 32, 32, 3), None)):
    model = model.clone(pool=_counting(nn.max_pool, calls))
    jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(shape, jnp.float32))
    if pools is not None:
      assert calls == ["max_pool"] * pools  # one per stage
  # attention_tiny: the stem's pool and the mask branches' (levels 2 and 1: 3 in all).
  assert calls == ["max_pool"] * (2 + 1 + 3)


# ------------------------------------------------------------------- plain_factories


@pytest.mark.parametrize("name", sorted(CASES))
def test_plain_factories_fill_in_the_plain_fields(name):
  case = CASES[name]()
  found = plain_factories(case.model)
  backbone = found.pop("backbone", None)
  assert found == case.plain
  if isinstance(case.model, STNClassifier):
    # The backbone factory gets its own plain pool; conv comes from the classifier.
    assert backbone.func is DigitsCNN and backbone.keywords["pool"] is nn.max_pool
    assert "conv" not in backbone.keywords
  else:
    assert backbone is None


def test_plain_factories_per_family():
  assert set(PLAIN_FACTORIES) == {"conv", "pool", "tail", "sampler"}
  # Attentions without factory fields (none, SE) get no attn_kwargs; where they are added,
  # the attention's other fields are kept.
  assert "attn_kwargs" not in plain_factories(create_model("resnet18"))
  assert "attn_kwargs" not in plain_factories(create_model("seresnet18"))
  for attn in ("cbam", "CBAM", "spatial", "lcbam", CBAM, functools.partial(CBAM, light=True)):
    found = plain_factories(create_model("resnet18", attn=attn, attn_kwargs={"kernel_size": 3}))
    assert found["attn_kwargs"] == {"kernel_size": 3, "conv": nn.Conv}, attn
  assert plain_factories(ResidualAttentionNet()) == dict(conv=nn.Conv, pool=nn.max_pool)
  assert plain_factories(DigitsCNN()) == dict(conv=nn.Conv, pool=nn.max_pool)
  # An STN with a ResNet backbone: the backbone's stem pool and tail become plain too.
  found = plain_factories(create_model("stn_resnet20"))
  assert (found["conv"], found["sampler"]) == (nn.Conv, sampling.grid_sample)
  assert found["backbone"].func is ResNet
  assert found["backbone"].keywords["tail"] is plain_tail
  assert found["backbone"].keywords["pool"] is nn.max_pool
  assert found["backbone"].keywords["stage_sizes"] == (3, 3, 3)  # the factory's own fields


@pytest.mark.parametrize("name", [n for n in list_models(include_test=True)
                                  if model_info(n).test_only])
def test_plain_factories_keep_the_parameter_tree(name):
  # Every tiny variant (each attention of the ResNet slot among them), built abstractly.
  entry = model_info(name)
  model = create_model(name, num_classes=5)
  x = jax.ShapeDtypeStruct((1, entry.input_size, entry.input_size, entry.in_channels),
                           jnp.float32)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      jax.eval_shape(model.clone(**plain_factories(model)).init, KEY, x),
      jax.eval_shape(model.init, KEY, x))


def test_plain_factories_build_the_plain_model():
  # The helper's model is the hand-built plain one: same logits on the same variables.
  case, plain, variables, x, _, slow = _setup("resnet_basic_cbam")
  helped = case.model.clone(**plain_factories(case.model))
  np.testing.assert_allclose(jax.jit(helped.apply)(variables, x), slow.logits, rtol=1e-6,
                             atol=1e-6)
  # ...and forward mode works through it (the default CBAM tail has no forward mode).
  _, tangent = jax.jit(lambda x, t: jax.jvp(lambda v: helped.apply(variables, v), (x,), (t,)))(
      x, _tangent_like(x, 4))
  assert np.isfinite(np.asarray(tangent)).all() and float(jnp.abs(tangent).max()) > 1e-3
