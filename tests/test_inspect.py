"""Tests of attention_flax.inspect: sown maps by path and kind, stage features, Grad-CAM
against hand computations (a quadrant-summing head; CAM for GAP + linear heads); kinds
read from the layers' ``maps`` declarations, a user's kinds drawn by their shape."""

from __future__ import annotations

import functools
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import attention_flax
from attention_flax import grad_cam as gc
from attention_flax import inspect as ins
from attention_flax import models
from attention_flax.layers import (CBAM, NonLocal, ResidualAttention, SelectiveKernel,
                                   SplitAttention, SqueezeExcite)
from attention_flax.layers.hybrid import CBAMChannel


@functools.lru_cache(maxsize=None)
def built(name: str, size: int | None = None, n: int = 2):
  entry = models.model_info(name)
  size = size or entry.input_size
  model = models.create_model(name, num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(0), (n, size, size, entry.in_channels))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  return model, variables, x


def jit_maps(model, variables, x):
  return jax.jit(functools.partial(ins.attention_maps, model))(variables, x)


@pytest.mark.parametrize("name,expected", [
    ("test_resnet_tiny_se", {"layer1_0/se/channel_gate": ("channel_gate", (2, 1, 1, 8)),
                             "layer2_0/se/channel_gate": ("channel_gate", (2, 1, 1, 16))}),
    ("test_resnet_tiny_cbam", {
        "layer1_0/se/channel/channel_gate": ("channel_gate", (2, 1, 1, 8)),
        "layer1_0/se/spatial/spatial_mask": ("spatial_mask", (2, 8, 8, 1)),
        "layer2_0/se/channel/channel_gate": ("channel_gate", (2, 1, 1, 16)),
        "layer2_0/se/spatial/spatial_mask": ("spatial_mask", (2, 4, 4, 1))}),
    ("test_resnet_tiny_coord", {
        "layer1_0/se/coord_gate_h": ("coord_gate", (2, 8, 1, 8)),
        "layer1_0/se/coord_gate_w": ("coord_gate", (2, 1, 8, 8)),
        "layer2_0/se/coord_gate_h": ("coord_gate", (2, 4, 1, 16)),
        "layer2_0/se/coord_gate_w": ("coord_gate", (2, 1, 4, 16))}),
    ("stn_cnn_tiny", {"stn/stn_theta": ("stn_theta", (2, 2, 3)),
                      "stn/stn_output": ("stn_output", (2, 24, 24, 1))}),
])
def test_maps_keys_kinds_shapes_and_range(name, expected):
  model, variables, x = built(name)
  maps = jit_maps(model, variables, x)
  assert {k: (m.kind, m.value.shape) for k, m in maps.items()} == expected
  for key, m in maps.items():
    assert m.path == key
    if m.kind in ins.GATE_KINDS:
      v = np.asarray(m.value)
      assert v.min() >= 0.0 and v.max() <= 1.0
    if m.kind == "spatial_mask":
      # CBAM's spatial BN starts with scale 0 (the authors' init): sigmoid(0) = 0.5.
      np.testing.assert_array_equal(m.value, 0.5)


class _TwoResidualMasks(nn.Module):
  """Two residual attention modules in a row (the network version compiles for a minute)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), padding=1)(x)
    x = ResidualAttention(levels=2, name="attn1")(x, train=train)
    return ResidualAttention(levels=1, name="attn2")(x, train=train)


def test_residual_mask_and_spatial_views():
  model = _TwoResidualMasks()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 3))
  variables = model.init(jax.random.key(1, impl="rbg"), x)
  maps = jit_maps(model, variables, x)
  assert [m.kind for m in maps.values()] == ["residual_mask"] * 2
  assert [k for k in maps] == ["attn1/residual_mask", "attn2/residual_mask"]
  views = ins.spatial_views(maps)
  for key, m in maps.items():
    v = np.asarray(m.value)
    assert v.shape[-1] > 1 and 0.0 <= v.min() and v.max() <= 1.0
    np.testing.assert_allclose(views[key], v.mean(-1), rtol=1e-6)


def test_coord_views_are_the_applied_gate():
  model, variables, x = built("test_resnet_tiny_coord")
  maps = ins.attention_maps(model, variables, x)
  views = ins.spatial_views(maps)
  h = np.asarray(maps["layer1_0/se/coord_gate_h"].value)
  w = np.asarray(maps["layer1_0/se/coord_gate_w"].value)
  np.testing.assert_allclose(views["layer1_0/se/coord_gate"], (h * w).mean(-1), rtol=1e-6)
  assert set(views) == {"layer1_0/se/coord_gate", "layer2_0/se/coord_gate"}


def test_stn_at_init_is_identity():
  model, variables, x = built("stn_cnn_tiny")
  maps = jit_maps(model, variables, x)
  np.testing.assert_array_equal(maps["stn/stn_theta"].value,
                                np.broadcast_to([[1, 0, 0], [0, 1, 0]], (2, 2, 3)))
  np.testing.assert_array_equal(maps["stn/stn_output"].value, x)


def test_features_are_the_stages():
  model, variables, x = built("stn_cnn_tiny")
  feats = ins.features(model, variables, x)
  assert {k: v.shape for k, v in feats.items()} == {
      "backbone/stage1": (2, 12, 12, 4), "backbone/stage2": (2, 6, 6, 8)}


class NoTrainArg(nn.Module):
  """A user module whose __call__ takes no `train`."""

  @nn.compact
  def __call__(self, x):
    from attention_flax.layers.channel import SqueezeExcite
    return SqueezeExcite(name="se")(x)


def test_user_module_without_train_argument():
  x = jnp.ones((1, 4, 4, 8), jnp.float32)
  model = NoTrainArg()
  variables = model.init(jax.random.PRNGKey(0), x)
  maps = ins.attention_maps(model, variables, x)
  assert list(maps) == ["se/channel_gate"] and maps["se/channel_gate"].kind == "channel_gate"


class QuadrantNet(nn.Module):
  """features: 1x1 conv, ch0 = relu(x), ch1 = relu(-x); 2x2 average pool; logit 0 sums
  ch0 over the top-left quadrant, logit 1 sums ch1 over the bottom-right quadrant."""

  @nn.compact
  def __call__(self, x):
    kernel = jnp.array([[[[1.0, -1.0]]]], jnp.float32)
    a = nn.Conv(2, (1, 1), use_bias=False, name="features",
                kernel_init=lambda *_: kernel)(x)
    n, hh, ww, c = a.shape
    a = jnp.mean(jax.nn.relu(a).reshape(n, hh // 2, 2, ww // 2, 2, c), axis=(2, 4))
    h, w = a.shape[1] // 2, a.shape[2] // 2
    return jnp.stack([a[:, :h, :w, 0].sum((1, 2)), a[:, h:, w:, 1].sum((1, 2)),
                      -a[:, :, :, 0].sum((1, 2)) - 100.0], axis=-1)


def _quadrant_case():
  x = np.zeros((1, 8, 8, 1), np.float32)
  x[0, 1:3, 1:3] = 2.0     # bright blob, top-left
  x[0, 5:7, 5:7] = -1.0    # dark blob, bottom-right
  x[0, 1, 6] = 0.5         # a weaker bright pixel outside the top-left quadrant
  model = QuadrantNet()
  return model, model.init(jax.random.PRNGKey(0), jnp.asarray(x)), jnp.asarray(x)


def test_grad_cam_peaks_in_the_region_the_logit_reads():
  model, variables, x = _quadrant_case()
  cam0 = np.asarray(gc.grad_cam(model, variables, x, "features", target=0))
  cam1 = np.asarray(gc.grad_cam(model, variables, x, "features", target=1))
  assert cam0.shape == (1, 8, 8) and cam0.max() == 1.0 and cam0.min() >= 0.0
  assert np.unravel_index(cam0[0].argmax(), (8, 8))[0] < 4
  assert np.unravel_index(cam0[0].argmax(), (8, 8))[1] < 4
  assert cam1[0, 4:, 4:].max() == 1.0 and cam1[0, :4, :4].max() < 0.3
  # By hand: A is the conv output (ch0 = x, ch1 = -x). For logit 0, dy/dA_0 = 1/4 on the
  # bright top-left pixels and 0 elsewhere, dy/dA_1 = 0; so the map is relu(x), rescaled.
  expected = np.maximum(np.asarray(x)[..., 0], 0.0) / 2.0
  np.testing.assert_allclose(cam0, expected, atol=1e-6)
  # Default target: the top logit (logit 0 = 2.0 * 4 / 4 = 2 > logit 1 = 1).
  np.testing.assert_array_equal(gc.grad_cam(model, variables, x, "features"), cam0)


def test_grad_cam_negative_evidence_gives_zero_not_nan():
  model, variables, x = _quadrant_case()
  x = jnp.abs(x)  # A_0 >= 0 everywhere, and logit 2 only decreases with it
  cam2 = np.asarray(gc.grad_cam(model, variables, x, "features", target=2))
  assert np.all(cam2 == 0.0)


def test_grad_cam_equals_cam_for_a_pooled_linear_head():
  # ResNet: logits = fc(mean_hw(A)), so dy_k/dA = W[:, k] / (h w) everywhere and
  # Grad-CAM reduces to CAM (Zhou et al. 2016): relu(A @ W[:, k]) up to scale.
  model, variables, x = built("test_resnet_tiny_se")
  cam = gc.grad_cam(model, variables, x, "stage2", target=3)
  a = ins.features(model, variables, x)["stage2"]
  kernel = variables["params"]["fc"]["kernel"]
  by_hand = gc.cam_from_gradients(a, jnp.broadcast_to(kernel[:, 3], a.shape), (32, 32))
  chex.assert_trees_all_close(cam, by_hand, atol=1e-5)
  assert cam.shape == (2, 32, 32)


def test_grad_cam_on_a_stage_read_by_a_flattening_head():
  # DigitsCNN flattens stage2 into its Dense head: dy_k/dA[h, w, c] = kernel[(h, w, c), k].
  model, variables, x = built("stn_cnn_tiny")
  cam = gc.grad_cam(model, variables, x, "stage2", target=np.array([1, 7]))
  a = ins.features(model, variables, x)["backbone/stage2"]
  kernel = variables["params"]["backbone"]["head"]["kernel"]
  grads = jnp.stack([kernel[:, 1].reshape(a.shape[1:]), kernel[:, 7].reshape(a.shape[1:])])
  chex.assert_trees_all_close(cam, gc.cam_from_gradients(a, grads, (24, 24)), atol=1e-5)


def test_grad_cam_errors_name_the_fix():
  model, variables, x = built("test_resnet_tiny_se")
  with pytest.raises(ValueError, match="Unknown layer 'stage9'"):
    gc.grad_cam(model, variables, x, "stage9")
  with pytest.raises(ValueError, match="NHWC"):
    ins.attention_maps(model, variables, x[0])
  with pytest.raises(ValueError, match=r"channels-first.*transpose\(0, 2, 3, 1\)"):
    gc.grad_cam(model, variables, jnp.zeros((2, 3, 24, 24)), "stage2")
  with pytest.raises(TypeError, match="params"):
    ins.features(model, {"weights": 1}, x)
  with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
    gc.grad_cam(model, variables, x, "stage2", target=10)


def test_channel_views_rank_channels_by_spatial_spread():
  # Channel 0 is constant, channel 1 a strong left/right split, channel 2 a weak one:
  # spatial std 0, 0.4 and 0.1 in every image.
  v = np.zeros((2, 4, 4, 3), np.float32)
  v[..., 0] = 0.5
  v[:, :, :2, 1], v[:, :, 2:, 1] = 0.1, 0.9
  v[:, :, :2, 2], v[:, :, 2:, 2] = 0.4, 0.6
  maps = {"attn/residual_mask": ins.AttentionMap(jnp.asarray(v), "residual_mask",
                                                 "attn/residual_mask"),
          "se/channel_gate": ins.AttentionMap(jnp.full((2, 1, 1, 3), 0.5), "channel_gate",
                                              "se/channel_gate")}
  views = ins.channel_views(maps, k=2)
  assert list(views) == ["attn/residual_mask[1]", "attn/residual_mask[2]"]
  np.testing.assert_array_equal(views["attn/residual_mask[1]"], v[..., 1])
  np.testing.assert_array_equal(views["attn/residual_mask[2]"], v[..., 2])
  assert list(ins.channel_views(maps, k=5)) == [
      "attn/residual_mask[1]", "attn/residual_mask[2]", "attn/residual_mask[0]"]
  with pytest.raises(ValueError, match="k >= 1"):
    ins.channel_views(maps, k=0)


# --------------------------------------------------------------------------- declarations


def test_map_kinds_come_from_the_layers_declarations():
  # The table this module used to keep by hand is what the library's layers declare; the
  # newer layers add names of their own and leave those entries as they were.
  kinds = ins.map_kinds()
  assert {k: kinds[k] for k in (
      "channel_gate", "spatial_mask", "residual_mask", "coord_gate_h", "coord_gate_w",
      "context_weights", "gather_gate", "stn_theta", "stn_output")} == {
      "channel_gate": "channel_gate", "spatial_mask": "spatial_mask",
      "residual_mask": "residual_mask", "coord_gate_h": "coord_gate",
      "coord_gate_w": "coord_gate", "context_weights": "context_weights",
      "gather_gate": "gather_gate", "stn_theta": "stn_theta", "stn_output": "stn_output"}
  assert kinds["branch_weights"] == "branch_weights"  # SK's, declared in its own file
  assert kinds["bam_mask"] == "residual_mask"
  # Every registered layer declares maps; each declared name is in the table.
  for name, factory in attention_flax.ATTENTIONS.items():
    declared = ins.declared_maps(factory)
    assert declared, name
    assert set(declared) <= set(kinds), name
  # The newer layers' kinds have views of their own; kinds outside the vocabulary are the
  # layers' own, drawn by shape where they can be.
  assert {"branch_weights", "pixel_attention"} <= set(kinds.values()) & set(ins.MAP_KINDS)
  assert ins.KIND_VIEWS["branch_weights"] == "branches"
  assert ins.KIND_VIEWS["pixel_attention"] == "pixel"
  own = {v for v in kinds.values()} - set(ins.MAP_KINDS)
  assert own >= {"block_transform", "channel_logits"}
  # CBAM declares what its children sow; the unregistered child declares its own.
  assert ins.declared_maps(CBAM) == {"channel_gate": "channel_gate",
                                     "spatial_mask": "spatial_mask"}
  assert CBAMChannel in ins._library_layers()  # pylint: disable=protected-access
  assert ins.declared_maps(CBAMChannel) == {"channel_gate": "channel_gate"}


def test_declared_maps_of_classes_partials_and_objects():
  class Declares:
    maps = {"a": "spatial_mask"}

  assert ins.declared_maps(functools.partial(functools.partial(SqueezeExcite, rd_ratio=0.5),
                                             act="gelu")) == {"channel_gate": "channel_gate"}
  assert ins.declared_maps(Declares()) == {"a": "spatial_mask"}
  assert ins.declared_maps(lambda **kw: SqueezeExcite(**kw)) == {}

  class CountsMaps:  # a field that happens to be called `maps`
    maps = 4

  assert ins.declared_maps(CountsMaps) == {}

  class Malformed:
    maps = {"a": 1}

  with pytest.raises(TypeError, match="sown name.*to its kind"):
    ins.declared_maps(Malformed)


class UserMaps(nn.Module):
  """Sows maps of kinds outside the vocabulary, one declared with a library kind under a
  library name but another kind, and one value it does not declare."""
  maps: ClassVar[dict[str, str]] = {"saliency": "saliency", "per_pixel": "mixed",
                                    "scale": "scale", "vector": "embedding",
                                    "channel_gate": "my_kind"}

  @nn.compact
  def __call__(self, x):
    x = x * self.param("one", nn.initializers.ones, (1,))
    s = jax.nn.sigmoid(x)
    self.sow("intermediates", "saliency", jnp.mean(s, -1, keepdims=True))     # (N, H, W, 1)
    self.sow("intermediates", "per_pixel", s)                                # (N, H, W, C)
    self.sow("intermediates", "scale", jnp.mean(s, (1, 2), keepdims=True))    # (N, 1, 1, C)
    self.sow("intermediates", "vector", jnp.mean(s, (1, 2)))                 # (N, C)
    self.sow("intermediates", "channel_gate", jnp.max(s, (1, 2), keepdims=True))
    self.sow("intermediates", "debug", x)                                    # not a map
    return x


class Undeclared(nn.Module):
  """Sows a library name without declaring it: the name table gives its kind."""

  @nn.compact
  def __call__(self, x):
    self.sow("intermediates", "spatial_mask", jax.nn.sigmoid(x[..., :1]))
    return x


class UserNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = UserMaps(name="mine")(x)
    return Undeclared(name="plain")(x)


def test_user_kinds_are_returned_and_viewed_by_shape():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 6, 3))
  model = UserNet()
  # Not jitted: jit returns dicts in sorted key order, this checks the sowing order.
  maps = ins.attention_maps(model, {"params": model.init(jax.random.PRNGKey(1), x)["params"]}, x)
  s = np.asarray(jax.nn.sigmoid(x))
  expected = {
      "mine/saliency": ("saliency", "mask", s.mean(-1, keepdims=True)),
      "mine/per_pixel": ("mixed", "per_channel", s),
      "mine/scale": ("scale", "gate", s.mean((1, 2), keepdims=True)),
      "mine/vector": ("embedding", None, s.mean((1, 2))),
      # The module's own declaration wins over the library's kind for the name.
      "mine/channel_gate": ("my_kind", "gate", s.max((1, 2), keepdims=True)),
      "plain/spatial_mask": ("spatial_mask", "mask", s[..., :1]),
  }
  assert list(maps) == list(expected)  # "mine/debug" is no map
  for key, (kind, view, value) in expected.items():
    assert maps[key].kind == kind and ins.view_of(maps[key]) == view, key
    np.testing.assert_allclose(maps[key].value, value, rtol=1e-6, err_msg=key)
  assert list(ins.by_view(maps, "gate")) == ["mine/scale", "mine/channel_gate"]
  assert ins.spatial_kinds(maps) == ["saliency", "mixed", "spatial_mask"]
  views = ins.spatial_views(maps)
  assert list(views) == ["mine/saliency", "mine/per_pixel", "plain/spatial_mask"]
  np.testing.assert_allclose(views["mine/saliency"], s.mean(-1), rtol=1e-6)
  np.testing.assert_allclose(views["mine/per_pixel"], s.mean(-1), rtol=1e-6)
  np.testing.assert_allclose(views["plain/spatial_mask"], s[..., 0], rtol=1e-6)
  # The per-channel user kind is ranked like a residual mask.
  spread = s.std(axis=(1, 2)).mean(0)
  top = int(np.argmax(spread))
  channels = ins.channel_views(maps, k=1)
  assert list(channels) == [f"mine/per_pixel[{top}]"]
  np.testing.assert_allclose(channels[f"mine/per_pixel[{top}]"], s[..., top], rtol=1e-6)


def test_view_of_the_vocabulary_does_not_depend_on_shape():
  # An STN output is (N, H, W, C) but no per-channel mask; a (N, H, W, 1) context weight
  # is normalised by its peak, not drawn as a mask.
  out = ins.AttentionMap(jnp.ones((1, 4, 4, 3)), "stn_output", "stn/stn_output")
  assert ins.view_of(out) == "image" and ins.spatial_views({"o": out}) == {}
  w = np.zeros((1, 2, 2, 1), np.float32)
  w[0, 0, 1, 0] = 0.25
  ctx = ins.AttentionMap(jnp.asarray(w), "context_weights", "gc/context_weights")
  np.testing.assert_array_equal(ins.spatial_views({"c": ctx})["c"], [[[0.0, 1.0], [0.0, 0.0]]])
  assert ins.PER_CHANNEL_KINDS == ("residual_mask", "gather_gate")
  assert set(ins.GATE_KINDS) <= set(ins.MAP_KINDS)


class _Branches(nn.Module):
  """Selective Kernel then split attention: both sow per-channel branch weights."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = SelectiveKernel(name="sk")(x, train)
    return SplitAttention(name="splat")(x, train)


def test_branch_weights_are_found_and_sum_to_one_over_the_branches():
  model = _Branches()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 8))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  maps = jit_maps(model, variables, x)
  branches = ins.by_view(maps, "branches")
  # SK's weights are sown by its child `attn`.
  assert list(branches) == ["sk/attn/branch_weights", "splat/radix_weights"]
  _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, x)
  sown = state["intermediates"]
  for key, value in (("sk/attn/branch_weights", sown["sk"]["attn"]["branch_weights"][0]),
                     ("splat/radix_weights", sown["splat"]["radix_weights"][0])):
    m = branches[key]
    assert m.kind == "branch_weights" and m.value.shape == (2, 2, 8)
    np.testing.assert_allclose(m.value, value, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(m.value).sum(axis=1), 1.0, rtol=1e-6)
    assert np.ptp(np.asarray(m.value)) > 1e-3  # the weights differ between branches
  assert ins.spatial_kinds(maps) == []  # no overlay of a (N, P, C) array


def test_pixel_attention_is_the_softmax_of_theta_phi_by_hand():
  model = NonLocal(rd_channels=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 8))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  with jax.default_matmul_precision("highest"):
    maps = jit_maps(model, variables, x)
    out = jax.jit(model.apply)(variables, x)
  m = maps["nl_attention"]
  assert m.kind == "pixel_attention" and ins.view_of(m) == "pixel"
  p = jax.tree.map(np.asarray, variables["params"])
  xs = np.asarray(x, np.float64).reshape(2, 12, 8)
  theta = xs @ p["t"]["kernel"][0, 0] + p["t"]["bias"]
  phi = xs @ p["p"]["kernel"][0, 0] + p["p"]["bias"]
  scores = np.einsum("nqc,nkc->nqk", theta, phi) * 8 ** -0.5
  expected = np.exp(scores - scores.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(m.value, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(m.value).sum(-1), 1.0, rtol=1e-6)
  # Sowing leaves the output alone: a fresh block (zero BN scale) is the identity.
  np.testing.assert_array_equal(out, x)
  # The 12 positions are read as 3 x 4, the input's aspect (a 6 x 8 image, too).
  grid = ins.attention_grid(m, (6, 8))
  assert grid.shape == (2, 3, 4, 3, 4)
  queries, weights = ins.pixel_views(maps, (3, 4))["nl_attention"]
  # Centre (rounded half up) and corners.
  np.testing.assert_array_equal(queries, [[1, 2], [0, 0], [0, 3], [2, 0], [2, 3]])
  for i, (qy, qx) in enumerate(queries):
    np.testing.assert_allclose(weights[:, i], expected[:, qy * 4 + qx].reshape(2, 3, 4),
                               rtol=1e-5, atol=1e-6)
  # BoTNet's layout (N, heads, H, W, H, W): the mean over heads.
  six = ins.AttentionMap(jnp.asarray(np.random.default_rng(0).random((1, 2, 2, 3, 2, 3))),
                         "pixel_attention", "b/pixel_attention")
  np.testing.assert_allclose(ins.attention_grid(six, (4, 6)), np.asarray(six.value).mean(1),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="HW, HW"):
    ins.attention_grid(ins.AttentionMap(jnp.ones((1, 4, 5)), "pixel_attention", "q"), (2, 2))


def test_grad_cam_lives_in_its_own_module():
  from attention_flax import grad_cam as grad_cam_module
  assert callable(grad_cam_module.grad_cam) and callable(grad_cam_module.cam_from_gradients)
  assert not hasattr(ins, "grad_cam")
