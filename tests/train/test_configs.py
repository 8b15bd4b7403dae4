"""Tests of configs/: every experiment builds and locks, full and smoke, names a registered
model, passes the trainer's checks (model_kwargs keys included), carries its paper's
hyperparameters, and keeps run histories out of its docstring."""

from __future__ import annotations

import glob
import importlib
import os

import ml_collections
import pytest

import configs
from attention_flax import models
from train import state as state_lib
from train import trainer

CONFIG_DIR = os.path.dirname(configs.__file__)
NAMES = sorted(os.path.splitext(os.path.basename(p))[0]
               for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
               if not p.endswith("__init__.py"))


def load(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_every_experiment_is_listed():
  assert set(NAMES) >= {
      "default", "digits_stn", "digits_cbam", "digits_attention", "cifar10_resnet20",
      "cifar10_se_resnet110",
      "cifar10_attention92", "imagenet_resnet50", "imagenet_seresnet50",
      "imagenet_cbam_resnet50"}


def _flat_keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    keys.add(prefix + key)
    if isinstance(value, ml_collections.ConfigDict) and key != "model_kwargs":
      keys |= _flat_keys(value, f"{prefix}{key}.")
  return keys


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_builds_locks_and_validates(name, arg):
  config = load(name, arg)
  config.lock()
  with pytest.raises(AttributeError):
    config.no_such_key = 1  # locked: a typo cannot add a key
  assert _flat_keys(config) == _flat_keys(configs.base_config())
  models.model_info(config.model)
  trainer.validate_config(config)
  module = importlib.import_module(f"configs.{name}")
  run_line = f"--config=configs/{name}.py"
  assert run_line in module.__doc__ and f"{run_line}:smoke" in module.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_docstring_says_what_it_trains_not_how_runs_went(name):
  # Measurements and run histories live in docs/pictures.md and docs/benchmarks.md.
  doc = importlib.import_module(f"configs.{name}").__doc__
  for word in ("Measured", "images/s", "Repeated", "attention_flax.conv", "min "):
    assert word not in doc, f"configs/{name}.py docstring: {word!r}"


@pytest.mark.parametrize("name", NAMES)
def test_smoke_is_small_and_offline(name):
  config = load(name, "smoke")
  assert 0 < config.num_train_steps <= 4 and config.batch_size <= 8
  assert not config.progress_bar
  # tfds experiments switch to mock data; the digits ones ship their data.
  assert (config.mock_data > 0) == (config.data.name == "tfds")
  assert config.data.name in ("digits", "distorted_digits", "tfds")


def test_unknown_argument_is_refused():
  with pytest.raises(ValueError, match="Unknown config argument 'fast'.*smoke"):
    load("default", "fast")


def test_cifar10_resnet20_is_he_et_al_section_4_2():
  c = load("cifar10_resnet20")
  assert (c.model, c.optimizer, c.learning_rate, c.momentum, c.weight_decay) == (
      "resnet20", "sgd", 0.1, 0.9, 1e-4)
  assert (c.batch_size, c.num_train_steps, tuple(c.decay_steps), c.decay_factor) == (
      128, 64_000, (32_000, 48_000), 0.1)
  assert (c.data.tfds_name, c.data.augment.crop_padding, c.data.augment.flip) == (
      "cifar10", 4, True)


def test_cifar10_se_resnet110_and_attention92():
  c = load("cifar10_se_resnet110")
  assert (c.model, c.learning_rate, c.num_train_steps, tuple(c.decay_steps)) == (
      "se_resnet110", 0.1, 64_000, (32_000, 48_000))
  c = load("cifar10_attention92")
  assert (c.model, c.optimizer, c.nesterov, c.learning_rate, c.weight_decay) == (
      "attention92_cifar", "sgd", True, 0.1, 1e-4)
  assert (c.batch_size, c.num_train_steps, tuple(c.decay_steps)) == (
      64, 160_000, (64_000, 96_000))


def test_imagenet_recipes():
  c = load("imagenet_seresnet50")
  assert (c.model, c.batch_size, c.learning_rate, c.momentum, c.num_epochs) == (
      "seresnet50", 1024, 0.6, 0.9, 100.0)
  assert tuple(c.decay_epochs) == (30, 60, 90) and c.schedule == "step"
  assert c.data.augment.random_resized_crop and c.data.augment.flip
  assert c.data.image_size == 224
  for name, model in (("imagenet_cbam_resnet50", "cbam_resnet50"),
                      ("imagenet_resnet50", "resnet50")):
    c = load(name)
    assert (c.model, c.batch_size, c.learning_rate, c.num_epochs) == (model, 256, 0.1, 90.0)
    assert tuple(c.decay_epochs) == (30, 60) and c.weight_decay == 1e-4


def test_digits_stn_compares_with_the_plain_cnn():
  c = load("digits_stn")
  assert (c.model, c.compare_with) == ("stn_cnn", "cnn_digits")
  assert (c.data.name, c.data.image_size, c.data.channels) == ("distorted_digits", 40, 1)
  models.model_info(c.compare_with)


@pytest.mark.parametrize("name,model", [("digits_cbam", "cbam_resnet20"),
                                        ("digits_attention", "attention56_cifar")])
def test_picture_runs_are_the_default_recipe_with_another_model(name, model):
  c, d = load(name), load("default")
  assert c.model == model
  same = [k for k in d.keys() if k not in ("model", "model_kwargs", "num_epochs", "data")]
  assert [k for k in same if c[k] != d[k]] == []
  assert c.data.to_dict() == d.data.to_dict()
  assert c.num_epochs == {"digits_cbam": 8.0, "digits_attention": 10.0}[name]
  # The smoke variant shrinks the same way as the default's.
  smoke, default_smoke = load(name, "smoke"), load("default", "smoke")
  assert (smoke.num_train_steps, smoke.batch_size) == (
      default_smoke.num_train_steps, default_smoke.batch_size)


def test_digits_cbam_passes_zero_init_last_to_the_model():
  c = load("digits_cbam")
  assert c.model_kwargs.to_dict() == {"zero_init_last": False}
  assert "zero_init_last" in state_lib.model_fields(c.model)
  model = trainer.build_model(c, 10)
  assert model.zero_init_last is False
  assert trainer.build_model(load("default"), 10).zero_init_last is True
