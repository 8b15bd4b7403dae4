"""Image files that do not decode: found when a run starts, skipped when asked, counted.

An image folder (``train.datasets.ImageFolderSource``) decodes ``data.check_files`` of its
files when it is opened (spread evenly over the split; -1: every file, 0: none). A file
that fails raises a one-line :class:`train.errors.UserError` naming it and
``data.skip_bad_files=True``; with that flag the file is left out instead, and a file that
fails later, mid-epoch, is replaced by the next readable file of the split. Every bad
file is recorded here (:func:`record`), and the trainer reports them in results.json
(:func:`summary`). Files found bad in grain's worker processes (``data.worker_count > 0``)
are logged there but not counted in this process.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from train.errors import UserError, one_line

SKIP_HINT = "set data.skip_bad_files=True to skip (and count) bad files"
# How many of the bad files' paths results.json lists.
REPORTED_PATHS = 10

_BAD: dict[str, str] = {}  # absolute path -> cause, for every bad file seen by this process
_CHECKED: dict[tuple, tuple[tuple[int, str], ...]] = {}  # a split's check -> (index, cause)


class BadImageError(Exception):
  """A file that does not decode; ``path`` and ``cause`` (one line)."""

  def __init__(self, path: str, cause: str):
    super().__init__(f"{path}: {cause}")
    self.path, self.cause = path, cause

  def user_error(self) -> UserError:
    return UserError(f"Cannot read image file {self.path!r} ({self.cause}); replace or "
                     f"delete it, or {SKIP_HINT}.")


def decode(path: str, channels: int) -> np.ndarray:
  """The pixels of the image file at ``path`` as (H, W, channels) uint8 (1: grayscale "L",
  3: RGB); :class:`BadImageError` when it cannot be opened or decoded."""
  mode = "L" if channels == 1 else "RGB"
  try:
    with Image.open(path) as image:
      # convert() copies even an image already in the mode (16% of a small PNG's read).
      pixels = np.asarray(image if image.mode == mode else image.convert(mode), np.uint8)
  except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
    raise BadImageError(path, f"{type(err).__name__}: {one_line(err)}") from err
  return pixels[..., None] if pixels.ndim == 2 else pixels


def record(path: str, cause: str) -> None:
  """Counts ``path`` as bad (once) and logs a warning the first time."""
  path = os.path.abspath(path)
  if path not in _BAD:
    _BAD[path] = cause
    logging.warning("Skipping bad image file %s (%s).", path, cause)


def bad_files(root: str) -> list[str]:
  """The sorted absolute paths of the bad files recorded under ``root``."""
  prefix = os.path.join(os.path.abspath(root), "")
  return sorted(p for p in _BAD if p.startswith(prefix))


def summary(root: str) -> dict[str, object]:
  """{"count": bad files under ``root``, "paths": the first :data:`REPORTED_PATHS`}."""
  paths = bad_files(root)
  return {"count": len(paths), "paths": paths[:REPORTED_PATHS]}


def sample(count: int, check: int) -> np.ndarray:
  """The indices of ``count`` files that a check of ``check`` files decodes: all of them
  for ``check`` -1 or >= count, none for 0, else ``check`` indices spread evenly."""
  if check < 0 or check >= count:
    return np.arange(count)
  return np.unique(np.linspace(0, count - 1, check).round().astype(np.int64))


def find_bad(load: Callable[[int], object], indices: Sequence[int], threads: int = 4
             ) -> list[tuple[int, str]]:
  """(index, cause) of each index in ``indices`` whose ``load(index)`` raises
  :class:`BadImageError`, in index order; decoded on ``threads`` threads (Pillow
  releases the GIL while it decodes)."""
  def one(index: int) -> tuple[int, str] | None:
    try:
      load(index)
    except BadImageError as err:
      return int(index), err.cause
    return None

  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    return [r for r in pool.map(one, indices, chunksize=64) if r is not None]


def check(files: Sequence[str], load: Callable[[int], object], *, check_files: int,
          skip: bool, key: tuple, threads: int = 4) -> set[int]:
  """Decodes a sample of ``files`` (:func:`sample`) once per process and ``key``; returns
  the indices of bad files (recorded) when ``skip``, else raises a one-line UserError
  naming the first and the flag."""
  key = (*key, len(files), check_files)
  if key not in _CHECKED:
    _CHECKED[key] = tuple(find_bad(load, sample(len(files), check_files), threads))
  bad = _CHECKED[key]
  if bad and not skip:
    index, cause = bad[0]
    more = f" and {len(bad) - 1} more of the files checked" if len(bad) > 1 else ""
    raise UserError(f"Cannot read image file {files[index]!r} ({cause}){more}; replace or "
                    f"delete it, or {SKIP_HINT}.")
  for index, cause in bad:
    record(files[index], cause)
  return {index for index, _ in bad}
