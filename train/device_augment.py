"""Images prepared inside the jitted step: uint8 pixels normalised there
(:func:`normalize_images`, ``data.normalize_on_device``), and the CIFAR augmentation
(resize, zero-padded random crop, flip) made there (:func:`prepare_images`).

With ``config.data.augment_on_device`` the input pipeline draws each image's crop offset
and flip as on the host (``train.transforms.TrainAugment``) but leaves the image at its
stored size, and :func:`prepare_images` makes the batch here: on an accelerator the resize
is a pair of small batched products, where on the host it is Pillow's resize of every
image, the pipeline's largest cost, and the host then ships the resized pixels (49x the
bytes of a 32 x 32 image at 224 x 224). Only sources whose images all have one size
qualify (CIFAR, MNIST, the digits); the random-resized crop stays on the host.

The resize is :func:`jax.image.scale_and_translate` with the triangle kernel and
antialiasing, which weighs pixels as Pillow's bilinear filter does (shrinking included),
and the crop is its translation: output pixels whose sample falls outside the image are 0,
the host's zero padding. A mirrored crop is the crop, moved, of the mirrored image. Values
equal the host's float path within float32 rounding (``tests/train/test_device_augment.py``);
the host's uint8 path rounds its resized pixels to whole levels, this one does not.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def resize_and_crop(images: jax.Array, size: int, offsets: jax.Array, mirror: jax.Array
                    ) -> jax.Array:
  """float32 (N, size, size, C) from (N, H, W, C) uint8 or float images: each resized to
  (size, size), zero-padded and cropped back with its window's top-left corner at
  ``offsets[n]`` = (rows, columns) from the resized image's, then mirrored left-right
  where ``mirror[n]``: ``train.transforms.resize_and_crop`` for a batch. uint8 pixels
  keep their 0..255 scale."""
  if images.ndim != 4:
    raise ValueError(f"Expected images of shape (N, H, W, C), got {images.shape}.")
  n, h, w, channels = images.shape
  if offsets.shape != (n, 2) or mirror.shape != (n,):
    raise ValueError(f"Expected offsets of shape ({n}, 2) and mirror of shape ({n},) for "
                     f"{n} images; got {offsets.shape} and {mirror.shape}.")
  images = images.astype(jnp.float32)
  images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1], images)
  # Mirroring after the crop = cropping the mirrored image with the column offset negated.
  shift = jnp.stack([offsets[:, 0], jnp.where(mirror, -offsets[:, 1], offsets[:, 1])], -1)
  scale = jnp.asarray([size / h, size / w], jnp.float32)

  def one(image, translation):
    return jax.image.scale_and_translate(
        image, (size, size, channels), (0, 1), scale, translation, "linear",
        antialias=True, precision=jax.lax.Precision.HIGHEST)

  return jax.vmap(one)(images, -shift.astype(jnp.float32))


def normalize_images(images: jax.Array, mean: Sequence[float], std: Sequence[float]
                     ) -> jax.Array:
  """uint8 (N, H, W, C) pixels -> float32 (pixels / 255 - mean) / std, per channel: the
  host pipeline's formula (``train.transforms.Collate``), here inside the jitted step.
  Floating images are taken to be normalised already and returned unchanged."""
  if images.dtype != jnp.uint8:
    return images
  scaled = images.astype(jnp.float32) / jnp.float32(255.0)
  return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def model_input(batch: dict[str, jax.Array], size: int, mean: Sequence[float],
                std: Sequence[float]) -> jax.Array:
  """The model's input from any pipeline batch: :func:`prepare_images` when the pipeline
  left the augmentation to the device (the batch has "offset" and "mirror"), else
  :func:`normalize_images`. ``size`` is the side the model takes."""
  if "offset" not in batch:
    return normalize_images(batch["image"], mean, std)
  if not size:
    raise ValueError("A device-augmented batch needs the side to resize to: create the "
                     "train state with create_train_state, which sets its image_size.")
  return prepare_images(batch, size, mean, std)


def prepare_images(batch: dict[str, jax.Array], size: int, mean: Sequence[float],
                   std: Sequence[float]) -> jax.Array:
  """A device-augmented batch ({"image", "offset", "mirror"}) -> the model's input:
  float32 (N, size, size, C), (pixels / 255 - mean) / std for uint8 images, (image - mean)
  / std for float ones (in [0, 1]), as the host pipeline normalises."""
  images = resize_and_crop(batch["image"], size, batch["offset"], batch["mirror"])
  if batch["image"].dtype == jnp.uint8:
    images = images / jnp.float32(255.0)
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
