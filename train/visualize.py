"""Pictures of a trained run: attention maps, channel gates, STN grids and Grad-CAM.

  python -m train.visualize --workdir=runs/default                 # -> runs/default/maps
  python -m train.visualize --workdir=DIR --num_images=16 --out=DIR/maps
  python -m train.visualize --timm=seresnet50 --weights=FILE --images=FILE_OR_DIR [--out=DIR]

From a run: the newest checkpoint of ``workdir/checkpoints`` and the run's
``workdir/config.json`` rebuild the model and the eval data; ``num_images`` eval images
are drawn. The maps are found by the kinds their layers declare (``attention_flax.inspect``),
a layer of your own included: channel gates go to channel_gates.png, each kind with a
spatial view to <kind>.png (spatial_mask.png, residual_mask.png, coord_gate.png,
context_weights.png, gather_gate.png, ...), for per-channel masks also their most varied
channels (<kind>_channels.png), the STN to stn.png, a hard-attention model's glimpse path
to glimpses.png, the per-channel weights of Selective
Kernel and split-attention branches to branch_weights.png, where the centre and corner
pixels of a non-local (or bottleneck) attention look to pixel_attention.png, plus
grad_cam_<stage>.png for the last stage; ``--palette`` stores them as 8-bit palette PNGs.
With ``--timm`` the converted pretrained weights (``attention_flax.convert.load_pretrained``)
are used on the given images instead (resized to the model's input size, or
``--image_size``; ImageNet normalisation; written to ``--out``, by default ``maps/NAME``).
``write_eval_overlay`` is the cheap single-picture variant for training.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention_flax import grad_cam as gc
from attention_flax import inspect as ins
from attention_flax import plot
from train import errors
# Shared with the trainer, which draws the eval overlay without importing this module.
from train.overlay import maps_fn as _maps_fn
from train.overlay import write_eval_overlay  # noqa: F401  (part of this module's API)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _file_name(kind: str) -> str:
  """A kind as a file name: a user's kind may hold any character."""
  return "".join(c if c.isalnum() or c in "_-." else "_" for c in kind)


def write_maps(model: Any, variables: Any, images: Any, out_dir: str, *,
               labels: Sequence[int] | None = None, num_classes: int | None = None,
               grad_cam_layer: str | None = None, palette: bool = False) -> list[str]:
  """Writes one PNG per kind of map ``model`` sows on ``images`` (the channel gates of
  every kind in one, see ``inspect.view_of``), for per-channel masks also one of their
  most varied channels (``<kind>_channels.png``; ``inspect.channel_views`` ranks them
  over all ``images``), ``branch_weights.png`` (first image) and ``pixel_attention.png``
  (``inspect.pixel_views``) when such maps are sown, and a Grad-CAM of the last sown stage
  (or ``grad_cam_layer``); returns the paths written. ``palette`` stores them as 8-bit palette
  PNGs (``plot.to_palette``), a third of the size or less."""
  os.makedirs(out_dir, exist_ok=True)
  images = jnp.asarray(images, jnp.float32)
  maps = _maps_fn(model)(variables, images)
  written = []
  gates = ins.by_view(maps, "gate")
  if gates:
    p = os.path.join(out_dir, "channel_gates.png")
    plot.plot_channel_gates({k: m.value for k, m in gates.items()}, labels,
                            num_classes=num_classes, path=p)
    written.append(p)
  for kind in ins.spatial_kinds(maps):
    of_kind = ins.by_kind(maps, kind)
    views = ins.spatial_views(of_kind)
    if views:
      p = os.path.join(out_dir, f"{_file_name(kind)}.png")
      plot.plot_overlays(images, views, path=p)
      written.append(p)
    per_channel = ins.channel_views(of_kind)
    if per_channel:
      # The channel mean can hide masks that favour opposite regions: show channels too.
      p = os.path.join(out_dir, f"{_file_name(kind)}_channels.png")
      plot.plot_overlays(images, per_channel, path=p)
      written.append(p)
  thetas = ins.by_kind(maps, "stn_theta")
  outputs = ins.by_kind(maps, "stn_output")
  if thetas and outputs:
    theta, output = next(iter(thetas.values())), next(iter(outputs.values()))
    p = os.path.join(out_dir, "stn.png")
    # The transformer of the registered models sees the model's input itself.
    plot.plot_stn(images, theta.value, output.value, path=p)
    written.append(p)
  glimpses = ins.by_kind(maps, "glimpse_location")
  if glimpses:  # hard attention: the glimpse path, a square per scale
    from attention_flax import plot_glimpses
    logits = model.apply(variables, images, **_train_kw(model))
    p = os.path.join(out_dir, "glimpses.png")
    plot_glimpses.plot_glimpses(images, next(iter(glimpses.values())).value,
                                plot_glimpses.model_glimpse_sides(model), labels=labels,
                                predictions=np.asarray(jnp.argmax(logits, -1)), path=p)
    written.append(p)
  branches = ins.by_view(maps, "branches")
  if branches:
    p = os.path.join(out_dir, "branch_weights.png")
    plot.plot_branch_weights({k: m.value for k, m in branches.items()}, path=p)
    written.append(p)
  pixels = ins.pixel_views(maps, images.shape[1:3])
  if pixels:
    p = os.path.join(out_dir, "pixel_attention.png")
    plot.plot_pixel_attention(images, pixels, path=p)
    written.append(p)
  layer = grad_cam_layer
  if layer is None:
    # Only the stages' shapes are needed: tracing gives them without running the model.
    shapes = jax.eval_shape(functools.partial(ins.features, model), variables, images[:1])
    stages = [k for k, v in shapes.items() if v.ndim == 4]
    layer = stages[-1] if stages else None
  if layer is not None:
    cams = gc.grad_cam(model, variables, images, layer)
    logits = model.apply(variables, images, **_train_kw(model))
    p = os.path.join(out_dir, f"grad_cam_{layer.replace('/', '_')}.png")
    plot.plot_grad_cam(images, cams, labels=labels,
                       predictions=np.asarray(jnp.argmax(logits, -1)), path=p)
    written.append(p)
  if palette:
    for p in written:
      plot.to_palette(p)
  return written


def _train_kw(model: Any) -> dict:
  return {"train": False} if ins._accepts_train(model) else {}  # pylint: disable=protected-access


# ------------------------------------------------------------------------ from a run


def load_run(workdir: str, num_images: int) -> dict[str, Any]:
  """Model, variables and ``num_images`` eval images (with labels) of a training run."""
  import ml_collections  # the run's config

  from train import checkpoint as ckpt_lib
  from train import data as data_lib
  from train.state import build_model

  config_path = os.path.join(workdir, "config.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isfile(config_path) or not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
        f"{workdir} is not a training run: it needs config.json and checkpoints/ (written by "
        f"`python -m train --workdir={workdir}`).")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  step, state = ckpt_lib.load_state(ckpt_dir)
  info = data_lib.get_info(config.data)
  meta_path = os.path.join(ckpt_dir, str(step), "meta", "metadata")
  num_classes = info.num_classes
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      num_classes = int(json.load(f).get("num_classes", num_classes))
  model = build_model(config, num_classes)
  variables = {"params": state["params"]}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  batch = next(iter(data_lib.eval_batches(config.data, batch_size=num_images,
                                          augment_on_device=False)))
  real = int(np.sum(batch["mask"]))
  return {"model": model, "variables": variables, "images": batch["image"][:real],
          "labels": batch["label"][:real], "num_classes": num_classes, "step": step}


def load_images(location: str, size: int, channels: int = 3,
                mean: Sequence[float] = (0.485, 0.456, 0.406),
                std: Sequence[float] = (0.229, 0.224, 0.225)) -> np.ndarray:
  """An image file or a folder of them -> (N, size, size, channels) normalised float32."""
  from PIL import Image

  if os.path.isdir(location):
    files = sorted(os.path.join(location, f) for f in os.listdir(location)
                   if f.lower().endswith(IMAGE_SUFFIXES))
  else:
    files = [location]
  if not files or not all(os.path.isfile(f) for f in files):
    raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) at {location!r}.")
  mode = "RGB" if channels == 3 else "L"
  out = []
  for name in files:
    with Image.open(name) as im:
      im = im.convert(mode).resize((size, size), Image.BILINEAR)
      a = np.asarray(im, np.float32).reshape(size, size, channels) / 255.0
    out.append((a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
  return np.stack(out).astype(np.float32)


def load_timm(name: str, weights: str, images: str, image_size: int | None = None,
              num_images: int | None = None) -> dict[str, Any]:
  """Model and variables from ``attention_flax.convert.load_pretrained`` and the first
  ``num_images`` images, resized to ``image_size`` (default: the model's input size)."""
  from attention_flax import convert, models

  model, variables = convert.load_pretrained(name, weights)  # checks the name first
  # A pretrained tag ("timm/seresnet50.a1_in1k") names the architecture before its dot.
  entry = models.model_info(convert.TIMM_MODELS[name.split("/")[-1].split(".")[0].lower()])
  x = load_images(images, image_size or entry.input_size, entry.in_channels)[:num_images]
  return {"model": model, "variables": variables, "images": x, "labels": None,
          "num_classes": None, "step": None}


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one-line UserErrors when ``one_line`` (the command line)."""

  def __init__(self, *args, one_line: bool = False, **kwargs):
    super().__init__(*args, **kwargs)
    self.one_line = one_line

  def error(self, message):
    if self.one_line:
      raise errors.UserError(f"{message.rstrip('.')}; python -m train.visualize --help "
                             "lists the options.")
    super().error(message)


def parse_args(argv: Sequence[str] | None, one_line: bool = False) -> argparse.Namespace:
  parser = _Parser(prog="python -m train.visualize", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter, one_line=one_line)
  parser.add_argument("--workdir", help="a training run (config.json + checkpoints/)")
  parser.add_argument("--num_images", type=int, default=16,
                      help="images to draw: a run's first eval images, or the first --images")
  parser.add_argument("--out", help="output folder (default: WORKDIR/maps, or maps/NAME "
                      "for --timm)")
  parser.add_argument("--layer", help="Grad-CAM layer (default: the last sown stage)")
  parser.add_argument("--timm", help="registered model name of converted timm weights")
  parser.add_argument("--weights", help="the timm/PyTorch weights file for --timm")
  parser.add_argument("--images", help="an image file or folder, for --timm")
  parser.add_argument("--palette", action="store_true",
                      help="write 8-bit palette PNGs (smaller files, e.g. for documentation)")
  parser.add_argument("--image_size", type=int,
                      help="side the --images are resized to (default: the model's input size)")
  parser.add_argument("--debug", action="store_true",
                      help=f"show the traceback of an error (also {errors.DEBUG_ENV}=1)")
  args = parser.parse_args(argv)
  if args.timm:
    if not (args.weights and args.images):
      parser.error("--timm needs --weights=FILE and --images=FILE_OR_DIR.")
  elif args.image_size is not None:
    parser.error("--image_size applies to --timm images; a run's images keep its config's size.")
  elif not args.workdir:
    parser.error("give --workdir=DIR (a training run) or --timm=NAME with --weights/--images.")
  if args.num_images < 1:
    parser.error(f"--num_images must be >= 1; got {args.num_images}.")
  if args.image_size is not None and args.image_size < 8:
    parser.error(f"--image_size must be >= 8; got {args.image_size}.")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry; returns 0 and prints one line per PNG written."""
  args = parse_args(argv)
  if args.timm:
    run = load_timm(args.timm, args.weights, args.images, args.image_size, args.num_images)
    out = args.out or os.path.join("maps", args.timm)
  else:
    run = load_run(args.workdir, args.num_images)
    out = args.out or os.path.join(args.workdir, "maps")
  written = write_maps(run["model"], run["variables"], run["images"], out,
                       labels=run["labels"], num_classes=run["num_classes"],
                       grad_cam_layer=args.layer, palette=args.palette)
  for p in written:
    print(p)
  return 0


def cli(argv: Sequence[str] | None = None) -> int:
  """:func:`main` for the command line: a user's problem (a bad option, a missing or
  unreadable run, weights file or image) ends with one ``error: <cause; fix>`` line and
  exit status 2; ``--debug`` or ATTENTION_FLAX_DEBUG=1 adds the traceback."""
  argv = sys.argv[1:] if argv is None else list(argv)
  debug = errors.debug_requested(argv)
  if not debug:  # orbax's notes on reading a run (read-only folders and the like)
    import logging  # pylint: disable=import-outside-toplevel
    logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    parse_args(argv, one_line=True)
    return main(argv)
  except Exception as err:  # pylint: disable=broad-except
    from train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    errors.exit_with(err, debug, (ValueError, TypeError, OSError, KeyError, ImportError,
                                  ckpt_lib.CheckpointError))


if __name__ == "__main__":
  sys.exit(cli())
