"""The input pipeline's side of ``train.bench`` (``--pipeline``): images per second out of
``train.data.train_dataset`` as the trainer reads it, on data that needs no download.

``--data`` picks the source:

* ``digits``: scikit-learn's 8x8 digits (float images, normalised on the host), upsampled.
* ``cifar10_mock``: ``tfds.testing.mock_data`` examples of cifar10 (32x32 uint8). The mock
  makes a random example on every read, which costs more than reading a prepared
  dataset's record does: on a 2-core EPYC about a third of the pipeline's time per image.
* ``png_folder``: random 32x32 RGB images written as PNG files into a temporary image
  folder (``data.name="folder"``, ``<tmp>/train/<class>/*.png``) and read back by
  ``train.datasets.ImageFolderSource``: a file opened and a PNG decoded per image, as for
  a user's own image folder. Noise compresses worst, so the decoding is the dearest a
  32x32 PNG gets.

All three are augmented as CIFAR is (resize to the image size, random crop with 1/8 of it
as padding, random flip) and uint8 sources stay uint8 for the device to normalise.

With ``augment_on_device`` (``data.augment_on_device``; ``train.bench --augment_on_device``
adds such a row after the host-augmented one) the pipeline leaves the resize, crop and
flip to the jitted step (``train.device_augment``) and ships the images at their stored
size; the row then also times that device work on one of the pipeline's batches
(``device_augment_s``) and charges it to the model: ``ratio_vs_model`` compares the
pipeline with the model's step plus the augmentation.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np

PIPELINE_DATA = ("digits", "cifar10_mock", "png_folder")
# Examples in the source. grain's shuffle spends about 45 ms per epoch before its first
# element and ~17 us per element after that (2-core EPYC), so a source of 512 examples
# paid 105 us an image and CIFAR-10's 50,000 pay 18. The mock's examples cost nothing to
# have (each is made when read), so it has CIFAR-10's train split; the folder's are written
# first (8,192 PNGs in about 6 s: 22 us an image in the shuffle). digits has its own size.
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
  """The data block of ``--pipeline`` for ``name`` in :data:`PIPELINE_DATA` (module
  docstring), with ``workers`` grain worker processes (``data.worker_count``; 0: reader
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
  jax.block_until_ready(prepare(on_device))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(prepare(on_device))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
  """A line for each "pipeline" row, after a blank one."""
  from train.bench import _fmt
  out = []
  for r in rows:
    if r["kind"] == "pipeline":
      out += ["", f"Input pipeline ({r['data']}, batch {r['batch']}, "
              f"{'x'.join(map(str, r['image_shape']))} {r['image_dtype']}, "
              f"{r['workers']} workers"
              f"{', augmented on the device' if r.get('augment_on_device') else ''}): "
              f"{r['images_per_second']:.0f} img/s; "
              f"{r['model']} consumes {_fmt(r['model_images_per_second'], '.0f')} img/s"
              f"{' with the augmentation' if r.get('augment_on_device') else ''}; "
              f"ratio {_fmt(r['ratio_vs_model'], '.2f')}"]
  return out
