"""``python -m train.bench --cache``: the JPEG folder it writes, its rows and their
arithmetic, and the PyTorch loop's batches (crops and mirrors of the decoded images)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from train import memory_cache
from train.bench import cache, cli

TINY = "test_resnet_cifar_tiny"


def test_jpeg_folder_layout_and_reuse(tmp_path):
  with cache.jpeg_folder(str(tmp_path), 30) as root:
    assert root == str(tmp_path)
  counts = {split: sorted(len(os.listdir(tmp_path / split / d))
                          for d in os.listdir(tmp_path / split)) for split in ("train", "test")}
  assert counts == {"train": [3] * 10, "test": [1] * 10}
  with cache.jpeg_folder(str(tmp_path), 30):  # reused as it is
    pass
  with pytest.raises(ValueError, match="holds 30 train images, not 40"):
    with cache.jpeg_folder(str(tmp_path), 40):
      pass


def test_cache_rows(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(cache, "REFILL_S", 0.0)
  # One compile: "folder" and "cache" batch alike; cache_device adds a box and a mirror.
  monkeypatch.setattr(cache, "MODES", ("folder", "cache"))
  memory_cache.clear()
  rows = cache.bench_cache(TINY, batch=4, steps=1, warmup=0, num_images=40,
                           root=str(tmp_path / "jpeg"), rounds=1)
  memory_cache.clear()
  assert [(r["kind"], r["mode"]) for r in rows] == [("cache", "folder"), ("cache", "cache")]
  for r in rows:
    assert r["model"] == TINY and r["batch"] == 4 and r["steps"] == 1
    pipe, step, both = (r[k] for k in ("pipeline_images_per_second",
                                       "step_images_per_second", "images_per_second"))
    assert min(pipe, step, both) > 0 and r["batch_dtype"] == "uint8"
    assert math.isclose(r["pipeline_share"], step / (pipe + step))
    assert math.isclose(r["slowdown"], 1 - both / step)
  assert rows[1]["setup_s"] > 0  # the splits decoded into memory
  table = "\n".join(cache.markdown(rows))
  assert "| folder |" in table and "pipeline's share" in table
  with pytest.raises(ValueError, match="--cache_images must be >= 1"):
    cli.parse_args(["--cache", "--cache_images=0"])


def test_torch_loop_batches_are_padded_crops_and_mirrors():
  pytest.importorskip("timm")
  from train.bench.torch_ref import TorchLoop
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  loop = TorchLoop(TINY, images, np.arange(6) % 10, batch=3, mean=mean, std=std, padding=1)
  seen = []
  for _ in range(4):  # two epochs
    x, y = loop.next_batch()
    x = x.permute(0, 2, 3, 1).numpy()
    assert x.shape == (3, 5, 5, 3)
    for image, label in zip(x, y.numpy()):
      seen.append(int(label))
      padded = np.pad(images[label].astype(np.float32) / 255, ((1, 1), (1, 1), (0, 0)))
      views = [v for r in range(3) for c in range(3)
               for v in (padded[r:r + 5, c:c + 5], padded[r:r + 5, c:c + 5][:, ::-1])]
      normalised = [(v - np.float32(mean)) / np.float32(std) for v in views]
      assert min(np.abs(image - v).max() for v in normalised) < 1e-5
  assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))
  loop.step(*loop.next_batch())
