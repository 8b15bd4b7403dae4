"""Tests of attention_flax.plot: PNGs decode at figsize * dpi, grid points by hand, gate
matrices and per-class means by hand, no pyplot state touched."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from attention_flax import plot


def _size(fig):
  w, h = fig.get_size_inches() * fig.dpi
  return int(round(w)), int(round(h))


def _decode(path):
  with Image.open(path) as im:
    im.load()
    return im.size, np.asarray(im.convert("L"), np.float32)


def test_overlay_png_decodes_at_the_figure_size(tmp_path):
  x = np.random.default_rng(0).normal(size=(3, 16, 16, 1)).astype(np.float32)
  views = {"a/spatial_mask": np.full((3, 4, 4), 0.5, np.float32),
           "b/residual_mask": np.linspace(0, 1, 3 * 8 * 8).reshape(3, 8, 8)}
  fig = plot.plot_overlays(x, views, path=str(tmp_path / "o.png"))
  size, pixels = _decode(tmp_path / "o.png")
  assert size == _size(fig) and pixels.std() > 0


def test_channel_gates_png_and_class_means(tmp_path):
  gates = np.array([0.1, 0.3, 0.5, 0.9], np.float32).reshape(4, 1, 1, 1) * np.ones((1, 1, 1, 3))
  gates[:, ..., 2] = 0.25
  labels = [0, 1, 0, 1]
  means = plot.class_means(gates, labels, num_classes=3)
  np.testing.assert_allclose(means[0], [0.3, 0.6, np.nan])  # (0.1 + 0.5) / 2, (0.3 + 0.9) / 2
  np.testing.assert_allclose(means[2, :2], [0.25, 0.25])
  assert plot.gate_matrix(gates).shape == (3, 4)
  fig = plot.plot_channel_gates({"layer1_0/se/channel_gate": gates}, labels,
                                path=str(tmp_path / "g.png"))
  size, _ = _decode(tmp_path / "g.png")
  assert size == _size(fig)


def test_grid_pixels_by_hand():
  identity = np.array([[[1, 0, 0], [0, 1, 0]]], np.float32)
  pts = plot.grid_pixels(identity, (4, 6), (4, 6))
  # The identity samples every output pixel at its own centre.
  np.testing.assert_allclose(pts[0, 2, 5], [5.0, 2.0], atol=1e-6)
  np.testing.assert_allclose(pts[0, 0, 0], [0.0, 0.0], atol=1e-6)
  # A zoom by 0.5 about the centre on an 8-pixel side: x = ((0.5 g + 1) * 8 - 1) / 2.
  zoom = np.array([[[0.5, 0, 0], [0, 0.5, 0]]], np.float32)
  pts = plot.grid_pixels(zoom, (8, 8), (8, 8))
  g0 = -7 / 8
  np.testing.assert_allclose(pts[0, 0, 0, 0], ((0.5 * g0 + 1) * 8 - 1) / 2, atol=1e-6)


def test_stn_panel_and_grad_cam_png(tmp_path):
  x = np.random.default_rng(1).uniform(size=(2, 12, 12, 1)).astype(np.float32)
  theta = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (2, 1, 1))
  fig = plot.plot_stn(x, theta, x, path=str(tmp_path / "s.png"))
  size, _ = _decode(tmp_path / "s.png")
  assert size == _size(fig)
  cams = np.zeros((2, 12, 12), np.float32)
  cams[:, :6, :6] = 1.0
  fig = plot.plot_grad_cam(x, cams, labels=[1, 2], predictions=[1, 3],
                           path=str(tmp_path / "c.png"))
  size, _ = _decode(tmp_path / "c.png")
  assert size == _size(fig)


def test_errors_and_no_pyplot_state():
  with pytest.raises(ValueError, match="C = 1 or 3"):
    plot.plot_overlays(np.zeros((2, 8, 8)), {"m": np.zeros((2, 2, 2))})
  with pytest.raises(ValueError, match="at least one map"):
    plot.plot_overlays(np.zeros((2, 8, 8, 1)), {})
  with pytest.raises(ValueError, match="inspect.grad_cam"):
    plot.plot_grad_cam(np.zeros((2, 8, 8, 1)), np.zeros((2, 4, 4)))
  with pytest.raises(ValueError, match=r"\(N, 2, 3\)"):
    plot.plot_stn(np.zeros((2, 8, 8, 1)), np.zeros((2, 6)), np.zeros((2, 8, 8, 1)))
  if "matplotlib.pyplot" in sys.modules:
    assert not sys.modules["matplotlib.pyplot"].get_fignums()


def test_titles_keep_the_whole_module_path():
  deep = "backbone/stage3/layer3_2/se/spatial/spatial_mask"
  title = plot.path_title(deep)
  assert title.replace("\n", "") == deep and "layer3_2" in title
  assert title.count("\n") >= 1 and max(len(line) for line in title.split("\n")) <= 22
  # A component longer than the width is kept whole on its own line.
  assert plot.path_title("a/" + "b" * 30 + "/c", width=10) == "a/\n" + "b" * 30 + "/\nc"
  x = np.random.default_rng(2).normal(size=(2, 8, 8, 1)).astype(np.float32)
  views = {deep: np.full((2, 4, 4), 0.5, np.float32),
           "layer1_0/se/spatial/spatial_mask": np.zeros((2, 8, 8), np.float32)}
  fig = plot.plot_overlays(x, views)
  column_titles = [fig.axes[i].get_title() for i in (1, 2)]  # row 0, after "input"
  assert [t.replace("\n", "") for t in column_titles] == list(views)
  assert "layer3_2" in column_titles[0] and "layer1_0" in column_titles[1]
  # The band above the first row grows with the lines, so no title leaves the figure.
  renderer = fig.canvas.get_renderer()
  fig.canvas.draw()
  height = fig.get_size_inches()[1] * fig.dpi
  for ax in fig.axes[:3]:
    assert ax.title.get_window_extent(renderer).y1 <= height
  gates = {"backbone/stage3/layer3_2/se/channel/channel_gate": np.full((2, 1, 1, 4), 0.5)}
  fig = plot.plot_channel_gates(gates)
  assert "backbone/stage3/layer3_2/se/channel/channel_gate (4 ch)" == fig.axes[0].get_title()


def test_stn_panel_of_an_identity_transform_shows_the_input_twice():
  import jax

  from attention_flax import inspect
  from attention_flax.layers.transformer import SpatialTransformer
  model = SpatialTransformer()  # its localisation net starts at the identity
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 24, 24, 1))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  maps = jax.jit(lambda v, images: inspect.attention_maps(model, v, images))(variables, x)
  np.testing.assert_array_equal(maps["stn_theta"].value[0], [[1, 0, 0], [0, 1, 0]])
  fig = plot.plot_stn(x, maps["stn_theta"].value, maps["stn_output"].value)
  for row in range(2):
    shown_input, grid, output = fig.axes[3 * row: 3 * row + 3]
    np.testing.assert_array_equal(output.get_images()[0].get_array(),
                                  shown_input.get_images()[0].get_array())
    # The grid's outline is the input's border: pixel centres 0 .. 23.
    outline = grid.get_lines()[-1].get_xydata()
    np.testing.assert_allclose(outline.min(0), [0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(outline.max(0), [23.0, 23.0], atol=1e-5)


def test_to_palette_keeps_the_picture_and_shrinks_the_file(tmp_path):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 16, 16, 1)).astype(np.float32)
  views = {"a/residual_mask": rng.uniform(size=(3, 16, 16)).astype(np.float32)}
  path = str(tmp_path / "o.png")
  plot.plot_overlays(x, views, path=path)
  before = path + ".rgba.png"
  with Image.open(path) as im:
    rgba = np.asarray(im.convert("RGB"), np.float32)
    im.save(before)
  assert plot.to_palette(path) == path
  with Image.open(path) as im:
    assert im.mode == "P" and im.size == (rgba.shape[1], rgba.shape[0])
    rgb = np.asarray(im.convert("RGB"), np.float32)
  # 256 colours for a heat map: each pixel moves a few levels at most on average.
  assert np.abs(rgb - rgba).mean() < 3.0
  assert os.path.getsize(path) < 0.6 * os.path.getsize(before)
  with pytest.raises(ValueError, match="colors <= 256"):
    plot.to_palette(path, colors=1000)


def test_branch_weights_draw_the_chosen_images_weights(tmp_path):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 2, 8))
  w = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
  weights = {"a/sk/attn/branch_weights": w, "b/splat/radix_weights": w[:, ::-1] * 0.5}
  fig = plot.plot_branch_weights(weights, image=1, path=str(tmp_path / "b.png"))
  size, pixels = _decode(tmp_path / "b.png")
  assert size == _size(fig) and pixels.std() > 0
  panels = [ax for ax in fig.axes if ax.images][:2]  # the colour bar comes last
  for ax, value in zip(panels, weights.values()):
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), value[1])
    assert ax.images[0].get_clim() == (0.0, 1.0)
  with pytest.raises(ValueError, match="N, P, C"):
    plot.plot_branch_weights({"x": w[0]})
  with pytest.raises(ValueError, match="empty"):
    plot.plot_branch_weights({})


def test_pixel_attention_overlays_each_querys_row_scaled_to_its_peak(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  weights = rng.random((2, 2, 4, 6)).astype(np.float32)
  weights /= weights.sum(axis=(2, 3), keepdims=True)
  queries = np.array([[2, 3], [0, 5]])
  fig = plot.plot_pixel_attention(x, {"nl/nl_attention": (queries, weights)}, image=1,
                                  path=str(tmp_path / "p.png"))
  size, pixels = _decode(tmp_path / "p.png")
  assert size == _size(fig) and pixels.std() > 0
  axes = fig.axes
  assert len(axes) == 3  # the input with every query marked, then one panel per query
  for i in range(2):
    drawn = np.asarray(axes[i + 1].images[1].get_array())
    expected = plot.upsample((weights[1, i] / weights[1, i].max())[None], (8, 12))[0]
    np.testing.assert_allclose(drawn, expected, rtol=1e-6)
    # The cross sits on the query's centre in input pixels (a 4 x 6 grid over 8 x 12).
    mark_x, mark_y = axes[i + 1].lines[0].get_data()
    assert (mark_x[0], mark_y[0]) == (queries[i, 1] * 2 + 0.5, queries[i, 0] * 2 + 0.5)
