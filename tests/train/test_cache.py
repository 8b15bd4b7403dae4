"""data.cache: each split decoded once into memory (uint8), the same batches as the
uncached pipeline for a seed (image folders and tfds), and one-line errors when a split
does not fit or mixes image sizes."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

import configs
from train import data, datasets, memory_cache
from tests.train.test_bad_files import _write
from train.errors import UserError


@pytest.fixture(autouse=True)
def _fresh_cache():
  memory_cache.clear()
  yield
  memory_cache.clear()


def _folder_config(root, **overrides):
  return configs.data_config(
      "folder", data_dir=str(root), image_size=8, channels=3, mean=(0.4, 0.5, 0.6),
      std=(0.2, 0.25, 0.3), augment={"crop_padding": 2, "flip": True}, **overrides)


def _batches(config, steps=6, batch_size=6, keep_uint8=False):
  it = iter(data.train_dataset(config, batch_size=batch_size, seed=3,
                               keep_uint8=keep_uint8))
  train = [next(it) for _ in range(steps)]
  it.close()
  evals = list(data.eval_batches(config, batch_size=8, keep_uint8=keep_uint8))
  return train, evals


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("keep_uint8", [False, True])
def test_cached_folder_gives_the_same_batches(tmp_path, keep_uint8):
  _write(tmp_path)
  plain = _folder_config(tmp_path)
  cached = _folder_config(tmp_path, cache=True)
  train, evals = _batches(plain, keep_uint8=keep_uint8)
  cached_train, cached_evals = _batches(cached, keep_uint8=keep_uint8)
  _assert_same(train, cached_train)  # 6 batches of 6 from 20: across epochs too
  _assert_same(evals, cached_evals)
  source = data.make_source(data.parse_data_config(cached), "train")
  assert isinstance(source, datasets.ArraySource)
  assert source.images.shape == (20, 8, 8, 3) and source.images.dtype == np.uint8
  assert not source.images.flags.writeable
  # Decoded once per process: building the pipeline again reuses the arrays.
  assert data.make_source(data.parse_data_config(cached), "train") is source
  stored = datasets.ImageFolderSource(str(tmp_path), "train", 3)
  np.testing.assert_array_equal(source.images[7], stored[7]["image"])
  np.testing.assert_array_equal(source.labels, stored.labels)


def test_cached_folder_with_augment_on_device_gives_the_same_batches(tmp_path):
  _write(tmp_path, per_class=4)
  train, evals = _batches(_folder_config(tmp_path, augment_on_device=True), steps=3)
  cached = _batches(_folder_config(tmp_path, augment_on_device=True, cache=True), steps=3)
  _assert_same(train, cached[0])
  _assert_same(evals, cached[1])
  assert train[0]["image"].dtype == np.uint8 and "box" in train[0]


def test_cached_tfds_mock_gives_the_same_batches():
  import tensorflow_datasets as tfds
  config = configs.data_config(
      "tfds", tfds_name="cifar10", image_size=32, channels=3, mean=configs.CIFAR10_MEAN,
      std=configs.CIFAR10_STD, augment={"crop_padding": 4, "flip": True})
  cached = config.copy_and_resolve_references()
  cached.cache = True
  with tfds.testing.mock_data(num_examples=16):
    train, evals = _batches(config, steps=4, batch_size=4, keep_uint8=True)
    cached_train, cached_evals = _batches(cached, steps=4, batch_size=4, keep_uint8=True)
    source = data.make_source(data.parse_data_config(cached), "train")
  _assert_same(train, cached_train)
  _assert_same(evals, cached_evals)
  assert source.images.shape == (16, 32, 32, 3)
  assert np.ptp(source.images) > 0  # real (random) pixels, not an empty array


def test_a_split_that_does_not_fit_names_the_keys(tmp_path):
  _write(tmp_path, per_class=3)
  config = _folder_config(tmp_path, cache=True, cache_max_gb=1e-6)  # 1,073 bytes
  with pytest.raises(UserError) as err:
    data.get_info(config)
  message = str(err.value)
  assert "\n" not in message
  # 6 images of 8 x 8 x 3 bytes = 1,152 bytes: just over the limit.
  assert "6 images of 8x8x3 uint8" in message
  assert "data.cache_max_gb" in message and "data.cache=False" in message
  assert memory_cache.limit_bytes(1e-6) == 1073
  assert memory_cache.limit_bytes(0) == int(0.5 * memory_cache.available_bytes())
  config.cache_max_gb = 2e-6  # 2,147 bytes: fits
  assert data.get_info(config).num_train == 6


def test_mixed_sizes_and_bad_files_when_caching(tmp_path):
  _write(tmp_path, per_class=3)
  odd = tmp_path / "train" / "b" / "2.jpg"
  Image.new("RGB", (9, 8)).save(odd)
  with pytest.raises(UserError, match=r"2\.jpg' is 8x9x3 and the first 8x8x3.*cache=False"):
    data.get_info(_folder_config(tmp_path, cache=True))
  with open(odd, "wb") as f:
    f.write(b"broken")
  with pytest.raises(UserError, match=r"2\.jpg.*skip_bad_files=True"):
    data.get_info(_folder_config(tmp_path, cache=True))
  config = _folder_config(tmp_path, cache=True, skip_bad_files=True)
  assert data.get_info(config).num_train == 5
  assert data.bad_files(config) == {"count": 1, "paths": [str(odd)]}
  source = data.make_source(data.parse_data_config(config), "train")
  np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1])


def test_sources_already_in_memory_are_returned_as_they_are():
  source = datasets.ArraySource(np.zeros((2, 4, 4, 1), np.float32), np.array([0, 1]))
  assert memory_cache.in_memory(source, key=(), split="train") is source
