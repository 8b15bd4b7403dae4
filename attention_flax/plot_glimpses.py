"""Where a hard-attention model looked: the glimpse path of the Recurrent Attention Model
(Mnih et al. 2014, https://arxiv.org/abs/1406.6247, Fig. 3) drawn on its images.

Needs matplotlib, the ``plot`` extra, as :mod:`attention_flax.plot` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from attention_flax import plot
from attention_flax.glimpses import glimpse_starts

if TYPE_CHECKING:
  from matplotlib.figure import Figure


def glimpse_sides(size: int, num_scales: int, scale: int) -> tuple[int, ...]:
  """The pixel side of each patch of a glimpse: size * scale**k, k = 0 .. num_scales - 1."""
  return tuple(int(size) * int(scale) ** k for k in range(int(num_scales)))


def model_glimpse_sides(model: Any) -> tuple[int, ...]:
  """:func:`glimpse_sides` of a model with the fields glimpse_size, num_scales and
  glimpse_scale (:class:`attention_flax.models.ram.RecurrentAttentionModel`)."""
  missing = [f for f in ("glimpse_size", "num_scales", "glimpse_scale")
             if not hasattr(model, f)]
  if missing:
    raise ValueError(f"{type(model).__name__} has no field {missing[0]}; pass the patch "
                     "sides to plot_glimpses yourself (sides=(12, 24, 48)).")
  return glimpse_sides(model.glimpse_size, model.num_scales, model.glimpse_scale)


def plot_glimpses(images: Any, locations: Any, sides: Sequence[int], *,
                  labels: Sequence[int] | None = None,
                  predictions: Sequence[int] | None = None, max_images: int = 6,
                  path: str | None = None) -> Figure:
  """One panel per image: the glimpse locations joined in order (numbered from 1, coloured
  from dark to light), and a square for every scale of every glimpse, the exact pixels
  :func:`attention_flax.glimpses.extract_glimpses` reads (thicker for the first scale).

  Args:
    images: (N, H, W, C) images, C = 1 or 3, in any range (min-max scaled for display).
    locations: (N, T, 2) (x, y) glimpse centres in [-1, 1], the sown "locations".
    sides: the pixel side of each scale, e.g. :func:`glimpse_sides` (12, 2, 3) = (12, 24, 48).
    labels, predictions: optional per-image classes for the titles.
  """
  x = np.asarray(images, np.float32)
  loc = np.asarray(locations, np.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"plot_glimpses expects (N, H, W, C) images with C = 1 or 3; got "
                     f"shape {x.shape}.")
  if loc.ndim != 3 or loc.shape[0] != x.shape[0] or loc.shape[2] != 2:
    raise ValueError(f"plot_glimpses expects locations of shape (N, T, 2) = ({x.shape[0]}, "
                     f"T, 2); got {loc.shape}.")
  if not sides:
    raise ValueError("plot_glimpses needs the side of at least one scale, e.g. sides=(12,).")
  from matplotlib import cm, patches  # after the image checks: the plot extra

  n, t = min(len(x), max_images), loc.shape[1]
  h, w = x.shape[1:3]
  fig = plot.new_figure(plot.CELL * 1.6 * n, plot.CELL * 1.6 + 0.3)
  axes = fig.subplots(1, n, squeeze=False)[0]
  colours = cm.viridis(np.linspace(0.0, 0.9, t))
  for i in range(n):
    ax = axes[i]
    shown = plot.display(x[i])
    ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    # Pixel j's centre is at (2j + 1) / n - 1 in [-1, 1].
    px = ((loc[i, :, 0] + 1.0) * w - 1.0) / 2.0
    py = ((loc[i, :, 1] + 1.0) * h - 1.0) / 2.0
    ax.plot(px, py, color="white", lw=0.8, alpha=0.8)
    for step in range(t):
      for k, side in enumerate(sides):
        row, col = np.asarray(glimpse_starts(loc[i, step][None], int(side), h, w))[0]
        ax.add_patch(patches.Rectangle((col - 0.5, row - 0.5), side, side, fill=False,
                                       edgecolor=colours[step], lw=1.4 if k == 0 else 0.6,
                                       alpha=1.0 if k == 0 else 0.5))
      ax.text(px[step], py[step], str(step + 1), color=colours[step], fontsize=7,
              ha="center", va="center", fontweight="bold")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    title = []
    if labels is not None:
      title.append(f"label {int(labels[i])}")
    if predictions is not None:
      title.append(f"pred {int(predictions[i])}")
    if title:
      ax.set_title(", ".join(title), fontsize=7)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.88, wspace=0.05)
  return plot.save(fig, path)
