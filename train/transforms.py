"""Image operations and the picklable steps of the input pipeline (``train.data``).

The operations take and return (H, W, C) numpy images: float32 in [0, 1], or uint8 pixels
(0..255) on the path that leaves normalisation to the device. The steps are frozen
dataclasses at module level, so that grain can send them to its worker processes:
:class:`Decode` -> :class:`TrainAugment` or :class:`EvalResize` -> :class:`Collate` (the
batch function, which normalises float images into one array per batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

# ITU-R 601 luma, the weights of Pillow's RGB -> "L" conversion.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# ------------------------------------------------------------------ image operations


def to_float(image: Any) -> np.ndarray:
  """uint8 0..255 -> float32 [0, 1]; floating images are taken to be in [0, 1] already."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype == np.uint8:
    return image.astype(np.float32) / np.float32(255.0)
  if np.issubdtype(image.dtype, np.floating):
    # No copy of float32 images: every later step writes into arrays of its own.
    return image.astype(np.float32, copy=False)
  raise TypeError(f"Images must be uint8 (0..255) or float ([0, 1]); got {image.dtype}.")


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Grayscale -> RGB by repetition, RGB -> grayscale by luma; an alpha channel is dropped.
  The dtype is kept (uint8 luma is rounded)."""
  have = image.shape[-1]
  if have == 4:
    image, have = image[..., :3], 3
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if have == 3 and channels == 1:
    luma = image @ _LUMA
    if image.dtype == np.uint8:  # Rounded to the nearest level, as Pillow's "L" does.
      return np.rint(luma)[..., None].astype(np.uint8)
    return luma[..., None].astype(np.float32)
  raise ValueError(f"Cannot turn {have}-channel images into {channels} channels; set "
                   "config.data.channels to 1 or 3.")


def resize(image: np.ndarray, height: int, width: int,
           box: tuple[float, float, float, float] | None = None,
           mirror: bool = False) -> np.ndarray:
  """Bilinear resize of (H, W, C) (of ``box`` = (left, top, right, bottom) if given) to
  (height, width, C) with Pillow, which filters properly when shrinking; ``mirror`` flips
  the result left-right (by Pillow, before it becomes an array).

  float32 images are resized one float plane at a time; uint8 images stay uint8 and are
  resized by Pillow's 8-bit path, rounded to whole levels (torchvision's transforms on
  PIL images do the same).
  """
  if box is None and image.shape[:2] == (height, width):
    return image[:, ::-1] if mirror else image

  def resized(pil: Image.Image) -> np.ndarray:
    pil = pil.resize((width, height), Image.Resampling.BILINEAR, box=box)
    return np.asarray(pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else pil)

  if image.dtype == np.uint8 and image.shape[-1] in (1, 3):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return resized(pil).reshape(height, width, image.shape[-1])
  # Pillow resizes one float plane at a time; writing each into its channel of one
  # preallocated array is 4x cheaper at 224x224x3 than stacking the planes.
  out = np.empty((height, width, image.shape[-1]), np.float32)
  for c in range(image.shape[-1]):
    out[..., c] = resized(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32)))
  return out


def random_crop(image: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
  """Zero-pads ``padding`` pixels on every side, then crops back to the input size at a
  uniformly random offset (the CIFAR augmentation); ``padding=0`` returns the input."""
  if padding <= 0:
    return image
  h, w, _ = image.shape
  top, left = (int(v) - padding for v in rng.integers(0, 2 * padding + 1, size=2))
  # The window's overlap with the image is copied and only the margins around it are
  # zeroed: no padded copy is built, and no pixel is written twice.
  out = np.empty_like(image)
  rows, cols = h - abs(top), w - abs(left)
  if rows <= 0 or cols <= 0:
    out[...] = 0
    return out
  r0, c0 = max(0, -top), max(0, -left)
  out[r0:r0 + rows, c0:c0 + cols] = (
      image[max(0, top):max(0, top) + rows, max(0, left):max(0, left) + cols])
  out[:r0] = 0
  out[r0 + rows:] = 0
  out[r0:r0 + rows, :c0] = 0
  out[r0:r0 + rows, c0 + cols:] = 0
  return out


def resize_and_crop(image: np.ndarray, size: int, offset: tuple[int, int] = (0, 0),
                    mirror: bool = False) -> np.ndarray:
  """``image`` resized to (size, size), zero-padded, cropped back to (size, size) with its
  top-left corner at ``offset`` (rows, columns, each in [-size, size]) from the resized
  image's, and mirrored left-right if asked: :func:`random_crop`'s window of
  :func:`resize`'s output, after :func:`random_flip`'s mirror.

  Only the part of the resized image that the window keeps is computed (Pillow's ``box``),
  and it is mirrored by Pillow before it becomes an array: at 224 x 224 from 32 x 32 this
  is 1.15x cheaper than resizing, cropping and mirroring in turn. The box moves Pillow's
  sample positions by a float rounding, so uint8 results may differ from the three steps'
  by a level (rarely two) on a few percent of the pixels, float ones by about 1e-6; an
  image already (size, size) is only cropped, exactly.
  """
  top, left = (int(v) for v in offset)
  h, w, channels = image.shape
  rows, cols = size - abs(top), size - abs(left)
  out = np.zeros((size, size, channels), image.dtype)
  if rows <= 0 or cols <= 0:
    return out
  r0, c0 = max(0, -top), max(0, -left)  # where the kept part lands in the window
  r1, c1 = max(0, top), max(0, left)  # and where it starts in the resized image
  if (h, w) == (size, size):
    part = image[r1:r1 + rows, c1:c1 + cols]
    part = part[:, ::-1] if mirror else part
  else:
    box = (c1 * w / size, r1 * h / size, (c1 + cols) * w / size, (r1 + rows) * h / size)
    part = resize(image, rows, cols, box=box, mirror=mirror)
  if mirror:
    c0 = size - c0 - cols
  _fill(out[r0:r0 + rows, c0:c0 + cols], part)
  return out


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors left-right with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        min_area: float = 0.08,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop (timm's RandomResizedCrop): area fraction uniform in
  [min_area, 1], log aspect ratio uniform in log(ratio), 10 tries, else a centred crop of
  the clamped aspect ratio; resized to (size, size)."""
  top, left, ch, cw = random_resized_box(image.shape[:2], rng, min_area, ratio)
  return resize(image, size, size, box=(left, top, left + cw, top + ch))


def random_resized_box(shape: tuple[int, int], rng: np.random.Generator,
                       min_area: float = 0.08, ratio: tuple[float, float] = (3 / 4, 4 / 3)
                       ) -> tuple[int, int, int, int]:
  """The (top, left, height, width) window that :func:`random_resized_crop` draws from an
  image of ``shape`` (H, W)."""
  h, w = shape
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    area = h * w * rng.uniform(min_area, 1.0)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(area * aspect)))
    ch = int(round(math.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return top, left, ch, cw
  aspect = w / h
  if aspect < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif aspect > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def center_crop(image: np.ndarray, size: int, crop_pct: float = 0.875) -> np.ndarray:
  """Resizes the shorter side to floor(size / crop_pct), then takes the central
  (size, size) window (timm's eval transform)."""
  nh, nw, top, left = _center_crop_geometry(image.shape[:2], size, crop_pct)
  image = resize(image, nh, nw)
  return image[top:top + size, left:left + size]


def _center_crop_geometry(shape: tuple[int, int], size: int, crop_pct: float
                          ) -> tuple[int, int, int, int]:
  """:func:`center_crop`'s resized (height, width) and the window's (top, left) in it."""
  h, w = shape
  short = math.floor(size / crop_pct)
  nh, nw = (short, max(short, round(w * short / h))) if h <= w else (
      max(short, round(h * short / w)), short)
  return nh, nw, (nh - size) // 2, (nw - size) // 2


def _device_view(example: dict[str, Any], box: tuple[float, float, float, float],
                 mirror: bool) -> dict[str, Any]:
  """The stored image with the source window that the device resizes to the output
  ((top, left, height, width) in source pixels, float32; outside the image is zero
  padding) and whether it then mirrors it."""
  return {"image": example["image"], "label": example["label"],
          "box": np.asarray(box, np.float32), "mirror": np.bool_(mirror)}


# ------------------------------------------------- pipeline steps (top level: picklable)


@dataclasses.dataclass(frozen=True)
class Decode:
  """Source example -> {"image": (H, W, channels) float32 in [0, 1], "label": int32};
  other fields (tfds ids, file names) are dropped so that batching sees arrays only.
  A grayscale image bound for 3 channels stays (H, W, 1): augmenting one plane is a third
  of the work, and :class:`Collate` writes it into every channel. With ``keep_uint8``
  uint8 images stay uint8 (0..255) for the device to normalise (:func:`normalize_images`
  in ``train.device_augment``); float images are converted as always."""
  channels: int
  keep_uint8: bool = False

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(example["image"])
    if self.keep_uint8 and image.dtype == np.uint8:
      image = image[..., None] if image.ndim == 2 else image
    else:
      image = to_float(image)
    if image.shape[-1] != 1:
      image = match_channels(image, self.channels)
    return {"image": image, "label": np.int32(example["label"])}


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """Random-resized crop, or resize + random crop with padding; then optional flip.

  With ``on_device`` the image is left as it is and the draws travel with it: "box"
  (float32 (4,): the source window (top, left, height, width) that becomes the output,
  reaching into the zero padding for a padded crop) and "mirror" (bool), for
  ``train.device_augment`` to apply in the jitted step. The draws are the same as the
  host's, in the same order, so both paths see the same crops for a seed.
  """
  image_size: int
  crop_padding: int = 0
  flip: bool = False
  random_resized_crop: bool = False
  min_area: float = 0.08
  on_device: bool = False

  def __call__(self, example: dict[str, np.ndarray], rng: np.random.Generator):
    image = example["image"]
    if self.random_resized_crop:
      if self.on_device:
        box = random_resized_box(image.shape[:2], rng, self.min_area)
        return _device_view(example, box, self.flip and rng.random() < 0.5)
      image = random_resized_crop(image, rng, self.image_size, self.min_area)
      if self.flip:
        image = random_flip(image, rng)
      return {"image": image, "label": example["label"]}
    # random_crop(resize(image)) then random_flip, drawn in that order, made in one step.
    padding = self.crop_padding
    offset = (rng.integers(0, 2 * padding + 1, size=2) - padding) if padding > 0 else (0, 0)
    mirror = self.flip and rng.random() < 0.5
    if self.on_device:
      (h, w), size = image.shape[:2], self.image_size
      top, left = (int(v) for v in offset)
      return _device_view(example, (top * h / size, left * w / size, h, w), mirror)
    if padding > 0:
      image = resize_and_crop(image, self.image_size, offset, mirror)
    else:
      image = resize(image, self.image_size, self.image_size, mirror=mirror)
    return {"image": image, "label": example["label"]}


@dataclasses.dataclass(frozen=True)
class EvalResize:
  """Deterministic eval view: centre crop after resize (ImageNet-style) or plain resize.
  With ``on_device`` the image is left as it is, with the "box" of that view and a false
  "mirror" for ``train.device_augment`` (see :class:`TrainAugment`)."""
  image_size: int
  crop: bool = False
  crop_pct: float = 0.875
  on_device: bool = False

  def __call__(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    image = example["image"]
    if self.on_device:
      (h, w), size = image.shape[:2], self.image_size
      if not self.crop:
        return _device_view(example, (0, 0, h, w), False)
      nh, nw, top, left = _center_crop_geometry((h, w), size, self.crop_pct)
      return _device_view(example, (top * h / nh, left * w / nw, size * h / nh,
                                    size * w / nw), False)
    if self.crop:
      image = center_crop(image, self.image_size, self.crop_pct)
    else:
      image = resize(image, self.image_size, self.image_size)
    return {"image": image, "label": example["label"]}


@dataclasses.dataclass(frozen=True)
class Collate:
  """The pipeline's batch function: examples -> {"image": (N, H, W, len(mean)) float32,
  (image - mean) / std per channel, "label": (N,) int32}; a one-channel image is written
  into every channel (grayscale -> RGB). uint8 images (from
  ``Decode(keep_uint8=True)``) are batched as uint8 pixels, not normalised: a quarter of
  the bytes through the pipeline, the worker processes and the host-to-device copy.

  Each image is written straight into one array allocated for the whole batch and the
  batch is normalised in place: a fresh array per image, then stacking them, cost two more
  passes over the batch and a page fault per 4 KiB of every image.

  With ``on_device`` (``data.augment_on_device``) the images are batched at their stored
  size and never normalised here (float ones stay in [0, 1]), and the examples' "box"
  and "mirror" are batched too, for ``train.device_augment``.
  """
  mean: tuple[float, ...]
  std: tuple[float, ...]
  on_device: bool = False

  def __call__(self, examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    shapes = {example["image"].shape[:2] for example in examples}
    if len(shapes) != 1:
      if self.on_device:
        raise ValueError(
            f"A batch mixes stored image sizes {sorted(shapes)}: data.augment_on_device "
            "batches images before resizing them, so they must all have one size; set "
            "data.augment_on_device=False to resize them on the host.")
      raise ValueError(f"A batch mixes image sizes {sorted(shapes)}; set "
                       "config.data.image_size so that every image is resized to one size.")
    (h, w), = shapes
    sources = [example["image"] for example in examples]
    labels = np.asarray([example["label"] for example in examples], np.int32)
    if self.on_device:
      images = np.empty((len(examples), h, w, len(self.mean)), sources[0].dtype)
      for target, source in zip(images, sources):
        _fill(target, source)
      return {"image": images, "label": labels,
              "box": np.stack([example["box"] for example in examples]),
              "mirror": np.asarray([example["mirror"] for example in examples], np.bool_)}
    if sources[0].dtype == np.uint8:
      images = np.empty((len(examples), h, w, len(self.mean)), np.uint8)
      for target, source in zip(images, sources):
        _fill(target, source)
    else:
      images = np.empty((len(examples), h, w, len(self.mean)), np.float32)
      _normalize_into(images, sources, self.mean, self.std)
    return {"image": images, "label": labels}


def _normalize_into(out: np.ndarray, images: Sequence[np.ndarray],
                    mean: tuple[float, ...], std: tuple[float, ...]) -> None:
  """Writes (image - mean) / std of each (H, W, 1 or C) image into ``out`` (N, H, W, C)."""
  _, h, w, channels = out.shape
  # Rows of W * C values against the per-channel constants tiled W times: numpy's inner
  # loop then runs over W * C elements instead of C (3.4x faster at 224x224x3). Each image
  # is normalised right after it is written, while it is still in the cache.
  mean_row, std_row = _tiled(mean, std, w)
  for target, source in zip(out, images):
    _fill(target, source)
    rows = target.reshape(h, w * channels)
    rows -= mean_row
    rows /= std_row


def _fill(target: np.ndarray, source: np.ndarray) -> None:
  """Copies (H, W, C) or (H, W, 1) ``source`` into (H, W, C) ``target``."""
  c, channels = source.shape[-1], target.shape[-1]
  if c == channels and (c == 1 or source.strides[1] == source.itemsize * c):
    target[...] = source
  elif c == channels:
    # A mirrored view (random_flip): numpy would copy it C elements at a time; one
    # strided plane copy per channel is 5-6x faster at 224x224x3.
    for k in range(c):
      target[..., k] = source[..., k]
  elif c == 1:
    # One plane into every channel, a strided plane copy each: numpy's broadcast of a
    # size-1 last axis loops over C elements at a time and was 4x slower at 224x224.
    plane = source[..., 0]
    for k in range(channels):
      target[..., k] = plane
  else:
    raise ValueError(f"Got {c}-channel images for {channels} mean/std values.")


@functools.lru_cache(maxsize=64)
def _tiled(mean: tuple[float, ...], std: tuple[float, ...],
           width: int) -> tuple[np.ndarray, np.ndarray]:
  return (np.tile(np.asarray(mean, np.float32), width),
          np.tile(np.asarray(std, np.float32), width))
