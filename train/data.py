"""The input pipeline: ``config.data`` -> grain datasets of normalised (N, H, W, C) batches.

The trainer calls only :func:`get_info`, :func:`train_dataset` and :func:`eval_batches`.
Sources (``train.datasets``) are random-access; the steps are in ``train.transforms``;
the pipeline is

  MapDataset.source(src).seed(seed).shuffle() -> decode -> augment (random_map)
    -> [:whole global batches] -> batch(per-process rows) -> [process_index::process_count]
    -> repeat()

The shuffle and the augmentation are global: every epoch is reshuffled and re-augmented
from ``seed`` alone, the same way on every process, and each process takes its own rows,
``[process_index * B, (process_index + 1) * B)`` with ``B = batch_size``, of each global
batch of ``B * process_count``. So the global batch at every step is the same whatever the
number of processes, and a process only reads and decodes its own rows (the steps are
lazy). Every epoch yields ``len(split) // (B * process_count)`` batches (the remainder is
dropped per epoch), and an iterator's ``get_state()`` / ``set_state()`` resumes exactly.

``config.data`` keys (see the configs): name, tfds_name, data_dir, train_split, eval_split,
image_size, channels, augment (crop_padding, flip, random_resized_crop, min_area), mean,
std, worker_count, seed, normalize_on_device (True: the trainer asks for uint8 pixels
from uint8 sources and normalises them in its jitted step), augment_on_device (True:
batches of images at their stored size with each one's crop window and flip, which
``train.device_augment`` applies in the jitted step; sources of one image size only).
Optional keys: ``crop_pct`` (0.875; eval resize-then-centre-crop used with
random_resized_crop, timm's convention),
``num_threads`` / ``prefetch_batches`` (4 / 4, reader threads and batches read ahead),
digits ``placement`` ("resize" or "pad"), distorted digits ``train_copies``,
``eval_copies``, ``max_rotation``, ``scale_range``, ``clutter``, ``digit_size``,
``clutter_size`` (defaults in ``train.datasets``). Image folders: ``check_files``
(1000: files decoded when the run starts, spread over each split; -1 all, 0 none) and
``skip_bad_files`` (False; True leaves files that do not decode out and counts them,
``train.image_files``). ``cache`` (False; True decodes each split once into memory, uint8,
``train.memory_cache``) and ``cache_max_gb`` (0: half the available memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from train import datasets
from train.transforms import Collate, Decode, EvalResize, TrainAugment

DATA_NAMES = ("digits", "distorted_digits", "tfds", "folder")
CHECK_FILES = 1000  # image-folder files decoded per split when a run starts (the default)
_DEFAULT_SIZE = {"digits": 16, "distorted_digits": 60}

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
  normalize_on_device: bool
  augment_on_device: bool
  options: tuple[tuple[str, Any], ...]  # source-specific extras (digits, distortions)
  check_files: int = CHECK_FILES  # image folders: files decoded at the start, -1 all
  skip_bad_files: bool = False  # image folders: leave out (and count) bad files
  cache: bool = False  # decode each split once into memory (train.memory_cache)
  cache_max_gb: float = 0.0  # the cache's limit per split; 0: half the available memory


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
  augment_on_device = bool(_get(config, "augment_on_device", False))
  normalize_on_device = bool(_get(config, "normalize_on_device", True))
  if augment_on_device and not normalize_on_device:
    raise ValueError("data.augment_on_device=True normalises the images on the device as "
                     "well, after resizing them; drop data.normalize_on_device=False, or "
                     "set data.augment_on_device=False.")
  check_files = _int(_get(config, "check_files", CHECK_FILES), "data.check_files", -1)
  cache_max_gb = _get(config, "cache_max_gb", 0.0)
  if (isinstance(cache_max_gb, bool) or not isinstance(cache_max_gb, (int, float))
      or cache_max_gb < 0):
    raise ValueError(f"data.cache_max_gb must be a number of GiB >= 0 (0: half the "
                     f"available memory), got {cache_max_gb!r}.")
  flags = {}
  for key in ("skip_bad_files", "cache"):
    flags[key] = _get(config, key, False)
    if not isinstance(flags[key], (bool, np.bool_)):
      raise ValueError(f"data.{key} must be True or False, got {flags[key]!r}.")
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
      seed=_int(_get(config, "seed", 0), "data.seed", 0),
      normalize_on_device=normalize_on_device, augment_on_device=augment_on_device,
      options=tuple(options), check_files=check_files,
      skip_bad_files=bool(flags["skip_bad_files"]), cache=bool(flags["cache"]),
      cache_max_gb=float(cache_max_gb))


def _spec(config: Any) -> DataSpec:
  return config if isinstance(config, DataSpec) else parse_data_config(config)


def make_source(spec: DataSpec, split: str) -> Any:
  """The random-access source of one split (``train.datasets``); with ``data.cache`` its
  images decoded once into memory (``train.memory_cache``)."""
  source = _stored_source(spec, split)
  if not spec.cache:
    return source
  from train import memory_cache
  key = (spec.name, spec.tfds_name, spec.data_dir, spec.channels, spec.skip_bad_files)
  return memory_cache.in_memory(source, key=key, split=split,
                                cache_max_gb=spec.cache_max_gb,
                                skip_bad_files=spec.skip_bad_files,
                                threads=max(1, spec.num_threads))


def bad_files(data_config: Any) -> dict[str, Any] | None:
  """For an image folder, {"count": files found bad so far in this process, "paths": the
  first few} (``train.image_files``); None for other data."""
  spec = _spec(data_config)
  if spec.name != "folder":
    return None
  from train import image_files
  return image_files.summary(spec.data_dir)


def _stored_source(spec: DataSpec, split: str) -> Any:
  """The source of one split as stored: decoded on access for tfds and image folders."""
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
  # With the cache every file is decoded there anyway: that is the whole check.
  return datasets.ImageFolderSource(
      spec.data_dir, split, spec.channels, classes,
      check_files=0 if spec.cache else spec.check_files,
      skip_bad_files=spec.skip_bad_files, threads=max(1, spec.num_threads))


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
                  process_count: int = 1, keep_uint8: bool = False) -> grain.IterDataset:
  """Endless shuffled, augmented batches of this process's slice of the train split.

  Yields {"image": float32 (batch_size, H, W, C) normalised, "label": int32 (batch_size,)}.
  With ``keep_uint8``, a source of uint8 images (tfds, image folders, distorted digits)
  yields them as uint8 (batch_size, H, W, C) pixels instead, for ``normalize_images`` in
  ``train.device_augment`` to normalise on the device. With ``data.augment_on_device``
  the images are the source's, unresized and unnormalised (uint8, or float in [0, 1]), and
  the batch adds "box" float32 (batch_size, 4) and "mirror" bool (batch_size,) for
  ``train.device_augment``. ``batch_size`` is per process: the batch is rows
  ``[process_index * batch_size, (process_index + 1) * batch_size)`` of the global batch of
  ``batch_size * process_count`` rows, which depends on ``seed`` alone (see the module
  docstring). Worker processes are used only when ``data.worker_count > 0``.
  """
  spec = _spec(data_config)
  _check_sharding(batch_size, process_index, process_count)
  seed = _int(seed, "seed", 0)
  source = make_source(spec, spec.train_split)
  global_batch = batch_size * process_count
  if len(source) < global_batch:
    raise ValueError(
        f"The global batch, {batch_size} per process x {process_count} process(es), is "
        f"larger than the {len(source)} train examples of split {spec.train_split!r}; "
        "lower config.batch_size.")
  # One augmentation stream for every process: random_map seeds each example from this
  # seed and the example's global position, whichever process reads it.
  augment_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])
  on_device = spec.augment_on_device
  # The full slice [:] changes nothing but the shuffle's derived seed (grain mixes in the
  # depth below .seed()): it keeps the order that one process has always read.
  ds = (grain.MapDataset.source(source).seed(seed)[:].shuffle()
        .map(Decode(spec.channels, keep_uint8 or on_device))
        .random_map(TrainAugment(spec.image_size, spec.crop_padding, spec.flip,
                                 spec.random_resized_crop, spec.min_area, on_device),
                    seed=augment_seed))
  # Whole global batches per epoch, cut into process_count runs of batch_size rows: the
  # global batch k is runs k * process_count ... (k + 1) * process_count - 1 in order.
  ds = (ds[:len(source) // global_batch * global_batch]
        .batch(batch_size, drop_remainder=True,
               batch_fn=Collate(spec.mean, spec.std, on_device))
        [process_index::process_count]
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
                 process_count: int = 1, keep_uint8: bool = False,
                 augment_on_device: bool | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's rows of the eval split, no augmentation.

  Yields {"image": float32 (batch_size, H, W, C), "label": int32 (batch_size,), "mask":
  float32 (batch_size,)}; padded rows (zeros) have mask 0. ``keep_uint8`` is as for
  :func:`train_dataset`; so is ``augment_on_device`` (None: ``data.augment_on_device``),
  whose batches hold the stored images with the eval view's "box" and a false "mirror"
  (the resize, made on the device). The split is read in order in global batches of
  ``batch_size * process_count`` rows, of which this process takes rows
  ``[process_index * batch_size, (process_index + 1) * batch_size)``, so the global batches
  are the same whatever the number of processes. Every process yields the same number of
  batches, ceil(num_eval / (batch_size * process_count)), so collective eval steps stay in
  step. Configuration errors are raised here, not on the first batch.
  """
  spec = _spec(data_config)
  _check_sharding(batch_size, process_index, process_count)
  source = make_source(spec, spec.eval_split)
  num_batches = -(-len(source) // (batch_size * process_count))  # a ceiling division
  on_device = spec.augment_on_device if augment_on_device is None else augment_on_device
  keep_uint8 = keep_uint8 or on_device
  decode = Decode(spec.channels, keep_uint8)
  # Runs of batch_size rows in order; run c is process c % process_count's share of the
  # global batch c // process_count (a process short of a run gets a padding batch).
  ds = (grain.MapDataset.source(source)
        .map(decode)
        .map(EvalResize(spec.image_size, spec.random_resized_crop, spec.crop_pct, on_device))
        .batch(batch_size, drop_remainder=False,
               batch_fn=Collate(spec.mean, spec.std, on_device))
        [process_index::process_count])
  # Padding rows take the shape and dtype of the real ones, the same in every process:
  # those of the split's first image as decoded (uint8 only with keep_uint8 and a uint8
  # source; its stored size on the device path).
  first = decode(source[0])["image"] if len(source) else None
  dtype = first.dtype if keep_uint8 and first is not None else np.float32
  side = (spec.image_size, spec.image_size)
  template = {"label": ((), np.int32, 0)}
  if on_device:
    side = first.shape[:2] if first is not None else side
    # A padding row's window is its whole (zero) image: a zero-sized one would divide by 0.
    template.update(box=((4,), np.float32, (0, 0, *side)), mirror=((), np.bool_, False))
  template["image"] = ((*side, spec.channels), dtype, 0)
  return _padded(iter(ds.to_iter_dataset(_read_options(spec))), num_batches, batch_size,
                 template)


def _padded(batches: Iterator[dict[str, np.ndarray]], num_batches: int, size: int,
            template: dict[str, tuple[tuple[int, ...], Any, Any]]
            ) -> Iterator[dict[str, np.ndarray]]:
  """``num_batches`` batches of ``size`` rows, the last ones padded with rows of the
  ``template``'s (shape per row, dtype, fill value) for each key, plus "mask" (1 = real
  row)."""
  for _ in range(num_batches):
    batch = next(batches, None)
    real = 0 if batch is None else len(batch["label"])
    if real == size:
      yield {**batch, "mask": np.ones((size,), np.float32)}
      continue
    padded = {}
    for key, (shape, dtype, fill) in template.items():
      padded[key] = np.empty((size, *shape), dtype)
      padded[key][...] = fill
      if real:
        padded[key][:real] = batch[key]
    padded["mask"] = (np.arange(size) < real).astype(np.float32)
    yield padded
