"""Random-access image classification sources read by the grain pipeline in ``train.data``.

Every source has ``__len__`` and ``__getitem__(i) -> {"image": (H, W, C) array, "label": int}``
with uint8 pixels in 0..255 or float32 pixels in [0, 1]; ``train.data`` turns either into
normalised float32.

* ``tfds_source``: a prepared tensorflow-datasets image classification dataset (cifar10,
  cifar100, mnist, svhn_cropped, imagenet2012, ...) through ``tfds.data_source``, which reads
  ArrayRecord files without TensorFlow. Nothing here ever downloads: an unprepared dataset
  fails at once and says how to prepare it (``python -m train.prepare NAME``).
* ``digits_source``: the 1,797 real 8x8 handwritten digits (values 0..16) that ship inside
  scikit-learn, split once, stratified by class, by ``seed``: 1,437 train / 360 test
  (``test_size=0.2`` rounds the test share up). Pixels are scaled to [0, 1] and the 8x8
  digit is resized (bilinear, half-pixel centres) or zero-padded to the canvas size.
* ``distorted_digits_source``: the same digits rotated, scaled, translated and placed with
  clutter on a larger canvas: the rotated-translated-scaled and cluttered settings of Spatial
  Transformer Networks (Jaderberg et al. 2015, https://arxiv.org/abs/1506.02025) in
  miniature. Train canvases are made from train digits only, test canvases from the
  held-out digits, deterministically by seed.
* ``ImageFolderSource`` (from ``train.image_folder``, re-exported here): a user's folder
  ``root/<split>/<class>/*.png|jpg``, classes sorted alphabetically, decoded with Pillow.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
# Re-exported: the image-folder source is one of this module's sources.
from train.image_folder import IMAGE_EXTENSIONS, ImageFolderSource, folder_classes  # noqa: F401

DIGITS_SPLITS = ("train", "test")
DIGITS_TEST_FRACTION = 0.2  # 1,797 digits -> 1,437 train / 360 test
DIGITS_NUM_CLASSES = 10
# Distortions used unless the data config overrides them (see distorted_digits_source).
DISTORTION_DEFAULTS = {
    "train_copies": 8,
    "eval_copies": 4,
    "max_rotation": 45.0,     # degrees, uniform in [-45, 45]
    "scale_range": (0.7, 1.2),
    "clutter": 4,             # pieces of other digits per canvas
}


class ArraySource:
  """Examples held in memory: images (N, H, W, C), uint8 or float32, and labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or len(images) != len(labels):
      raise ValueError(
          f"ArraySource needs images (N, H, W, C) and labels (N,); got {images.shape} "
          f"and {np.shape(labels)}.")
    self.images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"ArraySource(images={self.images.shape} {self.images.dtype})"


# ----------------------------------------------------------------------------- digits


def _check_seed(seed: Any) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"data.seed must be a non-negative int, got {seed!r}.")
  return int(seed)


def _check_split(split: str, name: str) -> str:
  if split not in DIGITS_SPLITS:
    raise ValueError(f"{name} has splits {DIGITS_SPLITS}; got split {split!r}. "
                     "Set data.train_split / data.eval_split to one of them.")
  return split


def _frozen(array: np.ndarray) -> np.ndarray:
  # Cached arrays are shared by every caller: make accidental in-place edits fail loudly.
  array.flags.writeable = False
  return array


@functools.lru_cache(maxsize=8)
def digits_split(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The stratified split of scikit-learn's digits: split -> (images (N, 8, 8) float32 in
  [0, 1], labels (N,) int32), each split sorted by original index."""
  # scikit-learn and tensorflow-datasets are slow to import; only some configs need them.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = train_test_split(
      np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels,
      random_state=_check_seed(seed))
  out = {}
  for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
    out[split] = (_frozen(images[idx]), _frozen(labels[idx]))
  return out


def bilinear_sample(images: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """Samples (N, h, w) images at pixel-centre coordinates ys, xs of shape (N, H, W).

  Pixel (i, j) sits at coordinate (i, j); outside the image the value is 0, so a digit
  fades out at its edge instead of smearing its border pixels across the canvas.
  """
  n, h, w = images.shape
  # A ring of zeros around each image makes every out-of-range read land on a 0, so the
  # four taps need no masks: coordinates are clipped into the ring and gathered flat.
  padded = np.pad(images.astype(np.float32), ((0, 0), (1, 1), (1, 1))).reshape(-1)
  ys = np.clip(ys, -1.0, h).astype(np.float32) + np.float32(1.0)
  xs = np.clip(xs, -1.0, w).astype(np.float32) + np.float32(1.0)
  y0 = np.minimum(np.floor(ys), h)
  x0 = np.minimum(np.floor(xs), w)
  wy = ys - y0
  wx = xs - x0
  row = w + 2
  base = ((np.arange(n) * (h + 2) * row)[:, None, None]
          + y0.astype(np.int64) * row + x0.astype(np.int64))
  top = padded[base] * (1.0 - wx) + padded[base + 1] * wx
  bottom = padded[base + row] * (1.0 - wx) + padded[base + row + 1] * wx
  return (top * (1.0 - wy) + bottom * wy).astype(np.float32)


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes (N, h, w) images to (N, size, size): half-pixel centres, edge clamped (the
  convention of PIL and of ``align_corners=False``)."""
  n, h, w = images.shape
  ys = np.clip((np.arange(size) + 0.5) * (h / size) - 0.5, 0, h - 1)
  xs = np.clip((np.arange(size) + 0.5) * (w / size) - 0.5, 0, w - 1)
  grid_y = np.broadcast_to(ys[None, :, None], (n, size, size))
  grid_x = np.broadcast_to(xs[None, None, :], (n, size, size))
  return bilinear_sample(images, grid_y, grid_x)


def place_digits(images: np.ndarray, image_size: int, placement: str) -> np.ndarray:
  """(N, 8, 8) digits -> (N, image_size, image_size, 1) float32: ``"resize"`` scales the
  digit to fill the canvas, ``"pad"`` centres it unscaled on a zero canvas."""
  if placement == "resize":
    out = images if image_size == images.shape[1] else resize_bilinear(images, image_size)
  elif placement == "pad":
    side = images.shape[1]
    if image_size < side:
      raise ValueError(f"data.placement='pad' needs data.image_size >= {side}, got "
                       f"{image_size}; use placement='resize' for smaller images.")
    out = np.zeros((len(images), image_size, image_size), np.float32)
    top = (image_size - side) // 2
    out[:, top:top + side, top:top + side] = images
  else:
    raise ValueError(f"data.placement must be 'resize' or 'pad', got {placement!r}.")
  return out[..., None].astype(np.float32)


@functools.lru_cache(maxsize=8)
def _digits_arrays(seed: int, split: str, image_size: int, placement: str):
  images, labels = digits_split(seed)[split]
  return _frozen(place_digits(images, image_size, placement)), labels


def digits_source(split: str, *, seed: int, image_size: int = 16,
                  placement: str = "resize") -> ArraySource:
  """The plain digits split as (image_size, image_size, 1) float32 images in [0, 1]."""
  _check_split(split, "digits")
  images, labels = _digits_arrays(_check_seed(seed), split, int(image_size), placement)
  return ArraySource(images, labels)


# ------------------------------------------------------------------ distorted digits


def distort_digits(images: np.ndarray, labels: np.ndarray, *, copies: int, image_size: int,
                   seed: Sequence[int] | int, digit_size: int | None = None,
                   max_rotation: float = 45.0, scale_range: Sequence[float] = (0.7, 1.2),
                   clutter: int = 4, clutter_size: int | None = None,
                   chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """Places ``copies`` randomly distorted versions of each (N, 8, 8) digit on canvases.

  Each canvas holds one digit drawn ``digit_size`` pixels tall (default 28/60 of the canvas,
  MNIST's 28 px on the 60 px cluttered-MNIST canvas) times a scale uniform in
  ``scale_range``, rotated uniformly within +-``max_rotation`` degrees, and translated
  uniformly as far as the scaled digit's box stays on the canvas; then ``clutter`` square
  crops (``clutter_size``, default a quarter of ``digit_size``) of other digits of the same
  set, at random places, merged by maximum. All random numbers are drawn up front from
  ``seed``, so the result does not depend on ``chunk`` (only memory does).

  Returns images (N * copies, image_size, image_size, 1) uint8 and labels (N * copies,)
  int32, copy-major: row ``c * N + i`` is copy ``c`` of digit ``i``.
  """
  n, side, _ = images.shape
  size = int(image_size)
  digit_size = round(size * 28 / 60) if digit_size is None else int(digit_size)
  clutter_size = max(2, round(digit_size / 4)) if clutter_size is None else int(clutter_size)
  if copies < 1 or n < 2 or not 0 < digit_size <= size or clutter < 0:
    raise ValueError(
        f"distorted digits need copies >= 1, at least 2 digits and 0 < digit_size <= "
        f"image_size; got copies={copies}, {n} digits, digit_size={digit_size}, "
        f"image_size={size}, clutter={clutter}.")
  lo, hi = (float(v) for v in scale_range)
  if not 0 < lo <= hi:
    raise ValueError(f"data.scale_range must be (low, high) with 0 < low <= high, got "
                     f"{tuple(scale_range)}.")
  clutter_size = min(clutter_size, digit_size, size)

  rng = np.random.default_rng(seed)
  total = n * copies
  source = np.tile(np.arange(n), copies)
  angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation, total))
  zoom = digit_size / side * rng.uniform(lo, hi, total)  # canvas pixels per digit pixel
  reach = np.maximum(0.0, (size - side * zoom) / 2)
  shift = rng.uniform(-1.0, 1.0, (total, 2)) * reach[:, None]
  # Clutter never comes from the digit it surrounds: offset 1..n-1 from it.
  pieces = (source[:, None] + rng.integers(1, n, (total, clutter))) % n
  piece_from = rng.integers(0, digit_size - clutter_size + 1, (total, clutter, 2))
  piece_to = rng.integers(0, size - clutter_size + 1, (total, clutter, 2))

  upscaled = resize_bilinear(images, digit_size)  # clutter is cut from upright digits
  centre = (size - 1) / 2
  rows = (np.arange(size, dtype=np.float32) - centre)[None, :, None]
  cols = (np.arange(size, dtype=np.float32) - centre)[None, None, :]
  offsets = np.arange(clutter_size)
  out = np.empty((total, size, size), np.uint8)
  for start in range(0, total, chunk):
    sl = slice(start, min(start + chunk, total))
    m = sl.stop - sl.start
    cos = np.cos(angle[sl])[:, None, None].astype(np.float32)
    sin = np.sin(angle[sl])[:, None, None].astype(np.float32)
    inv_zoom = (1.0 / zoom[sl])[:, None, None].astype(np.float32)
    dy = rows - shift[sl, 0, None, None].astype(np.float32)
    dx = cols - shift[sl, 1, None, None].astype(np.float32)
    # Inverse map: each canvas pixel looks up where it came from in the 8x8 digit.
    src_y = (cos * dy + sin * dx) * inv_zoom + (side - 1) / 2
    src_x = (cos * dx - sin * dy) * inv_zoom + (side - 1) / 2
    canvas = bilinear_sample(images[source[sl]], src_y, src_x)
    batch = np.arange(m)[:, None, None]
    for k in range(clutter):
      fy = piece_from[sl, k, 0, None, None] + offsets[None, :, None]
      fx = piece_from[sl, k, 1, None, None] + offsets[None, None, :]
      patch = upscaled[pieces[sl, k, None, None], fy, fx]
      ty = piece_to[sl, k, 0, None, None] + offsets[None, :, None]
      tx = piece_to[sl, k, 1, None, None] + offsets[None, None, :]
      canvas[batch, ty, tx] = np.maximum(canvas[batch, ty, tx], patch)
    out[sl] = np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
  return out[..., None], np.asarray(labels, np.int32)[source]


@functools.lru_cache(maxsize=4)
def _distorted_arrays(seed: int, split: str, image_size: int, copies: int,
                      digit_size: int | None, max_rotation: float,
                      scale_range: tuple[float, float], clutter: int,
                      clutter_size: int | None):
  images, labels = digits_split(seed)[split]
  # The split index is mixed into the seed so train and test distortions differ.
  images, labels = distort_digits(
      images, labels, copies=copies, image_size=image_size,
      seed=(seed, DIGITS_SPLITS.index(split)), digit_size=digit_size,
      max_rotation=max_rotation, scale_range=scale_range, clutter=clutter,
      clutter_size=clutter_size)
  return _frozen(images), _frozen(labels)


def distorted_digits_source(split: str, *, seed: int, image_size: int = 60,
                            copies: int | None = None, digit_size: int | None = None,
                            max_rotation: float = DISTORTION_DEFAULTS["max_rotation"],
                            scale_range: Sequence[float] = DISTORTION_DEFAULTS["scale_range"],
                            clutter: int = DISTORTION_DEFAULTS["clutter"],
                            clutter_size: int | None = None) -> ArraySource:
  """Distorted, cluttered digits as (image_size, image_size, 1) uint8 canvases.

  ``copies`` defaults to 8 per train digit (11,496 images) and 4 per test digit (1,440);
  built once per process and argument set (cached), in about a second.
  """
  _check_split(split, "distorted_digits")
  if copies is None:
    copies = DISTORTION_DEFAULTS["train_copies" if split == "train" else "eval_copies"]
  images, labels = _distorted_arrays(
      _check_seed(seed), split, int(image_size), int(copies),
      None if digit_size is None else int(digit_size), float(max_rotation),
      tuple(float(v) for v in scale_range), int(clutter),
      None if clutter_size is None else int(clutter_size))
  return ArraySource(images, labels)


# ----------------------------------------------------------------------- image folder

def _prepare_hint(name: str, data_dir: str | None) -> str:
  target = f" --data_dir={data_dir}" if data_dir else ""
  return (f"Prepare it once with `python -m train.prepare {name}{target}` (needs TensorFlow: "
          "pip install -e '.[prepare]'), or point config.data.data_dir at the folder where "
          "it is prepared.")


def _is_mocked(builder: Any) -> bool:
  # tfds.testing.mock_data swaps DatasetBuilder.as_data_source for a function of its testing
  # package that serves random examples without any files: nothing to prepare then.
  method = getattr(type(builder), "as_data_source", None)
  return getattr(method, "__module__", "").startswith("tensorflow_datasets.testing")


def tfds_builder(name: str, data_dir: str | None = None, *, check_prepared: bool = True):
  """The tfds builder of ``name``; raises at once, naming the fix, if it is not prepared."""
  import tensorflow_datasets as tfds
  if not name:
    raise ValueError("config.data.tfds_name is empty; set it, e.g. 'cifar10'.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"tensorflow-datasets has no dataset {name!r}; check config.data.tfds_name against "
        "https://www.tensorflow.org/datasets/catalog/overview.") from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"tfds dataset {name!r} has features {sorted(features.keys())}; an "
                     "image classification dataset with 'image' and 'label' is needed.")
  if check_prepared and not _is_mocked(builder):
    if not builder.is_prepared():
      root = data_dir or tfds.core.constants.DATA_DIR
      raise FileNotFoundError(
          f"tfds dataset {name!r} is not prepared under data_dir {root!r} (looked in "
          f"{builder.data_dir}). " + _prepare_hint(name, data_dir))
    file_format = getattr(builder.info, "file_format", None)
    if file_format is not None and getattr(file_format, "value", file_format) != "array_record":
      raise ValueError(
          f"tfds dataset {name!r} in {builder.data_dir} is stored as {file_format}; reading "
          "without TensorFlow needs array_record. Prepare it into another data_dir: "
          + _prepare_hint(name, None))
  return builder


def tfds_num_classes(name: str, data_dir: str | None = None) -> int:
  """Number of classes from the builder's ``features["label"].num_classes``."""
  return int(tfds_builder(name, data_dir).info.features["label"].num_classes)


def tfds_source(name: str, split: str, data_dir: str | None = None):
  """``tfds.data_source`` of a prepared dataset (never downloads)."""
  import tensorflow_datasets as tfds
  tfds_builder(name, data_dir)
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)

