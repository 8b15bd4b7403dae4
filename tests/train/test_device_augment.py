"""Tests of train/device_augment.py and ``data.augment_on_device``: the jitted resize, crops
and flip against the host's (train.transforms) image by image, whole pipelines against the
host pipeline for the same seed, the trainer's steps on both kinds of batch, and the errors
that name the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from train import data
from train import device_augment
from train import trainer
from train import transforms
from tests.train.test_data import _config
from tests.train.test_trainer import tiny_config


def _device(images, size, boxes, mirror):
  return np.asarray(jax.jit(device_augment.crop_and_resize, static_argnums=1)(
      jnp.asarray(images), size, jnp.asarray(boxes, jnp.float32), jnp.asarray(mirror)))


def _padded_crop_boxes(offsets, side, size):
  """resize_and_crop's windows, (top, left) from the resized image's, in source pixels."""
  return [(r * side / size, c * side / size, side, side) for r, c in offsets]


@pytest.mark.parametrize("side,size,padding", [
    (32, 224, 28),  # CIFAR at ImageNet size: 7x upsampling
    (32, 40, 5),    # a scale that is not a whole number
    (32, 24, 3),    # shrinking: Pillow's filter widens, so must scale_and_translate's
    (16, 16, 2),    # no resize: the crop and flip alone, exactly
    (8, 16, 2),
])
def test_matches_the_host_float_path_image_by_image(side, size, padding):
  rng = np.random.default_rng(side + size)
  images = rng.random((6, side, side, 3)).astype(np.float32)
  # The extremes of the window (a whole padding band on each side) and a few inside.
  offsets = np.array([[-padding, -padding], [padding, padding], [-padding, padding],
                      [0, 0], [1, -2], [padding - 1, 3]], np.int32)
  mirror = np.array([False, True, True, False, True, False])
  got = _device(images, size, _padded_crop_boxes(offsets, side, size), mirror)
  assert got.shape == (6, size, size, 3) and got.dtype == np.float32
  for n in range(6):
    want = transforms.resize_and_crop(images[n], size, tuple(offsets[n]), bool(mirror[n]))
    tol = 0.0 if side == size else 1e-5
    np.testing.assert_allclose(got[n], want, atol=tol, rtol=0)
  # Zero padding where the window leaves the image: the first image's top rows and left
  # columns (a whole padding band of the resized image).
  assert not got[0, :padding].any() and not got[0, :, :padding].any()
  assert got[0, padding:, padding:].min() > 0


def test_uint8_pixels_keep_their_scale_within_the_host_rounding():
  # The host's uint8 path rounds Pillow's resize to whole levels, after each of its two
  # passes (rows, then columns): at most half a level each; the device's does not round.
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  offsets = np.array([[-4, 3], [0, 0], [4, -4], [2, 2]], np.int32)
  mirror = np.array([True, False, False, True])
  boxes = _padded_crop_boxes(offsets, 32, 56)
  got = _device(images, 56, boxes, mirror)
  for n in range(4):
    want = transforms.resize_and_crop(images[n], 56, tuple(offsets[n]), bool(mirror[n]))
    assert want.dtype == np.uint8
    diff = np.abs(got[n] - want.astype(np.float32))
    assert diff.max() <= 1.01 and diff.mean() < 0.4
  # Against a float mirror of the same pixels the device result is exact (no rounding).
  floats = _device(images.astype(np.float32) / 255, 56, boxes, mirror)
  np.testing.assert_allclose(got / 255, floats, atol=1e-6)


@pytest.mark.parametrize("side,size", [(32, 224), (32, 16), (20, 20)])
def test_random_resized_crops_match_the_host(side, size):
  # The windows random_resized_crop draws (any area from 8% up, so shrinking and
  # enlarging both occur at 16), resized by Pillow on the host with its box.
  rng = np.random.default_rng(size)
  images = rng.random((8, side, side, 3)).astype(np.float32)
  draws = np.random.default_rng(7)
  boxes = [transforms.random_resized_box((side, side), draws) for _ in range(8)]
  mirror = np.arange(8) % 3 == 0
  got = _device(images, size, boxes, mirror)
  for n, (top, left, height, width) in enumerate(boxes):
    want = transforms.resize(images[n], size, size, box=(left, top, left + width,
                                                         top + height))
    want = want[:, ::-1] if mirror[n] else want
    np.testing.assert_allclose(got[n], want, atol=1e-5, rtol=0)
  # The same generator state gives the host's crop and the device's window.
  host = transforms.random_resized_crop(images[0], np.random.default_rng(7), size)
  np.testing.assert_allclose(_device(images[:1], size, boxes[:1], [False])[0], host,
                             atol=1e-5)


@pytest.mark.parametrize("shape,crop", [((32, 32), True), ((24, 40), True),
                                        ((40, 24), True), ((24, 40), False)])
def test_eval_views_match_the_host(shape, crop):
  image = np.random.default_rng(3).random((*shape, 3)).astype(np.float32)
  view = transforms.EvalResize(20, crop=crop, crop_pct=0.8, on_device=True)(
      {"image": image, "label": 1})
  host = transforms.EvalResize(20, crop=crop, crop_pct=0.8)({"image": image, "label": 1})
  assert view["image"] is image and not view["mirror"] and view["box"].dtype == np.float32
  got = _device(image[None], 20, view["box"][None], [False])[0]
  np.testing.assert_allclose(got, host["image"], atol=1e-5, rtol=0)


def test_shape_errors_name_the_expected_shapes():
  images = jnp.zeros((2, 8, 8, 3), jnp.uint8)
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    device_augment.crop_and_resize(images[0], 8, jnp.zeros((2, 4)), jnp.zeros((2,), bool))
  with pytest.raises(ValueError, match=r"boxes of shape \(2, 4\)"):
    device_augment.crop_and_resize(images, 8, jnp.zeros((2, 2)), jnp.zeros((2,), bool))


# --------------------------------------------------------------------------- pipelines


def _data_config(**overrides):
  """test_data's digits block (16 x 16), with a 2-pixel padded crop and the flip."""
  config = _config(augment={"crop_padding": 2, "flip": True})
  for key, value in overrides.items():
    config[key] = value
  return config


def _prepared(batch, spec):
  arrays = {k: jnp.asarray(batch[k]) for k in ("image", "box", "mirror")}
  return np.asarray(device_augment.prepare_images(arrays, spec.image_size, spec.mean,
                                                  spec.std))


def _both(config, batches, batch_size=12, **kwargs):
  device_config = config.copy_and_resolve_references()
  device_config.augment_on_device = True
  host = data.train_dataset(config, batch_size=batch_size, seed=5, keep_uint8=True, **kwargs)
  device = data.train_dataset(device_config, batch_size=batch_size, seed=5, **kwargs)
  host_it, device_it = iter(host), iter(device)
  return ([next(host_it) for _ in range(batches)], [next(device_it) for _ in range(batches)],
          data.parse_data_config(config))


def test_digits_pipeline_equals_the_host_pipeline():
  # Float images at their stored 16 x 16: the device crops and flips them exactly as the
  # host does, from the same draws, and normalises them as the host does.
  host, device, spec = _both(_data_config(), 3)
  mirrored = 0
  for want, got in zip(host, device):
    assert set(got) == {"image", "label", "box", "mirror"}
    assert got["image"].shape == (12, 16, 16, 1) and got["image"].dtype == np.float32
    assert got["box"].dtype == np.float32 and got["mirror"].dtype == np.bool_
    # Padded crops of the stored 16 x 16 digits: windows of 16 x 16 moved by up to 2.
    assert np.all(got["box"][:, 2:] == 16) and np.abs(got["box"][:, :2]).max() <= 2
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_allclose(_prepared(got, spec), want["image"], atol=1e-6)
    mirrored += int(got["mirror"].sum())
  assert 0 < mirrored < 36


@pytest.mark.parametrize("name,channels,size", [("cifar10", 3, 56), ("mnist", 3, 40),
                                                ("cifar10", 1, 24)])
def test_uint8_pipeline_matches_the_host_pipeline(name, channels, size):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  mean, std = (0.4, 0.5, 0.6)[:channels], (0.2, 0.25, 0.3)[:channels]
  config = _data_config(name="tfds", tfds_name=name, image_size=size, channels=channels,
                        mean=mean, std=std)
  config.augment.crop_padding = size // 8
  with tfds.testing.mock_data(num_examples=30):
    host, device, spec = _both(config, 2)
    device_config = config.copy_and_resolve_references()
    device_config.augment_on_device = True
    host_eval = list(data.eval_batches(config, batch_size=8, keep_uint8=True))
    device_eval = list(data.eval_batches(device_config, batch_size=8))
  stored = 32 if name == "cifar10" else 28
  # The host rounds its resized pixels to whole levels after each of Pillow's two passes:
  # a level apart at most, a third of one on average.
  levels = 255 * np.float32(std)
  for want, got in zip(host + host_eval, device + device_eval):
    assert got["image"].dtype == np.uint8 and got["image"].shape[1:] == (stored, stored,
                                                                         channels)
    np.testing.assert_array_equal(got["label"], want["label"])
    expected = np.asarray(trainer.normalize_images(jnp.asarray(want["image"]), mean, std))
    real = want.get("mask", np.ones(len(want["label"]))) == 1
    diff = np.abs(_prepared(got, spec)[real] - expected[real]) * levels
    assert diff.max() <= 1.01 and diff.mean() < 0.4, (diff.max(), diff.mean())
  # 30 eval examples in batches of 8: the last holds 6 real rows and 2 of zero padding at
  # the stored size, each with the whole image as its window (finite once resized).
  last = device_eval[-1]
  np.testing.assert_array_equal(last["mask"], [1] * 6 + [0] * 2)
  assert not last["image"][6:].any() and not last["mirror"].any()
  np.testing.assert_array_equal(last["box"], [[0, 0, stored, stored]] * 8)
  assert np.isfinite(_prepared(last, spec)).all()


def test_random_resized_crop_pipeline_matches_the_host_pipeline():
  # The ImageNet recipe (random-resized crop and flip; eval resize to 20 and centre crop)
  # on a source of one stored size, the digits at 16 x 16.
  config = _data_config(image_size=16)
  config.augment.update({"random_resized_crop": True, "crop_padding": 0})
  config.crop_pct = 0.8
  host, device, spec = _both(config, 2)
  device_config = config.copy_and_resolve_references()
  device_config.augment_on_device = True
  host_eval = list(data.eval_batches(config, batch_size=100))
  device_eval = list(data.eval_batches(device_config, batch_size=100))
  assert device[0]["image"].shape[1:3] == (16, 16)
  assert len(np.unique(device[0]["box"][:, 2])) > 3  # windows of many sizes
  for want, got in zip(host + host_eval, device + device_eval):
    np.testing.assert_array_equal(got["label"], want["label"])
    real = want.get("mask", np.ones(len(want["label"]))) == 1
    np.testing.assert_allclose(_prepared(got, spec)[real], want["image"][real], atol=1e-5)


def test_worker_processes_and_resumed_iterators_give_the_same_batches():
  config = _data_config(augment_on_device=True)
  plain = iter(data.train_dataset(config, batch_size=16, seed=2))
  batches = [next(plain) for _ in range(4)]
  resumed = iter(data.train_dataset(config, batch_size=16, seed=2))
  for _ in range(2):
    next(resumed)
  state_after_two = resumed.get_state()
  fresh = iter(data.train_dataset(config, batch_size=16, seed=2))
  fresh.set_state(state_after_two)
  workers = config.copy_and_resolve_references()
  workers.worker_count = 2
  with_workers = iter(data.train_dataset(workers, batch_size=16, seed=2))
  for n, want in enumerate(batches):
    others = [next(with_workers)] + ([next(fresh)] if n >= 2 else [])
    for got in others:
      for key in ("image", "label", "box", "mirror"):
        np.testing.assert_array_equal(got[key], want[key])
  with_workers.close()


def test_errors_name_the_fix(tmp_path):
  # Resized on the device means normalised there too.
  with pytest.raises(ValueError, match="drop data.normalize_on_device=False"):
    data.parse_data_config(_data_config(augment_on_device=True, normalize_on_device=False))
  # A folder of images of two sizes cannot be batched before they are resized.
  for i, width in enumerate((10, 12)):
    (tmp_path / "train" / "cat").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, 8), (i * 50, 0, 0)).save(tmp_path / "train" / "cat" / f"{i}.png")
  config = _data_config(name="folder", data_dir=str(tmp_path), channels=3, image_size=8,
                        mean=(0.5,) * 3, std=(0.5,) * 3, augment_on_device=True)
  with pytest.raises(ValueError, match="augment_on_device=False to resize them on the host"):
    next(iter(data.train_dataset(config, batch_size=2, seed=0)))


# ----------------------------------------------------------------------------- trainer


def test_train_and_eval_steps_equal_the_host_batches():
  # The digits are exact on both paths, so the compiled steps must agree to float32.
  config = tiny_config()
  config.data.augment = {"crop_padding": 1, "flip": True, "random_resized_crop": False,
                         "min_area": 0.08}
  host, device, _ = _both(config.data, 1, batch_size=16)
  model = trainer.build_model(config, 10)
  state = trainer.create_train_state(config, model, jax.random.PRNGKey(0), (8, 8, 1))
  assert state.image_size == 8
  rng = jax.random.PRNGKey(1)
  train_step, eval_step = jax.jit(trainer.train_step), jax.jit(trainer.eval_step)
  steps = [train_step(state, batch, rng) for batch in (host[0], device[0])]
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(steps[0][1][key], steps[1][1][key], rtol=1e-5)
  evals = [eval_step(state, batch) for batch in (host[0], device[0])]
  np.testing.assert_allclose(evals[0]["loss_sum"], evals[1]["loss_sum"], rtol=1e-5)
  # The state's image_size is what the batch is resized to: without it, a clear error.
  with pytest.raises(ValueError, match="image_size"):
    trainer.input_images(state.replace(image_size=0), device[0])


def test_training_run_with_device_augmentation(tmp_path):
  config = tiny_config(num_train_steps=4, eval_every_steps=2, checkpoint_every_steps=2)
  config.data.augment_on_device = True
  config.data.augment.update({"crop_padding": 1, "flip": True})
  results = trainer.train_and_evaluate(config, str(tmp_path))
  assert results["steps"] == 4 and results["eval_examples"] == 360
  assert np.isfinite(results["test_loss"]) and 0.0 <= results["test_accuracy"] <= 1.0
  # The run resumes from its checkpoint (iterator state included) and trains on.
  config.num_train_steps = 6
  again = trainer.train_and_evaluate(config, str(tmp_path))
  assert again["resumed_from_step"] == 4 and again["steps"] == 6
