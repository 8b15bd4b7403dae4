"""Tests of train/transforms.py: the image operations against np.pad, Pillow and the
plain formulas, and the pipeline steps (decode, augment, collate and normalise)."""

from __future__ import annotations

import numpy as np
import pytest

from train import transforms


def test_random_crop_is_a_window_of_the_padded_image():
  image = np.random.default_rng(0).random((6, 7, 3), dtype=np.float32) + 0.1
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  offsets = set()
  for seed in range(300):
    out = transforms.random_crop(image, np.random.default_rng(seed), 2)
    assert out.shape == image.shape
    hits = [(y, x) for y in range(5) for x in range(5)
            if np.array_equal(out, padded[y:y + 6, x:x + 7])]
    assert len(hits) == 1
    offsets.add(hits[0])
  assert len(offsets) == 25  # every offset in [0, 2 * padding] reachable


@pytest.mark.parametrize("shape,padding", [((6, 7, 3), 2), ((3, 4, 2), 6), ((2, 9, 1), 3)])
def test_random_crop_equals_slicing_np_pad(shape, padding):
  # Windows that miss the image entirely (padding > side) are all zeros, as in np.pad's.
  image = np.random.default_rng(0).random(shape, dtype=np.float32) + 0.1
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  empty = 0
  for seed in range(200):
    top, left = np.random.default_rng(seed).integers(0, 2 * padding + 1, size=2)
    out = transforms.random_crop(image, np.random.default_rng(seed), padding)
    np.testing.assert_array_equal(out, padded[top:top + shape[0], left:left + shape[1]])
    empty += not out.any()
  assert (empty > 0) == (padding >= min(shape[:2]))


def _three_steps(image, size, padding, rng):
  out = transforms.random_crop(transforms.resize(image, size, size), rng, padding)
  return transforms.random_flip(out, rng)


@pytest.mark.parametrize("shape,size,padding", [
    ((32, 32, 3), 224, 28), ((9, 7, 1), 13, 3), ((30, 20, 3), 24, 4), ((5, 6, 3), 8, 10)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_train_augment_equals_resize_crop_flip_in_turn(shape, size, padding, dtype):
  # TrainAugment resizes only the kept window (Pillow's box) and mirrors it before it
  # becomes an array; the random draws and the result are those of the three steps.
  rng = np.random.default_rng(5)
  image = (rng.integers(0, 256, shape).astype(np.uint8) if dtype == np.uint8
           else rng.random(shape, dtype=np.float32))
  augment = transforms.TrainAugment(size, padding, flip=True)
  differing = []
  for seed in range(40):
    out = augment({"image": image, "label": 0}, np.random.default_rng(seed))["image"]
    expected = _three_steps(image, size, padding, np.random.default_rng(seed))
    assert out.shape == (size, size, shape[-1]) and out.dtype == dtype
    error = np.abs(out.astype(np.float64) - expected)
    if dtype == np.uint8:  # Pillow's fixed-point weights round a few pixels the other way
      assert error.max() <= 1.0
      differing.append(np.mean(error > 0))
    else:
      np.testing.assert_allclose(out, expected, atol=2e-6)
  if differing:
    assert np.mean(differing) < 0.1


@pytest.mark.parametrize("mirror", [False, True])
def test_resize_and_crop_at_every_offset_of_an_unresized_image(mirror):
  # No resize: exactly the np.pad window, mirrored after cropping.
  image = np.random.default_rng(6).integers(1, 256, (6, 6, 3)).astype(np.uint8)
  padded = np.pad(image, ((3, 3), (3, 3), (0, 0)))
  for top in range(-3, 4):
    for left in range(-3, 4):
      out = transforms.resize_and_crop(image, 6, (top, left), mirror)
      window = padded[top + 3:top + 9, left + 3:left + 9]
      np.testing.assert_array_equal(out, window[:, ::-1] if mirror else window)
  assert not transforms.resize_and_crop(image, 6, (6, 0)).any()  # the window misses it


def test_normalize_per_channel_on_a_mirrored_view():
  image = np.random.default_rng(1).random((5, 6, 3), dtype=np.float32)[:, ::-1]
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
  out = transforms.Collate(mean, std)([{"image": image, "label": np.int32(0)}])["image"][0]
  expected = (image - np.float32(mean)) / np.float32(std)
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == np.float32 and out.flags.c_contiguous
  assert out[2, 3, 2] == (image[2, 3, 2] - np.float32(0.3)) / np.float32(2.0)


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_resize_is_the_float_resize_rounded(channels):
  image = np.random.default_rng(3).integers(0, 256, (9, 7, channels), dtype=np.uint8)
  for box in (None, (1.0, 2.0, 6.0, 8.5)):
    out = transforms.resize(image, 13, 11, box=box)
    assert out.shape == (13, 11, channels) and out.dtype == np.uint8
    exact = transforms.resize(image.astype(np.float32) / 255, 13, 11, box=box) * 255
    # Pillow's 8-bit filter uses fixed-point weights: within one level, mostly rounded
    # (another filter, e.g. nearest, is off by tens of levels on random pixels).
    error = np.abs(out - exact)
    assert error.max() < 1.0 and np.mean(error <= 0.5 + 1e-3) > 0.8
  assert transforms.resize(image, 9, 7) is image


def test_collate_batches_uint8_pixels_and_broadcasts_gray():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
  batch = transforms.Collate((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))(
      [{"image": gray, "label": np.int32(4)}, {"image": gray + 1, "label": np.int32(2)}])
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, 3, 4, 3)
  np.testing.assert_array_equal(batch["image"][1, ..., 2], gray[..., 0] + 1)
  np.testing.assert_array_equal(batch["label"], [4, 2])
  rgb = np.random.default_rng(4).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  mirrored = transforms.Collate((0.0,) * 3, (1.0,) * 3)([{"image": rgb[:, ::-1], "label": 0}])
  np.testing.assert_array_equal(mirrored["image"][0], rgb[:, ::-1])
  with pytest.raises(ValueError, match="mixes image sizes"):
    transforms.Collate((0.0,), (1.0,))([{"image": gray, "label": 0},
                                  {"image": gray[:2], "label": 1}])


def test_resize_planes_match_pillow_per_channel():
  from PIL import Image
  image = np.random.default_rng(2).random((7, 5, 3), dtype=np.float32)
  out = transforms.resize(image, 12, 9)
  assert out.shape == (12, 9, 3) and out.dtype == np.float32
  for c in range(3):
    plane = Image.fromarray(np.ascontiguousarray(image[..., c]))
    np.testing.assert_array_equal(out[..., c], np.asarray(plane.resize((9, 12), Image.BILINEAR)))


def test_identity_and_flip_augmentation():
  image = np.random.default_rng(1).random((8, 8, 1), dtype=np.float32)
  example = {"image": image, "label": np.int32(3)}
  plain = transforms.TrainAugment(image_size=8)(example, np.random.default_rng(0))
  np.testing.assert_array_equal(plain["image"], image)
  flips = [transforms.TrainAugment(image_size=8, flip=True)(example, np.random.default_rng(s))
           for s in range(200)]
  mirrored = sum(np.array_equal(f["image"], image[:, ::-1]) for f in flips)
  unchanged = sum(np.array_equal(f["image"], image) for f in flips)
  assert mirrored + unchanged == 200 and 70 < mirrored < 130


def test_random_resized_crop_and_center_crop():
  ramp = np.tile(np.linspace(0, 1, 40, dtype=np.float32)[None, :, None], (30, 1, 3))
  crop = transforms.random_resized_crop(ramp, np.random.default_rng(0), 16, min_area=0.08)
  assert crop.shape == (16, 16, 3)
  assert np.all(np.diff(crop[..., 0], axis=1) >= -1e-6)  # a window of a ramp stays a ramp
  whole = transforms.random_resized_crop(np.full((20, 20, 1), 0.3, np.float32),
                                   np.random.default_rng(0), 8, min_area=1.0)
  np.testing.assert_allclose(whole, 0.3, atol=1e-6)
  centre = transforms.center_crop(ramp, 16, crop_pct=0.8)  # shorter side 30 -> 20, width 27
  assert centre.shape == (16, 16, 3)
  assert centre[:, :, 0].mean() == pytest.approx(0.5, abs=0.02)  # centred on the ramp


def test_channel_conversion_and_dtypes():
  rgb = np.array([[[0.2, 0.4, 0.6]]], np.float32)
  np.testing.assert_allclose(transforms.match_channels(rgb, 1),
                             [[[0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6]]], rtol=1e-6)
  np.testing.assert_array_equal(transforms.match_channels(rgb[..., :1], 3),
                                np.full((1, 1, 3), rgb[0, 0, 0]))
  np.testing.assert_allclose(transforms.to_float(np.array([[0, 51, 255]], np.uint8))[..., 0],
                             [[0.0, 0.2, 1.0]])
  with pytest.raises(TypeError, match="uint8"):
    transforms.to_float(np.zeros((2, 2, 1), np.int32))
