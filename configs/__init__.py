"""Experiment configs: one python file per experiment, each with ``get_config(arg=None)``.

Every experiment starts from ``base_config()``, which holds every key the trainer
(``train/trainer.py``) and the data pipeline (``train/data.py``) read, with its default, so
an experiment file states only what its paper prescribes. ``get_config("smoke")`` of any
experiment shrinks it through ``shrink_for_smoke`` to a few steps on the embedded digits or
on tfds mock data, so every config can be exercised without a dataset or an accelerator.

Keys (beyond the data block, documented in ``data_config``):
  model, model_kwargs: registry name and the overrides passed to ``create_model``; on the
    command line ``--config.model_kwargs.KEY=VALUE``, KEY one of the model's fields.
  compare_with: models trained after ``model`` with the same settings, comma-separated,
    each ``name`` or ``name:key=value;key=value`` (its own model_kwargs); one entry trains
    into ``workdir/baseline``, several into ``workdir/compared/<entry>``; every test
    accuracy is reported. "" = none.
  batch_size, eval_batch_size: global batch sizes (split over processes and devices).
  num_epochs, num_train_steps: training length; ``num_train_steps > 0`` wins.
  optimizer ("sgd" | "adamw"), learning_rate, momentum, nesterov, weight_decay, b1, b2.
  weight_decay_on: "kernels" (convolution and dense kernels only; biases and norm
    parameters never decay) or "all" (every parameter, as torch.optim.SGD / AdamW given
    ``model.parameters()``).
  schedule ("constant" | "step" | "cosine"), warmup_epochs, decay_epochs, decay_steps
    (non-empty wins over decay_epochs; papers that count iterations use it), decay_factor.
  label_smoothing, grad_clip_norm (0 = off), half_precision (bf16 compute, f32 params).
  log_every_steps, eval_every_steps (0 = only at the end), checkpoint_every_steps,
    keep_checkpoints, seed, progress_bar, plot_curves.
  mock_data: > 0 replaces tfds datasets by this many random examples per split
    (``tfds.testing.mock_data``); for smoke runs and tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Training examples per epoch, used to turn the papers' iteration counts into epochs for
# the docstrings; the trainer itself reads the split sizes from the data pipeline.
CIFAR10_TRAIN = 50_000
IMAGENET_TRAIN = 1_281_167


def data_config(name: str = "digits", **overrides) -> ml_collections.ConfigDict:
  """The data block read by ``train.data``.

  Keys: name ("digits" | "distorted_digits" | "tfds" | "folder"), tfds_name, data_dir
  (None = tfds default, or the image-folder root), train_split, eval_split, image_size
  (square side after preprocessing), channels, augment (crop_padding, flip,
  random_resized_crop, min_area), mean and std (per channel, after scaling to [0, 1]),
  worker_count, seed (fixes the digits train/test split and the distortions),
  normalize_on_device (uint8 images travel to the device as uint8 and are normalised in
  the jitted step; float images, such as the embedded digits, are normalised on the host),
  augment_on_device (False; True: images travel at their stored size and are resized,
  cropped, flipped and normalised in the jitted step, ``train.device_augment``: for
  accelerators fed from few host cores, with sources of one stored image size),
  max_rotation, scale_range, clutter, clutter_size, digit_size, train_copies, eval_copies
  (distorted digits: ``train.datasets.distort_digits``; None keeps the default; e.g.
  max_rotation=0.0, scale_range=(1.0, 1.0) and clutter=0 place each digit by translation
  only, as RAM's translated MNIST),
  check_files (image folders: files decoded when the run starts, spread over each split;
  1000, -1 = all, 0 = none), skip_bad_files (False: a file that does not decode stops the
  run naming it; True: it is left out, or mid-epoch replaced by the next readable file,
  and counted in results.json's "bad_files"), cache (False; True: each split of an image
  folder or tfds dataset is decoded once into memory as uint8 and read from there every
  epoch; images of one size), cache_max_gb (the cache's limit per split in GiB; 0 = half
  the memory available).
  """
  data = ml_collections.ConfigDict({
      "name": name,
      "tfds_name": "",
      "data_dir": config_dict.placeholder(str),
      "train_split": "train",
      "eval_split": "test",
      "image_size": 16,
      "channels": 1,
      "augment": {
          "crop_padding": 0,
          "flip": False,
          "random_resized_crop": False,
          "min_area": 0.08,
      },
      "mean": (0.5,),
      "std": (0.5,),
      "worker_count": 0,
      "seed": 0,
      "normalize_on_device": True,
      "augment_on_device": False,
      # distorted_digits only; None = train.datasets.DISTORTION_DEFAULTS.
      "max_rotation": config_dict.placeholder(float),
      "scale_range": config_dict.placeholder(tuple),
      "clutter": config_dict.placeholder(int),
      "clutter_size": config_dict.placeholder(int),
      "digit_size": config_dict.placeholder(int),
      "train_copies": config_dict.placeholder(int),
      "eval_copies": config_dict.placeholder(int),
      "check_files": 1000,
      "skip_bad_files": False,
      "cache": False,
      "cache_max_gb": 0.0,
  })
  for key, value in overrides.items():
    if key == "augment":
      data.augment.update(value)
    else:
      setattr(data, key, value)
  return data


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default: a small SE network on the embedded digits."""
  config = ml_collections.ConfigDict()
  config.model = "se_resnet20"
  config.model_kwargs = ml_collections.ConfigDict()
  config.compare_with = ""
  config.data = data_config()
  config.mock_data = 0

  config.batch_size = 128
  config.eval_batch_size = 256
  config.num_epochs = 30.0
  config.num_train_steps = 0

  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.weight_decay_on = "kernels"
  config.b1 = 0.9
  config.b2 = 0.999

  config.schedule = "cosine"
  config.warmup_epochs = 0.0
  config.decay_epochs = ()
  config.decay_steps = ()
  config.decay_factor = 0.1

  config.label_smoothing = 0.0
  config.grad_clip_norm = 0.0
  config.half_precision = False

  config.log_every_steps = 50
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.seed = 0
  config.progress_bar = True
  config.plot_curves = True
  # A small PNG of the attention maps at each evaluation (workdir/attention/step_N.png);
  # set False to skip it.
  config.attention_png = True
  return config


def parse_arg(arg: str | None, choices: Sequence[str] = ("smoke",)) -> str | None:
  """Checks the ``:arg`` suffix of ``--config=configs/x.py:arg``.

  Raises:
    ValueError: ``arg`` is not one of ``choices``.
  """
  if arg in (None, ""):
    return None
  if arg not in choices:
    raise ValueError(
        f"Unknown config argument {arg!r}; use one of {', '.join(choices)} "
        f"(e.g. --config=configs/default.py:smoke) or none.")
  return arg


def shrink_for_smoke(config: ml_collections.ConfigDict, *, steps: int = 4,
                     batch_size: int = 8, image_size: int | None = None,
                     mock_examples: int = 32) -> ml_collections.ConfigDict:
  """Turns a full experiment into a run of a few steps that needs no downloaded data.

  tfds experiments switch to tfds mock data (random images with the real dataset's feature
  spec); the digits experiments already use embedded data.
  """
  config.num_train_steps = steps
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.log_every_steps = 1
  config.eval_every_steps = 0
  config.checkpoint_every_steps = steps
  config.keep_checkpoints = 1
  config.warmup_epochs = 0.0
  config.decay_steps = ()
  config.decay_epochs = ()
  config.progress_bar = False
  config.attention_png = False
  if image_size is not None:
    config.data.image_size = image_size
  if config.data.name == "tfds":
    config.mock_data = mock_examples
  return config
