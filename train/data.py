"""The input pipeline: ``config.data`` -> grain datasets of normalised (N, H, W, C) batches.

The trainer calls only :func:`get_info`, :func:`train_dataset` and :func:`eval_batches`.
Sources (``train.datasets``) are random-access; the pipeline is

  MapDataset.source(src).seed(seed)[process_index::process_count]
    .shuffle() -> decode -> augment (random_map) -> normalise -> batch -> repeat()

so every epoch is reshuffled and re-augmented from ``seed`` alone, each process reads its
own disjoint slice, and an iterator's ``get_state()`` / ``set_state()`` resumes exactly.
Every epoch yields ``len(slice) // batch_size`` batches (the remainder is dropped per epoch).

``config.data`` keys (see the configs): name, tfds_name, data_dir, train_split, eval_split,
image_size, channels, augment (crop_padding, flip, random_resized_crop, min_area), mean,
std, worker_count, seed. Optional keys: ``crop_pct`` (0.875; eval resize-then-centre-crop
used with random_resized_crop, timm's convention), ``num_threads`` / ``prefetch_batches``
(4 / 4, reader threads and batches read ahead), digits ``placement`` ("resize" or "pad"),
distorted digits ``train_copies``, ``eval_copies``, ``max_rotation``, ``scale_range``,
``clutter``, ``digit_size``, ``clutter_size`` (defaults in ``train.datasets``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from train import datasets

DATA_NAMES = ("digits", "distorted_digits", "tfds", "folder")
_DEFAULT_SIZE = {"digits": 16, "distorted_digits": 60}
# ITU-R 601 luma, the weights of Pillow's RGB -> "L" conversion.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know before the first batch; sizes count whole splits."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_eval: int


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A validated, hashable reading of ``config.data`` (see the module docstring)."""
  name: str
  tfds_name: str | None
  data_dir: str | None
  train_split: str
  eval_split: str
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_padding: int
  flip: bool
  random_resized_crop: bool
  min_area: float
  crop_pct: float
  worker_count: int
  num_threads: int
  prefetch_batches: int
  seed: int
  options: tuple[tuple[str, Any], ...]  # source-specific extras (digits, distortions)


def _get(config: Any, key: str, default: Any = None) -> Any:
  if config is None:
    return default
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value


def _int(value: Any, what: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}.")
  return int(value)


def parse_data_config(config: Any) -> DataSpec:
  """Checks ``config.data`` once, raising errors that name the fix."""
  name = _get(config, "name")
  if name not in DATA_NAMES:
    raise ValueError(f"Unknown config.data.name {name!r}; choose one of {DATA_NAMES}.")
  channels = _int(_get(config, "channels", 1 if "digits" in name else 3), "data.channels", 1)
  if channels not in (1, 3):
    raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
  mean = tuple(float(v) for v in np.atleast_1d(_get(config, "mean", (0.0,) * channels)))
  std = tuple(float(v) for v in np.atleast_1d(_get(config, "std", (1.0,) * channels)))
  for key, values in (("mean", mean), ("std", std)):
    if len(values) != channels:
      raise ValueError(
          f"config.data.{key} has {len(values)} values {values} but data.channels is "
          f"{channels}; give one {key} per channel.")
  if min(std) <= 0.0:
    raise ValueError(f"config.data.std must be positive, got {std}.")
  size = _get(config, "image_size", _DEFAULT_SIZE.get(name))
  if size is None:
    raise ValueError(f"Set config.data.image_size for data.name={name!r}.")
  augment = _get(config, "augment")
  min_area = float(_get(augment, "min_area", 0.08))
  if not 0.0 < min_area <= 1.0:
    raise ValueError(f"data.augment.min_area must be in (0, 1], got {min_area}.")
  crop_pct = float(_get(config, "crop_pct", 0.875))
  if not 0.0 < crop_pct <= 1.0:
    raise ValueError(f"data.crop_pct must be in (0, 1], got {crop_pct}.")
  tfds_name = _get(config, "tfds_name")
  data_dir = _get(config, "data_dir")
  if name == "tfds" and not tfds_name:
    raise ValueError("data.name='tfds' needs config.data.tfds_name, e.g. 'cifar10'.")
  if name == "folder" and not data_dir:
    raise ValueError("data.name='folder' needs config.data.data_dir: the folder holding "
                     "<split>/<class>/*.png|jpg.")
  extras = ("placement",) if name == "digits" else (
      "train_copies", "eval_copies", "max_rotation", "scale_range", "clutter",
      "digit_size", "clutter_size") if name == "distorted_digits" else ()
  options = []
  for key in extras:
    value = _get(config, key)
    if value is not None:
      options.append((key, tuple(value) if isinstance(value, (list, tuple)) else value))
  return DataSpec(
      name=name, tfds_name=tfds_name, data_dir=data_dir,
      train_split=str(_get(config, "train_split", "train")),
      eval_split=str(_get(config, "eval_split", "test")),
      image_size=_int(size, "data.image_size", 1), channels=channels, mean=mean, std=std,
      crop_padding=_int(_get(augment, "crop_padding", 0), "data.augment.crop_padding", 0),
      flip=bool(_get(augment, "flip", False)),
      random_resized_crop=bool(_get(augment, "random_resized_crop", False)),
      min_area=min_area, crop_pct=crop_pct,
      worker_count=_int(_get(config, "worker_count", 0), "data.worker_count", 0),
      num_threads=_int(_get(config, "num_threads", 4), "data.num_threads", 0),
      prefetch_batches=_int(_get(config, "prefetch_batches", 4), "data.prefetch_batches", 1),
      seed=_int(_get(config, "seed", 0), "data.seed", 0), options=tuple(options))


def _spec(config: Any) -> DataSpec:
  return config if isinstance(config, DataSpec) else parse_data_config(config)


def make_source(spec: DataSpec, split: str) -> Any:
  """The random-access source of one split (``train.datasets``)."""
  options = dict(spec.options)
  if spec.name == "digits":
    return datasets.digits_source(split, seed=spec.seed, image_size=spec.image_size,
                                  placement=options.get("placement", "resize"))
  if spec.name == "distorted_digits":
    train_copies = options.pop("train_copies", None)
    eval_copies = options.pop("eval_copies", None)
    return datasets.distorted_digits_source(
        split, seed=spec.seed, image_size=spec.image_size,
        copies=train_copies if split == "train" else eval_copies, **options)
  if spec.name == "tfds":
    return datasets.tfds_source(spec.tfds_name, split, spec.data_dir)
  classes = datasets.folder_classes(spec.data_dir, spec.train_split)
  return datasets.ImageFolderSource(spec.data_dir, split, spec.channels, classes)


def get_info(data_config: Any) -> DatasetInfo:
  """Number of classes, image shape (H, W, C) after preprocessing and split sizes."""
  spec = _spec(data_config)
  if spec.name == "tfds":
    num_classes = datasets.tfds_num_classes(spec.tfds_name, spec.data_dir)
  elif spec.name == "folder":
    num_classes = len(datasets.folder_classes(spec.data_dir, spec.train_split))
  else:
    num_classes = datasets.DIGITS_NUM_CLASSES
  return DatasetInfo(
      name=spec.tfds_name if spec.name == "tfds" else spec.name, num_classes=num_classes,
      image_shape=(spec.image_size, spec.image_size, spec.channels),
      num_train=len(make_source(spec, spec.train_split)),
      num_eval=len(make_source(spec, spec.eval_split)))


# ------------------------------------------------------------------ image operations
# All take and return (H, W, C) float32 arrays in [0, 1] (before normalisation).


def to_float(image: Any) -> np.ndarray:
  """uint8 0..255 -> float32 [0, 1]; floating images are taken to be in [0, 1] already."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype == np.uint8:
    return image.astype(np.float32) / np.float32(255.0)
  if np.issubdtype(image.dtype, np.floating):
    return image.astype(np.float32)
  raise TypeError(f"Images must be uint8 (0..255) or float ([0, 1]); got {image.dtype}.")


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Grayscale -> RGB by repetition, RGB -> grayscale by luma; an alpha channel is dropped."""
  have = image.shape[-1]
  if have == 4:
    image, have = image[..., :3], 3
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if have == 3 and channels == 1:
    return (image @ _LUMA)[..., None].astype(np.float32)
  raise ValueError(f"Cannot turn {have}-channel images into {channels} channels; set "
                   "config.data.channels to 1 or 3.")


def resize(image: np.ndarray, height: int, width: int,
           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """Bilinear resize of (H, W, C) (of ``box`` = (left, top, right, bottom) if given) to
  (height, width, C) with Pillow, which filters properly when shrinking."""
  if box is None and image.shape[:2] == (height, width):
    return image
  # Pillow resizes one float plane at a time; writing each into its channel of one
  # preallocated array is 4x cheaper at 224x224x3 than stacking the planes.
  out = np.empty((height, width, image.shape[-1]), np.float32)
  for c in range(image.shape[-1]):
    plane = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
    out[..., c] = np.asarray(plane.resize((width, height), Image.Resampling.BILINEAR, box=box))
  return out


def random_crop(image: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
  """Zero-pads ``padding`` pixels on every side, then crops back to the input size at a
  uniformly random offset (the CIFAR augmentation); ``padding=0`` returns the input."""
  if padding <= 0:
    return image
  h, w, _ = image.shape
  top, left = (int(v) - padding for v in rng.integers(0, 2 * padding + 1, size=2))
  # The window's overlap with the image, copied into zeros: no padded copy is built.
  out = np.zeros_like(image)
  rows, cols = h - abs(top), w - abs(left)
  if rows > 0 and cols > 0:
    out[max(0, -top):max(0, -top) + rows, max(0, -left):max(0, -left) + cols] = (
        image[max(0, top):max(0, top) + rows, max(0, left):max(0, left) + cols])
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
  h, w, _ = image.shape
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    area = h * w * rng.uniform(min_area, 1.0)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(area * aspect)))
    ch = int(round(math.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return resize(image, size, size, box=(left, top, left + cw, top + ch))
  aspect = w / h
  if aspect < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif aspect > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  top, left = (h - ch) // 2, (w - cw) // 2
  return resize(image, size, size, box=(left, top, left + cw, top + ch))


def center_crop(image: np.ndarray, size: int, crop_pct: float = 0.875) -> np.ndarray:
  """Resizes the shorter side to floor(size / crop_pct), then takes the central
  (size, size) window (timm's eval transform)."""
  h, w, _ = image.shape
  short = math.floor(size / crop_pct)
  nh, nw = (short, max(short, round(w * short / h))) if h <= w else (
      max(short, round(h * short / w)), short)
  image = resize(image, nh, nw)
  top, left = (nh - size) // 2, (nw - size) // 2
  return image[top:top + size, left:left + size]


# ------------------------------------------------- pipeline steps (top level: picklable)


@dataclasses.dataclass(frozen=True)
class Decode:
  """Source example -> {"image": (H, W, channels) float32 in [0, 1], "label": int32};
  other fields (tfds ids, file names) are dropped so that batching sees arrays only.
  A grayscale image bound for 3 channels stays (H, W, 1): augmenting one plane is a third
  of the work, and :class:`Normalize` writes it into every channel."""
  channels: int

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    image = to_float(example["image"])
    if image.shape[-1] != 1:
      image = match_channels(image, self.channels)
    return {"image": image, "label": np.int32(example["label"])}


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """Random-resized crop, or resize + random crop with padding; then optional flip."""
  image_size: int
  crop_padding: int = 0
  flip: bool = False
  random_resized_crop: bool = False
  min_area: float = 0.08

  def __call__(self, example: dict[str, np.ndarray], rng: np.random.Generator):
    image = example["image"]
    if self.random_resized_crop:
      image = random_resized_crop(image, rng, self.image_size, self.min_area)
    else:
      image = random_crop(resize(image, self.image_size, self.image_size), rng,
                          self.crop_padding)
    if self.flip:
      image = random_flip(image, rng)
    return {"image": image, "label": example["label"]}


@dataclasses.dataclass(frozen=True)
class EvalResize:
  """Deterministic eval view: centre crop after resize (ImageNet-style) or plain resize."""
  image_size: int
  crop: bool = False
  crop_pct: float = 0.875

  def __call__(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    image = example["image"]
    if self.crop:
      image = center_crop(image, self.image_size, self.crop_pct)
    else:
      image = resize(image, self.image_size, self.image_size)
    return {"image": image, "label": example["label"]}


@dataclasses.dataclass(frozen=True)
class Normalize:
  """(image - mean) / std per channel into a fresh contiguous float32 (H, W, len(mean))
  array; a one-channel image is broadcast to every channel (grayscale -> RGB)."""
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __call__(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    source = example["image"]
    h, w, c = source.shape
    channels = len(self.mean)
    if c not in (1, channels):
      raise ValueError(f"Normalize got {c}-channel images for {channels} mean/std values.")
    image = np.empty((h, w, channels), np.float32)
    image[...] = source
    # Rows of W * C values against the per-channel constants tiled W times: numpy's inner
    # loop then runs over W * C elements instead of C (3.4x faster at 224x224x3).
    mean, std = _tiled(self.mean, self.std, w)
    rows = image.reshape(h, w * channels)
    rows -= mean
    rows /= std
    return {"image": image, "label": example["label"]}


@functools.lru_cache(maxsize=64)
def _tiled(mean: tuple[float, ...], std: tuple[float, ...],
           width: int) -> tuple[np.ndarray, np.ndarray]:
  return (np.tile(np.asarray(mean, np.float32), width),
          np.tile(np.asarray(std, np.float32), width))


# ----------------------------------------------------------------------- datasets


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> None:
  _int(batch_size, "batch_size", 1)
  _int(process_count, "process_count", 1)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")


def _read_options(spec: DataSpec) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=spec.num_threads,
                           prefetch_buffer_size=spec.prefetch_batches)


def train_dataset(data_config: Any, *, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Endless shuffled, augmented batches of this process's slice of the train split.

  Yields {"image": float32 (batch_size, H, W, C) normalised, "label": int32 (batch_size,)}.
  ``batch_size`` is per process. Deterministic in ``seed``; worker processes are used
  only when ``data.worker_count > 0``.
  """
  spec = _spec(data_config)
  _check_sharding(batch_size, process_index, process_count)
  seed = _int(seed, "seed", 0)
  source = make_source(spec, spec.train_split)
  ds = grain.MapDataset.source(source).seed(seed)[process_index::process_count]
  if len(ds) < batch_size:
    raise ValueError(
        f"batch_size {batch_size} per process is larger than the {len(ds)} train examples "
        f"this process reads ({len(source)} in split {spec.train_split!r} over "
        f"{process_count} process(es)); lower config.batch_size.")
  # Augmentation streams differ per process; the seed mixes in the process index.
  augment_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
  ds = (ds.shuffle()
        .map(Decode(spec.channels))
        .random_map(TrainAugment(spec.image_size, spec.crop_padding, spec.flip,
                                 spec.random_resized_crop, spec.min_area), seed=augment_seed)
        .map(Normalize(spec.mean, spec.std))
        .batch(batch_size, drop_remainder=True)
        .repeat())
  it = ds.to_iter_dataset(_read_options(spec))
  if spec.worker_count > 0:
    # grain 0.2.18 workers read absl flags; outside absl.app.run they are unparsed.
    from absl import flags  # only needed with workers
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.worker_count))
  return it


def eval_batches(data_config: Any, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's slice of the eval split, no augmentation.

  Yields {"image": float32 (batch_size, H, W, C), "label": int32 (batch_size,), "mask":
  float32 (batch_size,)}; padded rows (zeros) have mask 0. Every process yields the same
  number of batches, ceil(ceil(num_eval / process_count) / batch_size), so collective eval
  steps stay in step. Configuration errors are raised here, not on the first batch.
  """
  spec = _spec(data_config)
  _check_sharding(batch_size, process_index, process_count)
  source = make_source(spec, spec.eval_split)
  per_process = -(-len(source) // process_count)  # ceiling divisions
  num_batches = -(-per_process // batch_size)
  ds = (grain.MapDataset.source(source)[process_index::process_count]
        .map(Decode(spec.channels))
        .map(EvalResize(spec.image_size, spec.random_resized_crop, spec.crop_pct))
        .map(Normalize(spec.mean, spec.std))
        .batch(batch_size, drop_remainder=False))
  shape = (batch_size, spec.image_size, spec.image_size, spec.channels)
  return _padded(iter(ds.to_iter_dataset(_read_options(spec))), num_batches, shape)


def _padded(batches: Iterator[dict[str, np.ndarray]], num_batches: int,
            shape: Sequence[int]) -> Iterator[dict[str, np.ndarray]]:
  size = shape[0]
  for _ in range(num_batches):
    batch = next(batches, None)
    real = 0 if batch is None else len(batch["label"])
    if real == size:
      yield {**batch, "mask": np.ones((size,), np.float32)}
      continue
    image = np.zeros(shape, np.float32)
    label = np.zeros((size,), np.int32)
    if real:
      image[:real] = batch["image"]
      label[:real] = batch["label"]
    mask = (np.arange(size) < real).astype(np.float32)
    yield {"image": image, "label": label, "mask": mask}
