"""``python -m train.bench --cache``: a folder of small JPEG files (by default 50,000 of
32 x 32, CIFAR's size, 10 classes) trained end to end, read three ways:

* ``folder``: the image-folder path as it is without the cache, every JPEG decoded again
  every epoch (uint8 batches, normalised on the device);
* ``cache``: ``data.cache=True``, the split decoded once into memory (uint8) and read from
  there, augmented on the host;
* ``cache_device``: the cache with ``data.augment_on_device`` (the crop and the flip in
  the jitted step);

and, with ``--against=torch``, a plain PyTorch loop of the same model and batch over the
same images decoded once into one tensor (``torch_ref.TorchLoop``). For each: the input
pipeline alone, the training step alone on one of its batches, and the two together as
the trainer runs them (rounds taking turns). The pipeline's share is its seconds per
image over those of the pipeline and the step one after the other, step / (pipeline +
step) in images/s; the measured end to end / step alone shows what overlapping them
gives. Everything runs in one process. Fields: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Iterator

import jax
import numpy as np

from train.bench.common import progress

CACHE_IMAGES = 50_000
CACHE_SIDE = 32
CACHE_CLASSES = 10
MODES = ("folder", "cache", "cache_device")
REFILL_S = 1.0  # seconds left to the reader threads before the step is timed alone


def write_jpeg_folder(root: str, num_images: int, *, side: int = CACHE_SIDE,
                      classes: int = CACHE_CLASSES, seed: int = 0) -> None:
  """``num_images`` (side, side, 3) JPEGs (quality 90) under ``root/train/<class>/``, each
  a random 4 x 4 colour field enlarged bilinearly plus pixel noise (smooth like a photo,
  so JPEG sizes are photo-like), and 1 in 10 as many under ``root/test/``."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  for split, count in (("train", num_images), ("test", max(classes, num_images // 10))):
    for k in range(classes):
      os.makedirs(os.path.join(root, split, f"class{k:02d}"), exist_ok=True)
    for i in range(count):
      field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
      pixels = np.asarray(field.resize((side, side), Image.Resampling.BILINEAR), np.int16)
      pixels = pixels + rng.integers(-12, 13, pixels.shape, dtype=np.int16)
      Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
          os.path.join(root, split, f"class{i % classes:02d}", f"{i:06d}.jpg"), quality=90)


@contextlib.contextmanager
def jpeg_folder(root: str | None, num_images: int) -> Iterator[str]:
  """``root`` holding the folder (written unless it already has ``num_images`` train
  JPEGs), or a temporary one removed afterwards."""
  if root is None:
    with tempfile.TemporaryDirectory(prefix="bench_jpeg_") as tmp:
      write_jpeg_folder(tmp, num_images)
      yield tmp
    return
  train = os.path.join(root, "train")
  have = sum(len(files) for _, _, files in os.walk(train)) if os.path.isdir(train) else 0
  if have != num_images:
    if have:
      raise ValueError(f"--cache_dir={root!r} holds {have} train images, not "
                       f"{num_images}; give an empty or new folder.")
    write_jpeg_folder(root, num_images)
  yield root


def data_config(root: str, mode: str) -> Any:
  """The data block of ``mode`` (one of :data:`MODES`): CIFAR's augmentation (4-pixel
  padded crop, flip) and normalisation on ``root``."""
  import configs
  return configs.data_config(
      "folder", data_dir=root, image_size=CACHE_SIDE, channels=3, mean=configs.CIFAR10_MEAN,
      std=configs.CIFAR10_STD, augment={"crop_padding": 4, "flip": True},
      cache=mode != "folder", augment_on_device=mode == "cache_device", check_files=0)


def _rounds(batch: int, rounds: int, steps: int, runs: dict[str, Any]) -> dict[str, float]:
  """Images/s of each of ``runs`` (name -> ``run(n)`` doing n steps), timed in ``rounds``
  rounds of ``steps`` steps, the runs taking turns within each round: load from other
  work on the machine falls on all of them alike."""
  seconds = dict.fromkeys(runs, 0.0)
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      timed = run(steps)  # a run may time itself (leaving out its own preparation)
      seconds[name] += time.perf_counter() - start if timed is None else timed
  return {name: batch * rounds * steps / s for name, s in seconds.items()}


def pipeline_rate(config: Any, batch: int, batches: int, ahead: int) -> float:
  """Images/s out of a fresh ``train_dataset`` of ``config`` (uint8 batches), timed over
  ``batches`` batches after ``ahead`` (those its reader threads may hold ready)."""
  from train import data as data_lib
  it = iter(data_lib.train_dataset(config, batch_size=batch, seed=1, keep_uint8=True))
  for _ in range(ahead):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batch * batches / (time.perf_counter() - start)
  it.close()
  return rate


class Trainer:
  """``train.trainer``'s compiled step and a state, shared by the modes (one compile per
  batch signature)."""

  def __init__(self, model: str, batch: int, root: str):
    from train import trainer
    from train.bench.models import sgd_config
    self.config = sgd_config(model, batch, "float32")
    self.config.data = data_config(root, "folder")
    trainer.validate_config(self.config)
    self.mesh = trainer.make_mesh()
    shape = (CACHE_SIDE, CACHE_SIDE, 3)
    self.state = trainer.create_train_state(
        self.config, trainer.build_model(self.config, CACHE_CLASSES), jax.random.PRNGKey(0),
        shape, mesh=self.mesh)
    self.train_fn, _ = trainer.compile_steps(self.mesh)
    self.rng = jax.random.PRNGKey(1)

  def steps(self, batches: Any, n: int) -> None:
    """``n`` steps on ``batches()`` (host batches, sharded here), waited for at the end."""
    from train import trainer
    metrics = None
    for _ in range(n):
      self.state, metrics = self.train_fn(self.state, trainer.shard_batch(batches(), self.mesh),
                                          self.rng)
    jax.block_until_ready(metrics)


def bench_ours(ours: Trainer, root: str, mode: str, *, batch: int, rounds: int, steps: int,
               warmup: int) -> dict[str, Any]:
  """The "cache" row of ``mode``: images/s of the pipeline alone, the step alone and the
  two together (``train.trainer``'s compiled step, batches through ``shard_batch``)."""
  from train import data as data_lib
  config = data_config(root, mode)
  start = time.perf_counter()
  data_lib.get_info(config)  # with the cache: decodes both splits (once per process)
  setup_s = time.perf_counter() - start
  spec = data_lib.parse_data_config(config)
  rates = {"pipeline": pipeline_rate(config, batch, max(16, 2 * rounds * steps),
                                     ahead=spec.prefetch_batches + 1)}
  it = iter(data_lib.train_dataset(config, batch_size=batch, seed=0, keep_uint8=True))
  first = next(it)
  next_batch = lambda: next(it)  # noqa: E731
  fixed = lambda: first  # noqa: E731

  def step_alone(n: int) -> float:
    # The reader threads refill their buffer after the steps that drew on it: let them
    # finish before the step is timed alone.
    time.sleep(REFILL_S)
    start = time.perf_counter()
    ours.steps(fixed, n)
    return time.perf_counter() - start

  ours.steps(fixed, 1 + warmup)  # compiles for this batch's signature
  ours.steps(next_batch, warmup)
  rates.update(_rounds(batch, rounds, steps, {
      "step": step_alone, "together": lambda n: ours.steps(next_batch, n)}))
  it.close()
  return _row(mode, ours.config.model, batch, rounds * steps, rates, setup_s,
              str(first["image"].dtype))


def bench_torch(model: str, root: str, *, batch: int, rounds: int, steps: int, warmup: int
                ) -> dict[str, Any]:
  """The "cache" row of the plain PyTorch loop: the train split decoded once with Pillow
  into memory (timed as its setup), then :class:`torch_ref.TorchLoop`."""
  import configs
  from train import datasets
  from train.bench.torch_ref import TorchLoop
  start = time.perf_counter()
  source = datasets.ImageFolderSource(root, "train", 3)
  images = np.stack([source.load(i) for i in range(len(source))])
  setup_s = time.perf_counter() - start
  loop = TorchLoop(model, images, source.labels, batch=batch, mean=configs.CIFAR10_MEAN,
                   std=configs.CIFAR10_STD, padding=4)
  fixed = loop.next_batch()

  def pipeline(n: int) -> None:
    for _ in range(n):
      loop.next_batch()

  def step_alone(n: int) -> None:
    for _ in range(n):
      loop.step(*fixed)

  def together(n: int) -> None:
    for _ in range(n):
      loop.step(*loop.next_batch())

  step_alone(1 + warmup)
  rates = _rounds(batch, rounds, steps, {"pipeline": pipeline, "step": step_alone,
                                         "together": together})
  return _row("torch", model, batch, rounds * steps, rates, setup_s, "float32")


def _row(mode: str, model: str, batch: int, steps: int, rates: dict[str, float],
         setup_s: float, dtype: str) -> dict[str, Any]:
  return {"kind": "cache", "mode": mode, "model": model, "batch": batch, "steps": steps,
          "pipeline_images_per_second": rates["pipeline"],
          "step_images_per_second": rates["step"],
          "images_per_second": rates["together"],
          # The pipeline's seconds per image over those of pipeline and step in turn.
          "pipeline_share": rates["step"] / (rates["pipeline"] + rates["step"]),
          "slowdown": 1.0 - rates["together"] / rates["step"],
          "setup_s": setup_s, "batch_dtype": dtype, "load_average": os.getloadavg()[0]}


def bench_cache(model: str, *, batch: int, steps: int, warmup: int = 2,
                num_images: int = CACHE_IMAGES, root: str | None = None,
                against: str | None = None, rounds: int = 4) -> list[dict[str, Any]]:
  """One "cache" row per mode of :data:`MODES` (and "torch" with ``against``), each timed
  over ``rounds`` rounds of ``steps`` steps."""
  rows = []
  with jpeg_folder(root, num_images) as folder:
    ours = Trainer(model, batch, folder)
    for mode in MODES:
      progress(f"--cache {mode}")
      rows.append(bench_ours(ours, folder, mode, batch=batch, rounds=rounds, steps=steps,
                             warmup=warmup))
    if against == "torch":
      progress("--cache torch")
      rows.append(bench_torch(model, folder, batch=batch, rounds=rounds, steps=steps,
                              warmup=warmup))
  return rows


def markdown(rows: list[dict[str, Any]]) -> list[str]:
  """A table of the "cache" rows, after a blank line."""
  from train.bench.common import table
  cache = [r for r in rows if r["kind"] == "cache"]
  return table(
      ["path", "pipeline alone img/s", "step alone img/s", "end to end img/s",
       "pipeline's share", "end to end / step alone", "setup s", "load"],
      [[r["mode"], f"{r['pipeline_images_per_second']:.0f}",
        f"{r['step_images_per_second']:.0f}", f"{r['images_per_second']:.0f}",
        f"{100 * r['pipeline_share']:.1f}%", f"{1 - r['slowdown']:.3f}",
        f"{r['setup_s']:.1f}",
        f"{r['load_average']:.1f}"] for r in cache])
