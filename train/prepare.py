"""Prepares a tensorflow-datasets dataset once, as ArrayRecord files for ``train.data``.

  python -m train.prepare cifar10 [--data_dir=DIR] [--manual_dir=DIR]

Downloading and converting needs TensorFlow (``pip install -e '.[prepare]'``); training
afterwards reads the files through ``tfds.data_source`` without it. ImageNet
(``imagenet2012``) cannot be downloaded automatically: put its tar files in ``--manual_dir``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Sequence

INSTALL_HINT = "pip install -e '.[prepare]'"


def _tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m train.prepare",
      description="Download and prepare a tfds dataset as array_record files.")
  parser.add_argument("name", help="tfds name, e.g. cifar10, cifar100, mnist, svhn_cropped, "
                      "imagenet2012 (optionally with config/version: name/config:1.0.0)")
  parser.add_argument("--data_dir", default=None,
                      help="where to write the prepared dataset (default: tfds's, usually "
                      "~/tensorflow_datasets); give the same value as config.data.data_dir")
  parser.add_argument("--manual_dir", default=None,
                      help="folder holding manually downloaded archives (imagenet2012)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Prepares the dataset named in ``argv``; returns 0, or exits with a message."""
  args = _parser().parse_args(argv)
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(args.name, data_dir=args.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    sys.exit(f"tensorflow-datasets has no dataset {args.name!r}; see "
             "https://www.tensorflow.org/datasets/catalog/overview for the names.")
  if builder.is_prepared():
    print(f"{args.name} is already prepared in {builder.data_dir}.")
    return 0
  if not _tensorflow_available():
    sys.exit(f"Preparing {args.name} needs TensorFlow, which is not installed. Install it "
             f"with `{INSTALL_HINT}` and run this command again; training itself does not "
             "need TensorFlow.")
  download_config = tfds.download.DownloadConfig(manual_dir=args.manual_dir)
  builder.download_and_prepare(download_config=download_config,
                               file_format="array_record")
  print(f"Prepared {args.name} in {builder.data_dir}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
