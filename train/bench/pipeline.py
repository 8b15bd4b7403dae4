"""The input pipeline's part of ``python -m train.bench --pipeline``: images per second
out of ``train.data.train_dataset`` as the trainer reads it, on data that needs no
download (``--data``: digits, cifar10_mock or png_folder, a temporary folder of PNG
files), against the fastest model's consumption; with ``augment_on_device`` the resize,
crop and flip are left to the jitted step, timed on one batch and charged to the model.
Sources and fields: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np

from train.bench.common import fmt, median, time_call

PIPELINE_DATA = ("digits", "cifar10_mock", "png_folder")
# Examples in the source: grain's shuffle costs a fixed time per epoch, so a small source
# is dear per image (docs/benchmarks.md); the mock's examples cost nothing to have, the
# folder's are written first; digits has its own size.
SOURCE_SIZE = {"digits": 0, "cifar10_mock": 50_000, "png_folder": 8_192}
PNG_FOLDER_CLASSES = 10
PNG_FOLDER_SIDE = 32


def write_png_folder(root: str, num_images: int, *, side: int = PNG_FOLDER_SIDE,
                     classes: int = PNG_FOLDER_CLASSES, seed: int = 0) -> None:
  """``num_images`` random (side, side, 3) uint8 PNGs under ``root/train/<class>/``, as
  evenly over ``classes`` folders as they divide."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  for k in range(classes):
    os.makedirs(os.path.join(root, "train", f"class{k:02d}"), exist_ok=True)
  for i in range(num_images):
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(
        os.path.join(root, "train", f"class{i % classes:02d}", f"{i:06d}.png"))


def pipeline_data_config(name: str, size: int, channels: int, workers: int = 0,
                         data_dir: str | None = None, augment_on_device: bool = False) -> Any:
  """The data block of ``--pipeline`` for ``name`` in :data:`PIPELINE_DATA`
  (docs/benchmarks.md), with ``workers`` grain worker processes (``data.worker_count``; 0: reader
  threads only). ``png_folder`` needs the folder's root as ``data_dir``."""
  import configs
  augment = {"crop_padding": max(1, size // 8), "flip": True}
  common = dict(image_size=size, channels=channels, augment=augment, worker_count=workers,
                augment_on_device=augment_on_device)
  if name == "digits":
    return configs.data_config("digits", mean=(0.5,) * channels, std=(0.5,) * channels,
                               **common)
  cifar = dict(mean=configs.CIFAR10_MEAN[:channels], std=configs.CIFAR10_STD[:channels])
  if name == "cifar10_mock":
    return configs.data_config("tfds", tfds_name="cifar10", **cifar, **common)
  if name == "png_folder":
    if not data_dir:
      raise ValueError("--data=png_folder needs the folder written by write_png_folder as "
                       "data_dir.")
    return configs.data_config("folder", data_dir=data_dir, **cifar, **common)
  raise ValueError(f"Unknown --data={name!r}; choose one of {', '.join(PIPELINE_DATA)}.")


@contextlib.contextmanager
def _data_dir(data: str, num_images: int) -> Iterator[str | None]:
  """Whatever ``data`` needs around the run: the tfds mock, or the temporary PNG folder."""
  if data == "cifar10_mock":
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=num_images):
      yield None
  elif data == "png_folder":
    with tempfile.TemporaryDirectory(prefix="bench_png_") as root:
      write_png_folder(root, num_images)
      yield root
  else:
    yield None


def bench_pipeline(data: str, *, batch: int, image_shape: Sequence[int], warmup: int,
                   batches: int, model_row: dict[str, Any] | None,
                   workers: int = 0, augment_on_device: bool = False) -> dict[str, Any]:
  """Images per second out of ``train.data.train_dataset`` (augmented; normalised on the
  host, or uint8 pixels for the device to normalise, as the trainer asks for them; or,
  with ``augment_on_device``, the stored images for the device to augment)."""
  from train import data as data_lib
  import grain
  if data not in PIPELINE_DATA:
    raise ValueError(f"Unknown --data={data!r}; choose one of {', '.join(PIPELINE_DATA)}.")
  size, channels = int(image_shape[0]), int(image_shape[-1])
  with _data_dir(data, max(SOURCE_SIZE[data], 4 * batch)) as root:
    config = pipeline_data_config(data, size, channels, workers, data_dir=root,
                                  augment_on_device=augment_on_device)
    spec = data_lib.parse_data_config(config)
    # Batches that can be made ahead of the reader (one per worker process, as grain's
    # default per-worker buffer, and the prefetch): read before the clock starts, so that
    # a run of few batches is not timed out of full buffers.
    ahead = (workers * grain.MultiprocessingOptions().per_worker_buffer_size
             + spec.prefetch_batches)
    it = iter(data_lib.train_dataset(config, batch_size=batch, seed=0,
                                     keep_uint8=spec.normalize_on_device))
    first = next(it)
    for _ in range(warmup + ahead):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    elapsed = time.perf_counter() - start
    it.close()  # Stops reader threads and worker processes now, not at garbage collection.
  ips = batch * batches / elapsed
  dtype = first["image"].dtype
  augment_s = device_augment_time(first, spec) if augment_on_device else None
  model_ips = model_row["images_per_second"] if model_row else None
  if model_ips and augment_s is not None:
    model_ips = batch / (batch / model_ips + augment_s)
  return {"kind": "pipeline", "data": data, "batch": batch, "image_shape": list(image_shape),
          "workers": workers, "warmup_batches": warmup + ahead, "batches": batches,
          "images_per_second": ips, "image_dtype": str(dtype),
          "augment_on_device": bool(augment_on_device),
          "stored_image_shape": list(first["image"].shape[1:]),
          "device_augment_s": augment_s,
          "model": model_row["model"] if model_row else None,
          "model_images_per_second": model_ips,
          "ratio_vs_model": ips / model_ips if model_ips else None}


def device_augment_time(batch: dict[str, np.ndarray], spec: Any, repeats: int = 7) -> float:
  """Median seconds of ``train.device_augment.prepare_images`` (resize, crop, flip and
  normalisation, jitted alone) on ``batch`` once it is on the device."""
  import jax
  from train import device_augment
  prepare = jax.jit(lambda b: device_augment.prepare_images(b, spec.image_size, spec.mean,
                                                            spec.std))
  on_device = jax.device_put({k: batch[k] for k in ("image", "box", "mirror")})
  time_call(prepare, on_device)
  return median([time_call(prepare, on_device) for _ in range(repeats)])


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
  """A line for each "pipeline" row, after a blank one."""
  out = []
  for r in rows:
    if r["kind"] == "pipeline":
      out += ["", f"Input pipeline ({r['data']}, batch {r['batch']}, "
              f"{'x'.join(map(str, r['image_shape']))} {r['image_dtype']}, "
              f"{r['workers']} workers"
              f"{', augmented on the device' if r.get('augment_on_device') else ''}): "
              f"{r['images_per_second']:.0f} img/s; "
              f"{r['model']} consumes {fmt(r['model_images_per_second'], '.0f')} img/s"
              f"{' with the augmentation' if r.get('augment_on_device') else ''}; "
              f"ratio {fmt(r['ratio_vs_model'], '.2f')}"]
  return out
