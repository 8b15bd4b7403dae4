"""``data.cache=True``: a split decoded once into memory, then read from there every epoch.

:func:`in_memory` decodes every image of an image folder or a tfds split into one
(N, H, W, C) array (uint8 as stored) and returns an ``ArraySource`` over it, which the
grain pipeline reads like any source: shuffling, augmentation and batching are the same,
so the batches equal the uncached ones exactly for a seed. The arrays are kept per
process and split, so each split is decoded once per process however often the pipeline
is built (each evaluation builds one). Images of one size only; with them,
``data.augment_on_device`` applies too.

The size is estimated first, N x H x W x C bytes from the first image, and checked
against ``data.cache_max_gb`` (0: half of the memory available when the split is
cached); a split that does not fit raises a one-line error naming the keys.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Any, Callable

import numpy as np

from train import image_files
from train.datasets import ArraySource, ImageFolderSource
from train.errors import UserError

GIB = 2**30
AVAILABLE_FRACTION = 0.5  # of the memory available, the limit when data.cache_max_gb is 0
KEPT_SPLITS = 4  # decoded splits kept per process, oldest dropped first

_KEPT: collections.OrderedDict[tuple, ArraySource] = collections.OrderedDict()


def available_bytes() -> int:
  """Physical memory available now (``os.sysconf``), or 0 where it cannot be read."""
  try:
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
  except (ValueError, OSError, AttributeError):
    return 0


def limit_bytes(cache_max_gb: float) -> int:
  """The bytes a split may take: ``cache_max_gb`` GiB, or (0) :data:`AVAILABLE_FRACTION`
  of :func:`available_bytes`."""
  if cache_max_gb > 0:
    return int(cache_max_gb * GIB)
  return int(AVAILABLE_FRACTION * available_bytes())


def clear() -> None:
  """Drops every decoded split of this process."""
  _KEPT.clear()


def in_memory(source: Any, *, key: tuple, split: str, cache_max_gb: float = 0.0,
              skip_bad_files: bool = False, threads: int = 4) -> Any:
  """``source`` decoded into memory: an ``ArraySource`` of its images (N, H, W, C) and
  labels (N,), made once per process and ``key``. A source already in memory (an
  ``ArraySource``) is returned as it is. Image-folder files that do not decode raise a
  one-line UserError, or with ``skip_bad_files`` are left out and recorded
  (``train.image_files``)."""
  if isinstance(source, ArraySource):
    return source
  key = (*key, split, len(source))
  if key in _KEPT:
    _KEPT.move_to_end(key)
    return _KEPT[key]
  files = source.files if isinstance(source, ImageFolderSource) else None
  read = _reader(source)
  count = len(source)
  if count == 0:
    raise UserError(f"data.cache=True found no images in split {split!r}; check the "
                    "data config.")
  first = _first_readable(read, count, skip_bad_files)
  need = count * first.nbytes
  limit = limit_bytes(cache_max_gb)
  if need > limit:
    raise UserError(
        f"data.cache=True needs {need / GIB:.2f} GiB for split {split!r} ({count} images "
        f"of {'x'.join(map(str, first.shape))} {first.dtype}) but may use {limit / GIB:.2f} "
        "GiB; raise data.cache_max_gb (0 = half the available memory) or set "
        "data.cache=False.")
  images = np.empty((count, *first.shape), first.dtype)
  labels = np.empty(count, np.int32)
  keep = np.ones(count, bool)

  def fill(index: int) -> None:
    try:
      pixels, label = read(index)
    except image_files.BadImageError as err:
      if not skip_bad_files:
        raise err.user_error() from None
      image_files.record(err.path, err.cause)
      keep[index] = False
      return
    if pixels.shape != first.shape:
      where = repr(files[index]) if files is not None else f"example {index}"
      raise UserError(
          f"data.cache=True needs the images of split {split!r} at one size, but {where} "
          f"is {'x'.join(map(str, pixels.shape))} and the first "
          f"{'x'.join(map(str, first.shape))}; resize the files, or set data.cache=False.")
    images[index] = pixels
    labels[index] = label

  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    list(pool.map(fill, range(count), chunksize=256))
  if not keep.all():
    images, labels = images[keep], labels[keep]
  images.flags.writeable = False
  cached = ArraySource(images, labels)
  _KEPT[key] = cached
  while len(_KEPT) > KEPT_SPLITS:
    _KEPT.popitem(last=False)
  return cached


def _reader(source: Any) -> Callable[[int], tuple[np.ndarray, int]]:
  """``read(index) -> (image (H, W, C), label)``: an image folder's files decoded without
  the substitution of bad files (``ImageFolderSource.load``), other sources' examples."""
  if isinstance(source, ImageFolderSource):
    return lambda index: (source.load(index), int(source.labels[index]))

  def read(index: int) -> tuple[np.ndarray, int]:
    example = source[index]
    pixels = np.asarray(example["image"])
    return pixels[..., None] if pixels.ndim == 2 else pixels, int(example["label"])

  return read


def _first_readable(read: Callable[[int], tuple[np.ndarray, int]], count: int,
                    skip: bool) -> np.ndarray:
  """The first image that decodes (its shape sets the split's); bad ones raise unless
  ``skip``."""
  for index in range(count):
    try:
      return read(index)[0]
    except image_files.BadImageError as err:
      if not skip:
        raise err.user_error() from None
  raise UserError("data.cache=True found no readable image in the split; check the files.")
