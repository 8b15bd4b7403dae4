"""Image files that do not decode: found at the start with a one-line error naming the file
and data.skip_bad_files, skipped and counted with that flag (also mid-epoch), and reported
in results.json."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import configs
from train import data, datasets, image_files
from train.errors import UserError


def _write(root, per_class=10, side=8, ext="jpg", seed=0):
  """root/{train,test}/{a,b}/<i>.<ext>: random (side, side, 3) images."""
  rng = np.random.default_rng(seed)
  for split in ("train", "test"):
    for name in ("a", "b"):
      os.makedirs(root / split / name)
      for i in range(per_class):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i}.{ext}")


def _config(root, **overrides):
  return configs.data_config("folder", data_dir=str(root), image_size=8, channels=3,
                             mean=(0.5,) * 3, std=(0.5,) * 3, **overrides)


def _corrupt(path, keep=None):
  """Overwrites ``path`` with junk, or with its first ``keep`` bytes (a truncated file)."""
  body = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(b"this is not an image" if keep is None else body[:keep])


def test_a_corrupt_jpeg_is_found_at_the_start_naming_the_file_and_the_flag(tmp_path):
  _write(tmp_path)
  bad = tmp_path / "train" / "b" / "3.jpg"
  _corrupt(bad)
  with pytest.raises(UserError) as err:
    data.get_info(_config(tmp_path))
  message = str(err.value)
  assert "\n" not in message
  assert repr(str(bad)) in message and "data.skip_bad_files=True" in message
  assert "UnidentifiedImageError" in message  # the cause


def test_skip_bad_files_leaves_them_out_and_counts_them(tmp_path):
  _write(tmp_path)
  bad = [tmp_path / "train" / "a" / "0.jpg", tmp_path / "test" / "b" / "9.jpg"]
  _corrupt(bad[0])
  _corrupt(bad[1], keep=40)  # a truncated JPEG: the header reads, the pixels do not
  config = _config(tmp_path, skip_bad_files=True)
  info = data.get_info(config)
  assert (info.num_train, info.num_eval) == (19, 19)
  assert data.bad_files(config) == {"count": 2, "paths": sorted(str(p) for p in bad)}
  source = data.make_source(data.parse_data_config(config), "train")
  assert str(bad[0]) not in source.files and len(source.files) == 19
  # Each split's labels still follow its files.
  assert list(source.labels) == [0] * 9 + [1] * 10
  batches = list(data.eval_batches(config, batch_size=8))
  assert sum(int(b["mask"].sum()) for b in batches) == 19
  assert data.bad_files(configs.data_config("digits")) is None


def test_check_files_samples_evenly_and_minus_one_checks_all(tmp_path):
  np.testing.assert_array_equal(image_files.sample(20, 5), [0, 5, 10, 14, 19])
  np.testing.assert_array_equal(image_files.sample(4, 10), [0, 1, 2, 3])
  np.testing.assert_array_equal(image_files.sample(4, -1), [0, 1, 2, 3])
  assert len(image_files.sample(4, 0)) == 0
  _write(tmp_path, per_class=5)
  _corrupt(tmp_path / "train" / "a" / "1.jpg")  # index 1 of 10: not in a sample of 3
  assert data.get_info(_config(tmp_path, check_files=3)).num_train == 10
  assert data.get_info(_config(tmp_path, check_files=0)).num_train == 10
  with pytest.raises(UserError, match="1.jpg"):
    data.get_info(_config(tmp_path, check_files=-1))
  # The sampled check missed it: reading it names the file and the flag.
  source = datasets.ImageFolderSource(str(tmp_path), "train", 3)
  with pytest.raises(UserError, match=r"a/1\.jpg.*data\.skip_bad_files=True"):
    source[1]


def test_a_file_that_goes_bad_after_the_check_does_not_stop_the_iteration(tmp_path):
  _write(tmp_path, per_class=4)
  config = _config(tmp_path, skip_bad_files=True, check_files=-1, augment={"flip": True})
  source = data.make_source(data.parse_data_config(config), "train")
  expected = [source[i]["image"] for i in range(len(source))]
  it = iter(data.train_dataset(config, batch_size=4, seed=0))
  next(it)
  _corrupt(source.files[2], keep=30)  # truncated after the run started
  # The next readable file takes its place: same label order, file 3's pixels.
  example = source[2]
  np.testing.assert_array_equal(example["image"], expected[3])
  assert example["label"] == int(source.labels[3])
  for _ in range(6):  # three epochs of two batches: file 2 is read every epoch
    batch = next(it)
    assert batch["image"].shape == (4, 8, 8, 3)
  assert data.bad_files(config) == {"count": 1, "paths": [source.files[2]]}
  # Without the flag the same read names the file and the flag.
  plain = datasets.ImageFolderSource(str(tmp_path), "train", 3)
  with pytest.raises(UserError, match=r"a/2\.jpg.*data\.skip_bad_files=True"):
    plain[2]


def test_bad_file_keys_are_checked():
  for key, value in (("check_files", -2), ("check_files", 1.5), ("skip_bad_files", "yes"),
                     ("cache", 1), ("cache_max_gb", -1.0), ("cache_max_gb", "big")):
    config = {**configs.data_config("digits").to_dict(), key: value}
    with pytest.raises(ValueError, match=f"data.{key}"):
      data.parse_data_config(config)


def test_results_json_reports_the_bad_files(tmp_path):
  import types
  import configs.default
  from train import metrics, trainer
  _write(tmp_path / "images", per_class=3, ext="png")
  bad = tmp_path / "images" / "train" / "b" / "1.png"
  _corrupt(bad, keep=60)
  config = configs.default.get_config()
  config.plot_curves = False
  config.data = _config(tmp_path / "images", skip_bad_files=True)
  assert data.get_info(config.data).num_train == 5
  # report() of a finished run (no training needed to test what it writes).
  run = types.SimpleNamespace(config=config, workdir=str(tmp_path), start=0,
                              wall_start=0.0, primary=True,
                              throughput=metrics.Throughput(8))
  state = types.SimpleNamespace(params={"w": np.zeros(3)})
  final = {"accuracy": 0.5, "top5": 1.0, "loss": 1.0, "count": 6}
  results = trainer.report(run, state, 2, final)
  assert results["bad_files"] == {"count": 1, "paths": [str(bad)]}
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["bad_files"] == {"count": 1, "paths": [str(bad)]}
  config.data = configs.data_config("digits")
  assert "bad_files" not in trainer.report(run, state, 2, final)
