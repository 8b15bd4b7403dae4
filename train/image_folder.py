"""A user's image folder as a source: ``root/<split>/<class>/<image>``, classes sorted by
name, decoded with Pillow; bad files are found and handled by ``train.image_files``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from train import image_files
from train.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

_LAYOUT_HINT = "lay images out as <data_dir>/<split>/<class_name>/<image>.png (or .jpg)"


def folder_classes(root: str, split: str) -> list[str]:
  """The sorted class folder names of ``root/split``; raises naming the fix if absent."""
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(
        f"Image folder {root!r} does not exist. Set config.data.data_dir to it and "
        f"{_LAYOUT_HINT}.")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise FileNotFoundError(
        f"Image folder {root!r} has no split folder {split!r} (found {present}). Create "
        f"it or set data.train_split / data.eval_split; {_LAYOUT_HINT}.")
  classes = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)))
  if not classes:
    raise FileNotFoundError(f"{split_dir!r} holds no class folders; {_LAYOUT_HINT}.")
  # An empty class folder would still count as a class and change num_classes.
  empty = [c for c in classes if not _has_image(os.path.join(split_dir, c))]
  if empty:
    raise UserError(
        f"Class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} of {split_dir!r} "
        f"hold{'' if len(empty) > 1 else 's'} no images ({', '.join(IMAGE_EXTENSIONS)}); "
        "add images or remove the folder (each folder is a class).")
  return classes


def _has_image(folder: str) -> bool:
  """Whether ``folder`` holds at least one image file (stops at the first)."""
  with os.scandir(folder) as entries:
    return any(e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file() for e in entries)


class ImageFolderSource:
  """Images under ``root/split/<class>/``, labels by ``classes`` order (alphabetical).

  ``classes`` should come from the train split so that eval labels mean the same thing;
  images are decoded on access and converted to ``channels`` (1: grayscale, 3: RGB),
  returned as (H, W, channels) uint8. ``check_files`` of the files are decoded first
  (-1: all) and bad ones raise, or are left out with ``skip_bad_files``; with it, a file
  that fails later is replaced by the next readable one (``train.image_files``).
  """

  def __init__(self, root: str, split: str, channels: int,
               classes: Sequence[str] | None = None, *, check_files: int = 0,
               skip_bad_files: bool = False, threads: int = 4):
    found = folder_classes(root, split)
    self.classes = list(found if classes is None else classes)
    unknown = sorted(set(found) - set(self.classes))
    if unknown:
      raise ValueError(f"Split {split!r} of {root!r} has classes {unknown} that the train "
                       f"split lacks ({self.classes}); every split needs the same class "
                       "folders.")
    if channels not in (1, 3):
      raise ValueError(f"data.channels must be 1 or 3 for image folders, got {channels}.")
    self.channels = channels
    self.files: list[str] = []
    labels = []
    for label, name in enumerate(self.classes):
      class_dir = os.path.join(root, split, name)
      if not os.path.isdir(class_dir):
        continue
      for file in sorted(os.listdir(class_dir)):
        if file.lower().endswith(IMAGE_EXTENSIONS):
          self.files.append(os.path.join(class_dir, file))
          labels.append(label)
    if not self.files:
      raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under "
                              f"{os.path.join(root, split)!r}; {_LAYOUT_HINT}.")
    self.labels = np.asarray(labels, np.int32)
    self.skip_bad_files = bool(skip_bad_files)
    bad = image_files.check(
        self.files, self.load, check_files=check_files, skip=self.skip_bad_files,
        key=(os.path.abspath(os.path.join(root, split)), channels), threads=threads)
    if bad:  # Left out: the split is the readable files.
      keep = [i for i in range(len(self.files)) if i not in bad]
      self.files, self.labels = [self.files[i] for i in keep], self.labels[keep]

  def __len__(self) -> int:
    return len(self.files)

  def load(self, index: int) -> np.ndarray:
    """File ``index`` decoded, (H, W, channels) uint8; ``image_files.BadImageError`` if
    it does not decode."""
    return image_files.decode(self.files[index], self.channels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    for offset in range(len(self.files)):
      at = (index + offset) % len(self.files)
      try:
        return {"image": self.load(at), "label": int(self.labels[at])}
      except image_files.BadImageError as err:
        if not self.skip_bad_files:
          raise err.user_error() from None
        # A file that went bad after the check: the next readable one takes its place.
        image_files.record(err.path, err.cause)
    raise UserError(f"No file of the {len(self.files)} in this split decodes (first "
                    f"{self.files[index]!r}); check the image folder.")


# ------------------------------------------------------------- tensorflow-datasets


__all__ = ["IMAGE_EXTENSIONS", "ImageFolderSource", "folder_classes"]
