"""Figures of attention: mask overlays, channel-gate strips, STN panels, Grad-CAM, branch
weights and where query pixels attend.

Channel-gate strips follow the analysis of SENet (Hu et al. 2018, Fig. 6,
https://arxiv.org/abs/1709.01507): the average gate per class shows which channels each
class excites. Grad-CAM: Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391. STN
panels: Jaderberg et al. 2015, https://arxiv.org/abs/1506.02025.

Every function builds a ``matplotlib.figure.Figure`` on its own Agg canvas, so nothing
touches pyplot's global state or the user's backend, returns it, and writes a PNG when
given ``path``. The PNG measures ``figsize * dpi`` pixels exactly (no tight bounding box).
Images may be normalised in any way: each is min-max scaled for display.

Drawing needs matplotlib and Pillow, the ``plot`` extra (``pip install
'attention_flax[plot]'``); the array helpers (``class_means``, ``grid_pixels``, ...) and
the import itself need only jax and numpy.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention_flax.sampling import affine_grid

if TYPE_CHECKING:
  from matplotlib.figure import Figure

DPI = 80
CELL = 1.3  # inches per image panel
EXTRA = "attention_flax[plot]"


def _missing(error: ImportError) -> ImportError:
  return ImportError(f"attention_flax.plot draws with matplotlib and Pillow, which are not "
                     f"installed ({error}); install them with: pip install '{EXTRA}'")


def new_figure(width: float, height: float) -> Figure:
  """A Figure of ``width`` x ``height`` inches drawn by its own Agg canvas.

  Raises:
    ImportError: naming the ``attention_flax[plot]`` extra when matplotlib is missing.
  """
  # Imported here so that the library imports without the plot extra.
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError as error:
    raise _missing(error) from error
  fig = Figure(figsize=(width, height), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def save(fig: Figure, path: str | None) -> Figure:
  """Writes ``fig`` as a PNG of exactly figsize * dpi pixels when ``path`` is given."""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, format="png")
  return fig


def to_palette(path: str, colors: int = 256) -> str:
  """Rewrites the PNG at ``path`` with at most ``colors`` colours (8-bit palette, Pillow's
  median cut), keeping its size in pixels; heat-map figures shrink to a third or less of
  their RGBA size, which keeps pictures committed to a repository small. Returns ``path``."""
  try:
    from PIL import Image
  except ImportError as error:
    raise _missing(error) from error
  if not 2 <= int(colors) <= 256:
    raise ValueError(f"to_palette needs 2 <= colors <= 256; got {colors}.")
  with Image.open(path) as im:
    rgb = im.convert("RGB")  # the figures are opaque: alpha carries nothing
  rgb.quantize(int(colors)).save(path, format="png", optimize=True)
  return path


def _images(images: Any, fn: str) -> np.ndarray:
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"{fn} expects (N, H, W, C) images with C = 1 or 3; got shape {x.shape}.")
  return x


def display(image: np.ndarray) -> np.ndarray:
  """(H, W, C) in any range -> (H, W) or (H, W, 3) in [0, 1], min-max scaled."""
  low, high = float(image.min()), float(image.max())
  scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
  return scaled[..., 0] if scaled.shape[-1] == 1 else scaled


def _show(ax, image: np.ndarray, title: str | None = None) -> None:
  shown = display(image)
  ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=7)


def upsample(maps: Any, size: tuple[int, int]) -> np.ndarray:
  """(N, h, w) maps -> (N, H, W) by bilinear interpolation (half-pixel centres)."""
  m = jnp.asarray(maps, jnp.float32)
  return np.asarray(jax.image.resize(m, (m.shape[0], int(size[0]), int(size[1])), "bilinear"))


def path_title(path: str, width: int = 22) -> str:
  """A module path as a title of lines at most ``width`` characters long, broken after a
  '/', so that the whole path, block names included, stays readable in a narrow column
  ("backbone/layer3_2/se/" "spatial/spatial_mask"). A single component longer than
  ``width`` gets a line of its own rather than being cut."""
  parts = path.split("/")
  # Each component keeps its trailing '/', so removing the line breaks gives the path back.
  tokens = [p + "/" for p in parts[:-1]] + [parts[-1]]
  lines = [tokens[0]]
  for token in tokens[1:]:
    if len(lines[-1]) + len(token) <= width:
      lines[-1] += token
    else:
      lines.append(token)
  return "\n".join(lines)


def _title_height(titles: Sequence[str]) -> float:
  """Inches above the top row for titles of fontsize 7: 0.3 for one line, more per line."""
  lines = max((t.count("\n") + 1 for t in titles), default=1)
  return 0.3 + 0.13 * (lines - 1)


def plot_overlays(images: Any, views: Mapping[str, Any], *, max_images: int = 6,
                  alpha: float = 0.5, cmap: str = "jet", path: str | None = None) -> Figure:
  """Spatial attention upsampled onto the inputs: one row per image, one column per map.

  Args:
    images: (N, H, W, C) inputs.
    views: {name: (N, h, w) map}, e.g. ``inspect.spatial_views(maps)`` or Grad-CAM maps.
      Values are shown on a fixed [0, 1] colour scale (gates and masks are in [0, 1]).
    max_images: rows drawn (the first images).
    alpha: opacity of the heat map.
  """
  x = _images(images, "plot_overlays")
  if not views:
    raise ValueError("plot_overlays needs at least one map; views is empty.")
  n = min(len(x), max_images)
  names = list(views)
  titles = [path_title(name) for name in names]
  top = _title_height(titles)
  fig = new_figure(CELL * (len(names) + 1), CELL * n + top)
  axes = fig.subplots(n, len(names) + 1, squeeze=False)
  for col, name in enumerate(names):
    up = upsample(np.asarray(views[name])[:n], x.shape[1:3])
    for row in range(n):
      ax = axes[row, col + 1]
      _show(ax, x[row], titles[col] if row == 0 else None)
      ax.imshow(up[row], cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
  for row in range(n):
    _show(axes[row, 0], x[row], "input" if row == 0 else None)
  fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - top / (CELL * n + top),
                      wspace=0.05, hspace=0.05)
  return save(fig, path)


def gate_matrix(gate: Any) -> np.ndarray:
  """(N, 1, 1, C) or (N, C) gates -> (C, N) float32, channels down, images across."""
  g = np.asarray(gate, np.float32)
  return g.reshape(g.shape[0], -1).T


def class_means(gate: Any, labels: Sequence[int], num_classes: int | None = None
                ) -> np.ndarray:
  """(C, classes) average gate per class (SENet Fig. 6); NaN for a class with no image."""
  g = gate_matrix(gate)
  labels = np.asarray(labels).astype(np.int64)
  k = int(num_classes if num_classes is not None else labels.max() + 1)
  out = np.full((g.shape[0], k), np.nan, np.float32)
  for c in range(k):
    if np.any(labels == c):
      out[:, c] = g[:, labels == c].mean(axis=1)
  return out


def plot_channel_gates(gates: Mapping[str, Any], labels: Sequence[int] | None = None, *,
                       num_classes: int | None = None, path: str | None = None) -> Figure:
  """One heat strip per gate (channels x images, images sorted by label), and with
  ``labels`` a second strip of the average gate per class (channels x classes).

  Args:
    gates: {path: (N, 1, 1, C) gate}, e.g. the "channel_gate" maps of a model.
    labels: (N,) class of each image, optional.
  """
  if not gates:
    raise ValueError("plot_channel_gates needs at least one gate; gates is empty.")
  names = list(gates)
  order = np.argsort(np.asarray(labels), kind="stable") if labels is not None else None
  cols = 2 if labels is not None else 1
  fig = new_figure(4.0 * cols, 1.6 * len(names) + 0.4)
  axes = fig.subplots(len(names), cols, squeeze=False)
  image = None
  for row, name in enumerate(names):
    m = gate_matrix(gates[name])
    if order is not None:
      m = m[:, order]
    ax = axes[row, 0]
    image = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    # The whole path: its block name is what tells the strips apart.
    ax.set_title(f"{path_title(name, 60)} ({m.shape[0]} ch)", fontsize=7)
    ax.set_ylabel("channel", fontsize=6)
    ax.tick_params(labelsize=5)
    if labels is not None:
      ax.set_xlabel("image (sorted by class)", fontsize=6)
      means = class_means(gates[name], labels, num_classes)
      cax = axes[row, 1]
      cax.imshow(means, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                 interpolation="nearest")
      cax.set_title("mean gate per class", fontsize=7)
      cax.set_xlabel("class", fontsize=6)
      cax.set_xticks(range(means.shape[1]))
      cax.tick_params(labelsize=5)
  fig.subplots_adjust(left=0.08, right=0.9, bottom=0.06, top=0.94, hspace=0.9, wspace=0.25)
  cbar_ax = fig.add_axes([0.92, 0.1, 0.015, 0.8])
  fig.colorbar(image, cax=cbar_ax).ax.tick_params(labelsize=5)
  return save(fig, path)


def grid_pixels(theta: Any, out_size: tuple[int, int], in_size: tuple[int, int],
                align_corners: bool = False) -> np.ndarray:
  """Where each output pixel samples the input: (N, H_out, W_out, 2) (x, y) in input pixel
  coordinates (0 = centre of the first pixel), from ``affine_grid`` points."""
  theta = jnp.asarray(theta, jnp.float32)
  grid = np.asarray(affine_grid(theta, (theta.shape[0], int(out_size[0]), int(out_size[1])),
                                align_corners=align_corners), np.float64)
  sizes = np.array([in_size[1], in_size[0]], np.float64)  # (W, H) for (x, y)
  if align_corners:
    return (grid + 1.0) / 2.0 * (sizes - 1.0)
  return ((grid + 1.0) * sizes - 1.0) / 2.0


def plot_stn(images: Any, theta: Any, outputs: Any, *, max_images: int = 6,
             lines: int = 7, align_corners: bool = False, path: str | None = None) -> Figure:
  """Per image: the input, the sampling grid drawn on it, and the transformed output.

  Args:
    images: (N, H, W, C) inputs of the transformer.
    theta: (N, 2, 3) transforms (output -> input coordinates), the sown "stn_theta".
    outputs: (N, H_out, W_out, C) sampled images, the sown "stn_output".
    lines: grid lines drawn per direction.
  """
  x = _images(images, "plot_stn")
  out = _images(outputs, "plot_stn")
  theta = np.asarray(theta, np.float32)
  if theta.shape != (len(x), 2, 3):
    raise ValueError(f"plot_stn expects theta of shape (N, 2, 3) = ({len(x)}, 2, 3); got "
                     f"{theta.shape}.")
  n = min(len(x), max_images)
  pts = grid_pixels(theta[:n], out.shape[1:3], x.shape[1:3], align_corners)
  h_out, w_out = out.shape[1:3]
  rows = np.unique(np.linspace(0, h_out - 1, lines).round().astype(int))
  cols = np.unique(np.linspace(0, w_out - 1, lines).round().astype(int))
  fig = new_figure(CELL * 3, CELL * n + 0.3)
  axes = fig.subplots(n, 3, squeeze=False)
  for i in range(n):
    _show(axes[i, 0], x[i], "input" if i == 0 else None)
    ax = axes[i, 1]
    _show(ax, x[i], "sampling grid" if i == 0 else None)
    for r in rows:
      ax.plot(pts[i, r, :, 0], pts[i, r, :, 1], color="tab:red", lw=0.6)
    for c in cols:
      ax.plot(pts[i, :, c, 0], pts[i, :, c, 1], color="tab:red", lw=0.6)
    corners = pts[i, [0, 0, -1, -1, 0], [0, -1, -1, 0, 0]]
    ax.plot(corners[:, 0], corners[:, 1], color="yellow", lw=1.0)
    ax.set_xlim(-0.5, x.shape[2] - 0.5)
    ax.set_ylim(x.shape[1] - 0.5, -0.5)
    _show(axes[i, 2], out[i], "output" if i == 0 else None)
  fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.3 / (CELL * n + 0.3),
                      wspace=0.05, hspace=0.05)
  return save(fig, path)


def plot_grad_cam(images: Any, cams: Any, *, labels: Sequence[int] | None = None,
                  predictions: Sequence[int] | None = None, max_images: int = 8,
                  alpha: float = 0.5, path: str | None = None) -> Figure:
  """Grad-CAM heat maps over their images: two rows (input, overlay), one column per image.

  Args:
    images: (N, H, W, C) inputs.
    cams: (N, H, W) maps in [0, 1] from ``inspect.grad_cam``.
    labels, predictions: optional (N,) classes, written above each column.
  """
  x = _images(images, "plot_grad_cam")
  c = np.asarray(cams, np.float32)
  if c.shape != x.shape[:3]:
    raise ValueError(f"plot_grad_cam expects cams of shape (N, H, W) = {x.shape[:3]}; got "
                     f"{c.shape}. Pass the output of inspect.grad_cam for these images.")
  n = min(len(x), max_images)
  fig = new_figure(CELL * n, CELL * 2 + 0.3)
  axes = fig.subplots(2, n, squeeze=False)
  for i in range(n):
    title = []
    if labels is not None:
      title.append(f"y={int(labels[i])}")
    if predictions is not None:
      title.append(f"p={int(predictions[i])}")
    _show(axes[0, i], x[i], " ".join(title) or None)
    _show(axes[1, i], x[i])
    axes[1, i].imshow(c[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0,
                      interpolation="bilinear")
  fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.3 / (CELL * 2 + 0.3),
                      wspace=0.05, hspace=0.05)
  return save(fig, path)


def plot_branch_weights(weights: Mapping[str, Any], *, image: int = 0,
                        path: str | None = None) -> Figure:
  """Per-channel branch weights of one image: one heat map (branches x channels) per module.

  Args:
    weights: {path: (N, P, C)}, e.g. the "branch_weights" maps (Selective Kernel's
      weights of its P kernels, split attention's of its radix splits; each column sums
      to one over the P branches for a softmax over them).
    image: which image of the N is drawn.
  """
  if not weights:
    raise ValueError("plot_branch_weights needs at least one map; weights is empty.")
  names = list(weights)
  fig = new_figure(6.0, 1.1 * len(names) + 0.5)
  axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
  shown = None
  for ax, name in zip(axes, names):
    w = np.asarray(weights[name], np.float32)
    if w.ndim != 3 or not 0 <= image < len(w):
      raise ValueError(f"plot_branch_weights expects (N, P, C) weights and 0 <= image < N; "
                       f"got shape {w.shape} for {name!r} and image={image}.")
    shown = ax.imshow(w[image], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    ax.set_title(f"{path_title(name, 60)} (image {image})", fontsize=7)
    ax.set_ylabel("branch", fontsize=6)
    ax.set_yticks(range(w.shape[1]))
    ax.tick_params(labelsize=5)
  axes[-1].set_xlabel("channel", fontsize=6)
  fig.subplots_adjust(left=0.08, right=0.88, bottom=0.12, top=0.9, hspace=1.0)
  fig.colorbar(shown, cax=fig.add_axes([0.9, 0.12, 0.015, 0.78])).ax.tick_params(labelsize=5)
  return save(fig, path)


def plot_pixel_attention(images: Any, views: Mapping[str, tuple[Any, Any]], *,
                         image: int = 0, alpha: float = 0.6,
                         path: str | None = None) -> Figure:
  """Where query pixels attend, over one image: a row per module, a column per query.

  Args:
    images: (N, H, W, C) inputs.
    views: {path: (queries, weights)} from ``inspect.pixel_views``: queries (P, 2) (qy, qx)
      on an h x w grid, weights (N, P, h, w). Each map is divided by its maximum (softmax
      rows are small) and upsampled over the image; a cross marks the query pixel.
    image: which image of the N is drawn.
  """
  x = _images(images, "plot_pixel_attention")
  if not views:
    raise ValueError("plot_pixel_attention needs at least one map; views is empty.")
  cols = max(len(np.asarray(q)) for q, _ in views.values())
  titles = [path_title(name) for name in views]
  top = _title_height(titles)
  fig = new_figure(CELL * (cols + 1), CELL * len(views) + top)
  axes = fig.subplots(len(views), cols + 1, squeeze=False)
  height, width = x.shape[1:3]
  for row, (title, (queries, weights)) in enumerate(zip(titles, views.values())):
    queries, w = np.asarray(queries), np.asarray(weights, np.float32)[image]
    # Pixel centres of the h x w grid in input pixels.
    ys = (queries[:, 0] + 0.5) * height / w.shape[1] - 0.5
    xs = (queries[:, 1] + 0.5) * width / w.shape[2] - 0.5
    peak = w.max(axis=(1, 2), keepdims=True)
    up = upsample(np.where(peak > 0, w / np.where(peak > 0, peak, 1.0), 0.0), (height, width))
    _show(axes[row, 0], x[image], title)
    axes[row, 0].plot(xs, ys, "w+", ms=6, mew=1.5)
    for col in range(cols):
      ax = axes[row, col + 1]
      if col >= len(queries):
        ax.set_axis_off()
        continue
      _show(ax, x[image], f"query ({queries[col, 0]}, {queries[col, 1]})" if row == 0 else None)
      ax.imshow(up[col], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
      ax.plot([xs[col]], [ys[col]], "w+", ms=8, mew=2.0)
  fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02,
                      top=1 - top / (CELL * len(views) + top), wspace=0.05, hspace=0.3)
  return save(fig, path)


__all__ = ["class_means", "display", "gate_matrix", "grid_pixels", "new_figure",
           "path_title", "plot_branch_weights", "plot_channel_gates", "plot_grad_cam",
           "plot_overlays", "plot_pixel_attention", "plot_stn", "save", "to_palette",
           "upsample"]
