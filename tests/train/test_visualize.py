"""Tests of train/visualize.py: a smoke run of the default config, then the CLI in-process
writes PNGs that decode at the sizes the figure layout gives; write_eval_overlay writes
one; with --timm the gates drawn are timm's own gates for the same weights and images;
bad arguments say what to give."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from attention_flax import plot
from configs import default as default_config
from train import trainer
from train import visualize

DPI = plot.DPI


def gates_png_size(blocks, with_labels):
  """plot_channel_gates: 4 inches per column (strips, class means), 1.6 per gate + 0.4."""
  return (round(4.0 * (2 if with_labels else 1) * DPI), round((1.6 * blocks + 0.4) * DPI))


def grad_cam_png_size(images):
  """plot_grad_cam: one CELL-wide column per image, two CELL rows + a 0.3-inch title band."""
  return (round(plot.CELL * images * DPI), round((plot.CELL * 2 + 0.3) * DPI))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = default_config.get_config("smoke")
  config.plot_curves = False
  config.attention_png = True
  trainer.train_and_evaluate(config, workdir)
  return workdir


def test_training_writes_an_attention_png_at_evaluation(smoke_run):
  steps = default_config.get_config("smoke").num_train_steps
  # SE-ResNet-20 has no spatial maps: the strips of its last three gates, no labels.
  size = _decodes(os.path.join(smoke_run, "attention", f"step_{steps}.png"))
  assert size == gates_png_size(3, with_labels=False)


def _decodes(path):
  assert os.path.getsize(path) > 0
  with Image.open(path) as im:
    im.load()
    return im.size


def test_cli_writes_pngs_of_the_run(smoke_run, tmp_path, capsys):
  out = str(tmp_path / "maps")
  assert visualize.main([f"--workdir={smoke_run}", "--num_images=4", f"--out={out}"]) == 0
  names = sorted(os.listdir(out))
  # The default model is an SE-ResNet-20: channel gates (9 blocks, with the class means
  # of the labelled eval images) and a Grad-CAM of stage 3 over the 4 images.
  assert names == ["channel_gates.png", "grad_cam_stage3.png"]
  assert _decodes(os.path.join(out, names[0])) == gates_png_size(9, with_labels=True)
  assert _decodes(os.path.join(out, names[1])) == grad_cam_png_size(4)
  assert capsys.readouterr().out.split() == [os.path.join(out, n) for n in names]
  small = str(tmp_path / "small")
  visualize.main([f"--workdir={smoke_run}", "--num_images=4", f"--out={small}", "--palette"])
  for name in names:  # the same pictures, 8-bit palette
    with Image.open(os.path.join(small, name)) as im:
      assert im.mode == "P" and im.size == _decodes(os.path.join(out, name))


def test_write_eval_overlay(smoke_run, tmp_path):
  run = visualize.load_run(smoke_run, 3)
  assert run["images"].shape == (3, 16, 16, 1) and run["num_classes"] == 10
  path = visualize.write_eval_overlay(run["model"], run["variables"], run["images"],
                                      str(tmp_path / "eval.png"))
  assert path == str(tmp_path / "eval.png")
  _decodes(path)


def test_bad_arguments(tmp_path):
  with pytest.raises(SystemExit):
    visualize.main([])
  with pytest.raises(FileNotFoundError, match="not a training run"):
    visualize.main([f"--workdir={tmp_path}"])
  with pytest.raises(SystemExit):
    visualize.main(["--timm=seresnet50"])  # needs --weights and --images
  with pytest.raises(SystemExit):
    visualize.main([f"--workdir={tmp_path}", "--image_size=64"])  # only for --timm
  with pytest.raises(FileNotFoundError, match="download it first"):
    visualize.main(["--timm=seresnet18", f"--weights={tmp_path / 'w.safetensors'}",
                    f"--images={tmp_path}", f"--out={tmp_path / 'maps'}"])
  with pytest.raises(ValueError, match="Unsupported timm model"):
    visualize.load_timm("vit_base", "w.safetensors", str(tmp_path))


def test_load_images(tmp_path):
  Image.fromarray(np.full((10, 20, 3), 255, np.uint8)).save(tmp_path / "a.png")
  x = visualize.load_images(str(tmp_path), 8, 3, mean=(0.5,) * 3, std=(0.5,) * 3)
  assert x.shape == (1, 8, 8, 3)
  np.testing.assert_allclose(x, 1.0)


def test_cli_on_timm_weights_draws_timms_own_gates(tmp_path, capsys, monkeypatch):
  torch = pytest.importorskip("torch", reason="the --timm test builds weights with torch "
                              "(pip install 'attention_flax[parity]')")
  timm = pytest.importorskip("timm", reason="the --timm test needs timm (extra: parity)")
  st_numpy = pytest.importorskip("safetensors.numpy", reason="needs safetensors (extra: parity)")
  torch.manual_seed(0)
  ref = timm.create_model("seresnet18", pretrained=False).eval()
  # timm starts every block's last BN scale at 0, which zeroes each SE input and makes
  # all gates equal whatever the image; random statistics make them depend on it.
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 1.5)
  weights = tmp_path / "seresnet18.safetensors"
  st_numpy.save_file({k: v.numpy() for k, v in ref.state_dict().items()}, str(weights))
  pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  (tmp_path / "images").mkdir()
  for i, image in enumerate(pixels):  # 64x64 already: the CLI's resize keeps every pixel
    Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")

  drawn = {}
  original = plot.plot_channel_gates

  def spy(gates, *args, **kwargs):
    drawn.update({k: np.asarray(v) for k, v in gates.items()})
    return original(gates, *args, **kwargs)

  monkeypatch.setattr(plot, "plot_channel_gates", spy)
  out = tmp_path / "maps"
  assert visualize.main(["--timm=seresnet18", f"--weights={weights}",
                         f"--images={tmp_path / 'images'}", "--image_size=64",
                         f"--out={out}"]) == 0
  names = ["channel_gates.png", "grad_cam_stage4.png"]
  assert sorted(os.listdir(out)) == names
  assert capsys.readouterr().out.split() == [str(out / n) for n in names]
  assert _decodes(out / names[0]) == gates_png_size(8, with_labels=False)
  assert _decodes(out / names[1]) == grad_cam_png_size(2)

  # timm's gates on the same images, normalised by hand with ImageNet's mean and std.
  expected = {}
  for block_name, block in ref.named_modules():
    if block_name.endswith(".se"):
      flax_path = block_name[:-len(".se")].replace(".", "_") + "/se/channel_gate"
      block.gate.register_forward_hook(
          lambda mod, inp, outp, key=flax_path: expected.__setitem__(key, outp.numpy()))
  x = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  with torch.no_grad():
    ref(torch.from_numpy(x.transpose(0, 3, 1, 2)).float())
  assert list(drawn) == list(expected) and len(drawn) == 8  # two blocks in each of 4 stages
  for key, gate in expected.items():
    assert drawn[key].shape == (2, 1, 1, gate.shape[1])
    np.testing.assert_allclose(drawn[key][:, 0, 0, :], gate[:, :, 0, 0], atol=1e-4,
                               err_msg=key)
  # The gates vary with the image, so a mix-up of images or weights would show.
  last = drawn["layer4_1/se/channel_gate"]
  assert np.abs(last[0] - last[1]).max() > 1e-3


def test_eval_overlay_of_residual_masks_shows_their_most_varied_channels(tmp_path,
                                                                         monkeypatch):
  import jax
  from flax import linen as nn

  from attention_flax.layers import ResidualAttention

  class TwoModules(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(8, (3, 3), padding=1)(x)
      x = ResidualAttention(levels=1, name="attn1")(x, train=train)
      return ResidualAttention(levels=1, name="attn2")(x, train=train)

  model = TwoModules()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(1), x)
  drawn = {}
  original = plot.plot_overlays

  def spy(images, views, **kwargs):
    drawn.update({k: np.asarray(v) for k, v in views.items()})
    return original(images, views, **kwargs)

  monkeypatch.setattr(plot, "plot_overlays", spy)
  visualize.write_eval_overlay(model, variables, x, str(tmp_path / "eval.png"))
  _decodes(tmp_path / "eval.png")
  _, state = model.apply(variables, x, mutable=["intermediates"])
  expected = {}
  for name in ("attn1", "attn2"):
    mask = np.asarray(state["intermediates"][name]["residual_mask"][0])  # (3, 8, 8, 8)
    c = int(np.argmax(mask.std(axis=(1, 2)).mean(0)))
    expected[f"{name}/residual_mask[{c}]"] = mask[..., c]
  assert list(drawn) == list(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(drawn[key], value, atol=1e-6)


def test_write_maps_draws_a_users_kinds_by_their_shape(tmp_path, monkeypatch):
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  class UserMaps(nn.Module):
    """Kinds outside the library's vocabulary: a mask, a per-channel mask, a gate."""
    maps = {"saliency": "user/saliency", "mixed": "mixed", "scale": "scale"}

    @nn.compact
    def __call__(self, x):
      s = jax.nn.sigmoid(x * self.param("one", nn.initializers.ones, (1,)))
      self.sow("intermediates", "saliency", jnp.mean(s, -1, keepdims=True))
      self.sow("intermediates", "mixed", s)
      self.sow("intermediates", "scale", jnp.mean(s, (1, 2), keepdims=True))
      return jnp.mean(x, (1, 2))

  model = UserMaps()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 3))
  variables = {"params": model.init(jax.random.PRNGKey(1), x)["params"]}
  overlays, gates = [], {}
  draw_overlays, draw_gates = plot.plot_overlays, plot.plot_channel_gates

  def spy_overlays(images, views, **kwargs):
    overlays.append({k: np.asarray(v) for k, v in views.items()})
    return draw_overlays(images, views, **kwargs)

  def spy_gates(g, *args, **kwargs):
    gates.update({k: np.asarray(v) for k, v in g.items()})
    return draw_gates(g, *args, **kwargs)

  monkeypatch.setattr(plot, "plot_overlays", spy_overlays)
  monkeypatch.setattr(plot, "plot_channel_gates", spy_gates)
  written = visualize.write_maps(model, variables, x, str(tmp_path))
  # No stage is sown, so no Grad-CAM; the kind's '/' does not make a folder. The kinds
  # come in the order of their paths (the jitted maps are a dict, sorted by jax).
  assert [os.path.basename(p) for p in written] == [
      "channel_gates.png", "mixed.png", "mixed_channels.png", "user_saliency.png"]
  for p in written:
    _decodes(p)
  s = np.asarray(jax.nn.sigmoid(x))
  assert list(gates) == ["scale"]
  np.testing.assert_allclose(gates["scale"], s.mean((1, 2), keepdims=True), rtol=1e-6)
  mixed, channels, saliency = overlays
  np.testing.assert_allclose(saliency["saliency"], s.mean(-1), rtol=1e-6)
  np.testing.assert_allclose(mixed["mixed"], s.mean(-1), rtol=1e-6)
  # The 3 channels, most varied first.
  order = np.argsort(-s.std(axis=(1, 2)).mean(0), kind="stable")[:3]
  assert list(channels) == [f"mixed[{c}]" for c in order]
  for c in order:
    np.testing.assert_allclose(channels[f"mixed[{c}]"], s[..., c], rtol=1e-6)


def test_write_maps_draws_branch_weights_and_pixel_attention(tmp_path, monkeypatch):
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  from attention_flax.layers import NonLocal, SelectiveKernel, SplitAttention

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(8, (3, 3))(x)
      x = SelectiveKernel(name="sk")(x, train)
      x = SplitAttention(name="splat")(x, train)
      x = NonLocal(rd_channels=4, name="nl")(x, train)
      return nn.Dense(3)(jnp.mean(x, (1, 2)))

  model = Net()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  drawn = {}
  draw_branches, draw_pixels = plot.plot_branch_weights, plot.plot_pixel_attention

  def spy_branches(weights, **kwargs):
    drawn["branches"] = {k: np.asarray(v) for k, v in weights.items()}
    return draw_branches(weights, **kwargs)

  def spy_pixels(images, views, **kwargs):
    drawn["pixels"] = {k: (np.asarray(q), np.asarray(w)) for k, (q, w) in views.items()}
    return draw_pixels(images, views, **kwargs)

  monkeypatch.setattr(plot, "plot_branch_weights", spy_branches)
  monkeypatch.setattr(plot, "plot_pixel_attention", spy_pixels)
  written = visualize.write_maps(model, variables, x, str(tmp_path))
  assert [os.path.basename(p) for p in written] == ["branch_weights.png",
                                                    "pixel_attention.png"]
  for p in written:
    _decodes(p)
  _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, x)
  sown = state["intermediates"]
  assert list(drawn["branches"]) == ["sk/attn/branch_weights", "splat/radix_weights"]
  # Drawn from the jitted maps: equal to the eager ones up to float32 rounding.
  np.testing.assert_allclose(drawn["branches"]["sk/attn/branch_weights"],
                             sown["sk"]["attn"]["branch_weights"][0], rtol=1e-5)
  np.testing.assert_allclose(drawn["branches"]["splat/radix_weights"],
                             sown["splat"]["radix_weights"][0], rtol=1e-5)
  queries, weights = drawn["pixels"]["nl/nl_attention"]
  rows = np.asarray(sown["nl"]["nl_attention"][0])  # (2, 48, 48), the 6 x 8 map
  assert len(queries) == 5 and weights.shape == (2, 5, 6, 8)
  for i, (qy, qx) in enumerate(queries):
    np.testing.assert_allclose(weights[:, i], rows[:, qy * 8 + qx].reshape(2, 6, 8),
                               rtol=1e-5)


def test_write_maps_draws_the_masks_of_a_bam_resnet(tmp_path, monkeypatch):
  import jax

  from attention_flax.models.resnet import BasicBlock, ResNet

  model = ResNet(stage_sizes=(1, 1), block=BasicBlock, widths=(8, 16), num_classes=3,
                 stage_attn="bam", stage_attn_after=(1,), stage_attn_kwargs={"rd_channels": 2})
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  overlays = []
  draw = plot.plot_overlays

  def spy(images, views, **kwargs):
    overlays.append({k: np.asarray(v) for k, v in views.items()})
    return draw(images, views, **kwargs)

  monkeypatch.setattr(plot, "plot_overlays", spy)
  written = visualize.write_maps(model, variables, x, str(tmp_path))
  names = [os.path.basename(p) for p in written]
  assert names[0] == "channel_gates.png"  # BAM's channel branch (N, 1, 1, C)
  assert names[-1] == "grad_cam_stage2.png"  # the last sown stage, found by tracing
  assert {"residual_mask.png", "residual_mask_channels.png"} <= set(names)
  _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, x)
  mask = np.asarray(state["intermediates"]["bam1"]["bam_mask"][0])
  means = next(o for o in overlays if "bam1/bam_mask" in o)
  np.testing.assert_allclose(means["bam1/bam_mask"], mask.mean(-1), rtol=1e-5)
