"""Tests of the input pipeline: sources, splits, augmentation, sharding, resumption."""

from __future__ import annotations

import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from train import data
from train import datasets
from train import prepare
from train import transforms


def _config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "name": "digits", "tfds_name": "", "data_dir": None, "train_split": "train",
      "eval_split": "test", "image_size": 16, "channels": 1,
      "augment": {"crop_padding": 0, "flip": False, "random_resized_crop": False,
                  "min_area": 0.08},
      "mean": (0.5,), "std": (0.25,), "worker_count": 0, "seed": 0})
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _rows(images: np.ndarray) -> list[bytes]:
  return [np.ascontiguousarray(image).tobytes() for image in images]


# ----------------------------------------------------------------------------- digits


def test_digits_split_sizes_disjoint_and_stratified():
  split = datasets.digits_split(0)
  (train_x, train_y), (test_x, test_y) = split["train"], split["test"]
  assert (len(train_y), len(test_y)) == (1437, 360)
  assert len(set(_rows(train_x)) | set(_rows(test_x))) == 1797  # disjoint, nothing lost
  train_counts = np.bincount(train_y, minlength=10)
  test_counts = np.bincount(test_y, minlength=10)
  assert train_y.min() == 0 and train_y.max() == 9 and test_y.max() == 9
  assert test_counts.min() >= 35  # every class held out, ~20% of its ~180 digits each
  np.testing.assert_allclose(test_counts / (train_counts + test_counts), 0.2, atol=0.01)
  assert train_x.min() == 0.0 and train_x.max() == 1.0  # 0..16 scaled by 1/16
  other = datasets.digits_split(1)["test"][0]
  assert set(_rows(other)) != set(_rows(test_x))  # data.seed changes the split


def test_get_info_digits():
  info = data.get_info(_config())
  assert info == data.DatasetInfo(name="digits", num_classes=10, image_shape=(16, 16, 1),
                                  num_train=1437, num_eval=360)


def test_normalisation_is_mean_std_math_on_exact_digits():
  # image_size 8: no resize, so eval images are exactly (digit / 16 - mean) / std.
  config = _config(image_size=8, mean=(0.25,), std=(0.5,))
  batches = list(data.eval_batches(config, batch_size=360))
  assert len(batches) == 1
  image = batches[0]["image"]
  expected_x, expected_y = datasets.digits_split(0)["test"]
  np.testing.assert_allclose(image[..., 0], (expected_x - 0.25) / 0.5, atol=1e-6)
  np.testing.assert_array_equal(batches[0]["label"], expected_y)
  assert image.min() == pytest.approx(-0.5) and image.max() == pytest.approx(1.5)
  sixteenths = (image * 0.5 + 0.25) * 16
  np.testing.assert_allclose(sixteenths, np.round(sixteenths), atol=1e-4)


def test_resize_and_pad_placement():
  digit = datasets.digits_split(0)["train"][0][:1]
  padded = datasets.place_digits(digit, 12, "pad")
  assert padded.shape == (1, 12, 12, 1)
  np.testing.assert_array_equal(padded[0, 2:10, 2:10, 0], digit[0])
  assert padded.sum() == pytest.approx(digit.sum())
  # Half-pixel bilinear: [0, 1] upsampled to 4 is [0, 0.25, 0.75, 1] (PIL agrees).
  ramp = np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32)
  np.testing.assert_allclose(datasets.resize_bilinear(ramp, 4)[0, 0], [0, 0.25, 0.75, 1])
  np.testing.assert_allclose(transforms.resize(ramp[0][..., None], 4, 4)[0, :, 0],
                             [0, 0.25, 0.75, 1], atol=1e-6)


# ------------------------------------------------------------------- train pipeline


def test_train_batches_shapes_dtypes_and_epochs():
  # 1437 = 3 * 479: one epoch is exactly 3 batches holding every train digit once.
  ds = data.train_dataset(_config(), batch_size=479, seed=0)
  batches = _take(iter(ds), 6)
  assert batches[0]["image"].shape == (479, 16, 16, 1)
  assert batches[0]["image"].dtype == np.float32
  assert batches[0]["label"].shape == (479,) and batches[0]["label"].dtype == np.int32
  epoch1 = [row for b in batches[:3] for row in _rows(b["image"])]
  epoch2 = [row for b in batches[3:] for row in _rows(b["image"])]
  assert len(set(epoch1)) == 1437 and set(epoch1) == set(epoch2)
  assert epoch1 != epoch2  # reshuffled every epoch
  labels = np.concatenate([b["label"] for b in batches[:3]])
  np.testing.assert_array_equal(np.bincount(labels),
                                np.bincount(datasets.digits_split(0)["train"][1]))


def test_train_determinism_by_seed():
  config = _config(augment={"crop_padding": 2, "flip": True})
  first = _take(iter(data.train_dataset(config, batch_size=32, seed=3)), 3)
  again = _take(iter(data.train_dataset(config, batch_size=32, seed=3)), 3)
  other = _take(iter(data.train_dataset(config, batch_size=32, seed=4)), 3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_worker_processes_give_the_same_batches():
  # Grayscale digits into 3 channels: decoded as one plane, broadcast by Collate.
  config = _config(channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0),
                   augment={"crop_padding": 2, "flip": True})
  threads = _take(iter(data.train_dataset(config, batch_size=8, seed=5)), 3)
  config.worker_count = 2
  it = iter(data.train_dataset(config, batch_size=8, seed=5))
  workers = _take(it, 3)
  it.close()  # Ends the worker processes here rather than at garbage collection.
  for a, b in zip(threads, workers):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  image = threads[0]["image"]
  assert image.shape == (8, 16, 16, 3)
  # Every channel is the same grey plane, (x - mean_c) / std_c.
  grey = image[..., 0] * np.float32(0.5) + np.float32(0.1)
  np.testing.assert_allclose(image[..., 2], (grey - 0.3) / 2.0, atol=1e-6)


def test_resume_from_iterator_state():
  config = _config(augment={"crop_padding": 2, "flip": True})
  ds = data.train_dataset(config, batch_size=16, seed=1)
  it = iter(ds)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  fresh = iter(data.train_dataset(config, batch_size=16, seed=1))
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 2)):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])


def test_process_sharding_disjoint_and_complete():
  # The 360-digit split as training data: 180 per process, 3 batches of 60 per epoch.
  config = _config(train_split="test")
  seen = []
  for index in range(2):
    it = iter(data.train_dataset(config, batch_size=60, seed=0, process_index=index,
                                 process_count=2))
    seen.append({row for b in _take(it, 3) for row in _rows(b["image"])})
  assert len(seen[0]) == len(seen[1]) == 180
  assert not seen[0] & seen[1]
  whole = data.eval_batches(config, batch_size=360)
  assert seen[0] | seen[1] == set(_rows(next(whole)["image"]))


# ---------------------------------------------------------------------------- eval


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_split_once_with_mask(process_count):
  config = _config(eval_split="train")  # 1437 digits: shards of 719 and 718
  per_process = [list(data.eval_batches(config, batch_size=100, process_index=i,
                                        process_count=process_count))
                 for i in range(process_count)]
  expected_batches = -(-(-(-1437 // process_count)) // 100)
  assert [len(b) for b in per_process] == [expected_batches] * process_count
  rows, total = [], 0.0
  for batches in per_process:
    for batch in batches:
      assert batch["image"].shape == (100, 16, 16, 1)
      assert batch["mask"].dtype == np.float32
      real = batch["mask"] == 1
      total += batch["mask"].sum()
      rows += _rows(batch["image"][real])
      assert np.all(batch["image"][~real] == 0) and np.all(batch["label"][~real] == 0)
      assert np.all(np.diff(batch["mask"]) <= 0)  # real rows first
  assert total == 1437 and len(rows) == len(set(rows)) == 1437


# ---------------------------------------------------------------- distorted digits


def _distorted(seed=0, **kw):
  kw.setdefault("train_copies", 2)
  kw.setdefault("eval_copies", 1)
  return _config(name="distorted_digits", image_size=40, seed=seed, **kw)


def test_distorted_digits_deterministic_and_label_preserving():
  spec = data.parse_data_config(_distorted())
  train = data.make_source(spec, "train")
  again = data.make_source(data.parse_data_config(_distorted()), "train")
  other = data.make_source(data.parse_data_config(_distorted(digit_size=15)), "train")
  assert len(train) == 2 * 1437 and train.images.shape[1:] == (40, 40, 1)
  assert train.images.dtype == np.uint8
  np.testing.assert_array_equal(train.images, again.images)
  assert not np.array_equal(train.images, other.images)
  digits_x, digits_y = datasets.digits_split(0)["train"]
  np.testing.assert_array_equal(train.labels, np.tile(digits_y, 2))
  test = data.make_source(spec, "test")
  np.testing.assert_array_equal(test.labels, datasets.digits_split(0)["test"][1])
  # Far from the plain digits drawn on the same canvas: rotated, moved, cluttered.
  plain = datasets.place_digits(digits_x, 40, "resize")[..., 0]
  distorted = train.images[:1437, ..., 0] / 255.0
  assert np.abs(distorted - plain).mean() > 0.15
  assert np.all(distorted.max(axis=(1, 2)) > 0.5)  # every canvas has ink
  # Copies of the same digit differ from each other, and train differs by data.seed.
  assert not np.array_equal(train.images[:1437], train.images[1437:])
  reseeded = datasets.distorted_digits_source("train", seed=1, image_size=40, copies=2)
  assert not np.array_equal(reseeded.images, train.images)


def test_distortion_geometry_identity_case():
  # No rotation, scale 1, digit as big as the canvas, no clutter: the canvas is the plain
  # bilinear enlargement (zero outside the digit instead of edge-clamped).
  digits, labels = datasets.digits_split(0)["test"]
  images, out_labels = datasets.distort_digits(
      digits[:5], labels[:5], copies=1, image_size=24, seed=0, digit_size=24,
      max_rotation=0.0, scale_range=(1.0, 1.0), clutter=0)
  grid = (np.arange(24) + 0.5) / 3 - 0.5
  ys = np.broadcast_to(grid[None, :, None], (5, 24, 24))
  xs = np.broadcast_to(grid[None, None, :], (5, 24, 24))
  expected = np.round(datasets.bilinear_sample(digits[:5], ys, xs) * 255)
  np.testing.assert_allclose(images[..., 0], expected, atol=1)
  np.testing.assert_array_equal(out_labels, labels[:5])


def test_distorted_digits_pipeline_batches():
  it = iter(data.train_dataset(_distorted(mean=(0.1,), std=(0.3,)), batch_size=8, seed=0))
  batch = next(it)
  assert batch["image"].shape == (8, 40, 40, 1)
  lo, hi = (0 - 0.1) / 0.3, (1 - 0.1) / 0.3
  assert batch["image"].min() == pytest.approx(lo) and batch["image"].max() <= hi + 1e-5


# -------------------------------------------------------------------------- tfds


def test_tfds_mock_mnist_and_cifar10():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=12):
    mnist = _config(name="tfds", tfds_name="mnist", image_size=28, channels=1)
    info = data.get_info(mnist)
    assert (info.num_classes, info.image_shape, info.num_train) == (10, (28, 28, 1), 12)
    batch = next(iter(data.train_dataset(mnist, batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 28, 28, 1) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -2.0 and batch["image"].max() <= 2.0  # (x - .5) / .25
    cifar = _config(name="tfds", tfds_name="cifar10", image_size=32, channels=3,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                    augment={"crop_padding": 4, "flip": True})
    assert data.get_info(cifar).num_classes == 10
    batch = next(iter(data.train_dataset(cifar, batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 32, 32, 3)
    assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
    evals = list(data.eval_batches(cifar, batch_size=5))
    assert len(evals) == 3 and sum(b["mask"].sum() for b in evals) == 12


def _device_normalized(batch, config):
  from train import trainer  # pylint: disable=g-import-not-at-top
  return np.asarray(trainer.normalize_images(batch["image"], config.mean, config.std))


@pytest.mark.parametrize("name,channels", [("cifar10", 3), ("mnist", 3), ("cifar10", 1)])
def test_uint8_batches_normalised_on_device_match_host_batches(name, channels):
  # keep_uint8 ships the pixels; normalize_images in the step must give the host's batch.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  size = 32 if name == "cifar10" else 28
  mean, std = (0.4, 0.5, 0.6)[:channels], (0.2, 0.25, 0.3)[:channels]
  config = _config(name="tfds", tfds_name=name, image_size=size, channels=channels,
                   mean=mean, std=std, augment={"crop_padding": 4, "flip": True})
  with tfds.testing.mock_data(num_examples=12):
    host = _take(iter(data.train_dataset(config, batch_size=4, seed=7)), 3)
    pixels = _take(iter(data.train_dataset(config, batch_size=4, seed=7, keep_uint8=True)), 3)
    host_eval = list(data.eval_batches(config, batch_size=5))
    pixel_eval = list(data.eval_batches(config, batch_size=5, keep_uint8=True))
  for want, got in zip(host + host_eval, pixels + pixel_eval):
    assert got["image"].dtype == np.uint8 and got["image"].shape == want["image"].shape
    np.testing.assert_array_equal(got["label"], want["label"])
    real = want.get("mask", np.ones(len(want["label"]))) == 1  # padding rows are masked
    device = _device_normalized(got, config)[real]
    if channels == 1:
      # RGB -> gray: the uint8 path rounds the luma to a whole level, as Pillow's "L".
      np.testing.assert_allclose(device, want["image"][real], atol=0.5 / 255 / std[0] + 1e-6)
    else:
      # Equal up to float32 rounding: XLA may fold the divisions into multiplications.
      np.testing.assert_allclose(device, want["image"][real], rtol=1e-6, atol=1e-6)
  # The last eval batch holds 2 real rows and 3 uint8 rows of padding.
  np.testing.assert_array_equal(pixel_eval[-1]["mask"], [1, 1, 0, 0, 0])
  assert not pixel_eval[-1]["image"][2:].any()


def test_float_sources_stay_normalised_on_the_host_with_keep_uint8():
  host = next(iter(data.train_dataset(_config(), batch_size=8, seed=1)))
  kept = next(iter(data.train_dataset(_config(), batch_size=8, seed=1, keep_uint8=True)))
  assert kept["image"].dtype == np.float32
  np.testing.assert_array_equal(kept["image"], host["image"])
  np.testing.assert_array_equal(_device_normalized(kept, _config()), host["image"])


def test_unprepared_tfds_fails_fast_with_the_fix(tmp_path):
  config = _config(name="tfds", tfds_name="mnist", data_dir=str(tmp_path), image_size=28)
  start = time.monotonic()
  for call in (lambda: data.get_info(config),
               lambda: data.train_dataset(config, batch_size=4, seed=0),
               lambda: data.eval_batches(config, batch_size=4)):
    with pytest.raises(FileNotFoundError, match="train.prepare mnist") as error:
      call()
    assert str(tmp_path) in str(error.value)
  assert time.monotonic() - start < 5.0


def test_unknown_tfds_name():
  config = _config(name="tfds", tfds_name="no_such_dataset_xyz", image_size=28)
  with pytest.raises(ValueError, match="tfds_name"):
    data.get_info(config)


# ------------------------------------------------------------------------- folder


def _write_folder(root, layout):
  colours = {"cat": (255, 0, 0), "dog": (0, 0, 255), "emu": (0, 255, 0)}
  for split, classes in layout.items():
    for name, count in classes.items():
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        Image.new("RGB", (10 + i, 8), colours[name]).save(root / split / name / f"{i}.png")


def test_image_folder_source(tmp_path):
  _write_folder(tmp_path, {"train": {"dog": 3, "cat": 2}, "test": {"cat": 1, "dog": 2}})
  config = _config(name="folder", data_dir=str(tmp_path), image_size=6, channels=3,
                   mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  info = data.get_info(config)
  assert (info.num_classes, info.num_train, info.num_eval) == (2, 5, 3)
  batch = next(data.eval_batches(config, batch_size=4))
  np.testing.assert_array_equal(batch["label"], [0, 1, 1, 0])  # cat < dog, sorted
  np.testing.assert_array_equal(batch["mask"], [1, 1, 1, 0])
  np.testing.assert_allclose(batch["image"][0], np.broadcast_to([1, 0, 0], (6, 6, 3)))
  np.testing.assert_allclose(batch["image"][1], np.broadcast_to([0, 0, 1], (6, 6, 3)))
  gray = next(data.eval_batches(_config(name="folder", data_dir=str(tmp_path),
                                        image_size=6), batch_size=4))
  np.testing.assert_allclose(gray["image"][0] * 0.25 + 0.5, 76 / 255, atol=1e-6)  # luma
  train = next(iter(data.train_dataset(config, batch_size=5, seed=0)))
  assert sorted(train["label"].tolist()) == [0, 0, 1, 1, 1]


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_info(_config(name="folder", data_dir=str(tmp_path / "missing")))
  _write_folder(tmp_path, {"train": {"cat": 1, "dog": 1}, "test": {"emu": 1}})
  with pytest.raises(FileNotFoundError, match="no split folder 'val'"):
    data.get_info(_config(name="folder", data_dir=str(tmp_path), eval_split="val"))
  with pytest.raises(ValueError, match="emu"):
    data.get_info(_config(name="folder", data_dir=str(tmp_path)))
  (tmp_path / "empty" / "cat").mkdir(parents=True)
  with pytest.raises(ValueError, match="cat .*holds no images.*add images or remove"):
    data.get_info(_config(name="folder", data_dir=str(tmp_path), eval_split="empty"))


# ------------------------------------------------------------------------- errors


def test_config_errors_name_the_fix():
  with pytest.raises(ValueError, match="choose one of .*digits"):
    data.get_info(_config(name="mnist"))
  with pytest.raises(ValueError, match="one mean per channel"):
    data.get_info(_config(mean=(0.5, 0.5, 0.5)))
  with pytest.raises(ValueError, match="one std per channel"):
    data.get_info(_config(std=(0.2, 0.2)))
  with pytest.raises(ValueError, match="lower config.batch_size"):
    data.train_dataset(_config(), batch_size=1438, seed=0)
  with pytest.raises(ValueError, match="lower config.batch_size"):
    data.train_dataset(_config(), batch_size=719, seed=0, process_index=1, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    data.train_dataset(_config(), batch_size=8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="splits"):
    data.get_info(_config(eval_split="validation"))
  with pytest.raises(ValueError, match="tfds_name"):
    data.get_info(_config(name="tfds"))


# ------------------------------------------------------------------------ prepare


def test_prepare_without_tensorflow_names_the_install(monkeypatch, capsys, tmp_path):
  monkeypatch.setattr(prepare, "_tensorflow_available", lambda: False)
  with pytest.raises(SystemExit) as exit_info:
    prepare.main(["cifar10", f"--data_dir={tmp_path}"])
  assert "pip install -e '.[prepare]'" in str(exit_info.value.code)
  assert not any(tmp_path.iterdir())  # nothing written, nothing downloaded


def test_prepare_arguments(capsys):
  with pytest.raises(SystemExit) as exit_info:
    prepare.main([])
  assert exit_info.value.code == 2 and "name" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    prepare.main(["no_such_dataset_xyz"])
  assert "no dataset 'no_such_dataset_xyz'" in str(exit_info.value.code)
