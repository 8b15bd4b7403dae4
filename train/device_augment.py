"""Images prepared inside the jitted step: uint8 pixels normalised there
(:func:`normalize_images`, ``data.normalize_on_device``), and the training augmentation
(resize with a zero-padded random crop, or the random-resized crop; the flip) and the eval
resize made there (:func:`prepare_images`, ``data.augment_on_device``).

With ``config.data.augment_on_device`` the input pipeline draws each image's crop and
flip as on the host (``train.transforms.TrainAugment``), with the same generator in the
same order, but leaves the image at its stored size and sends the window to resize with
it. On an accelerator the resize is a pair of small batched products; on the host it is
Pillow's resize of every image, the pipeline's largest cost, after which the host ships
the resized pixels (49x the bytes of a 32 x 32 image at 224 x 224). Only sources whose
images all have one stored size qualify (CIFAR, MNIST, the digits).

The resize is :func:`jax.image.scale_and_translate` with the triangle kernel and
antialiasing, which weighs pixels as Pillow's bilinear filter does (shrinking included):
the window's position is its translation, its size its scale, and output pixels whose
sample falls outside the image are 0, the host's zero padding. A mirrored window's result
is the mirrored window of the mirrored image. Values equal the host's float path within
float32 rounding (``tests/train/test_device_augment.py``); the host's uint8 path rounds
its resized pixels to whole levels, this one does not.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def crop_and_resize(images: jax.Array, size: int, boxes: jax.Array, mirror: jax.Array
                    ) -> jax.Array:
  """float32 (N, size, size, C) from (N, H, W, C) uint8 or float images: the window
  ``boxes[n]`` = (top, left, height, width) of image n, in its pixels, resized to
  (size, size) (zero where the window leaves the image), then mirrored left-right where
  ``mirror[n]``. uint8 pixels keep their 0..255 scale.

  ``train.transforms``' views as windows of the stored (h, w) image:
  ``resize_and_crop(image, size, (r, c))`` is (r h / size, c w / size, h, w), the
  random-resized crop's window is itself, and the eval centre crop's at the resized
  (nh, nw) is (top h / nh, left w / nw, size h / nh, size w / nw).
  """
  if images.ndim != 4:
    raise ValueError(f"Expected images of shape (N, H, W, C), got {images.shape}.")
  n, h, w, channels = images.shape
  if boxes.shape != (n, 4) or mirror.shape != (n,):
    raise ValueError(f"Expected boxes of shape ({n}, 4) and mirror of shape ({n},) for "
                     f"{n} images; got {boxes.shape} and {mirror.shape}.")
  images = images.astype(jnp.float32)
  images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1], images)
  top, left, height, width = (boxes[:, k].astype(jnp.float32) for k in range(4))
  # Mirroring the window's result = taking the mirrored window of the mirrored image.
  left = jnp.where(mirror, w - left - width, left)
  scale = jnp.stack([size / height, size / width], -1)
  translation = -jnp.stack([top, left], -1) * scale

  def one(image, scale, translation):
    return jax.image.scale_and_translate(
        image, (size, size, channels), (0, 1), scale, translation, "linear",
        antialias=True, precision=jax.lax.Precision.HIGHEST)

  return jax.vmap(one)(images, scale, translation)


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
  left the augmentation to the device (the batch has "box" and "mirror"), else
  :func:`normalize_images`. ``size`` is the side the model takes."""
  if "box" not in batch:
    return normalize_images(batch["image"], mean, std)
  if not size:
    raise ValueError("A device-augmented batch needs the side to resize to: create the "
                     "train state with create_train_state, which sets its image_size.")
  return prepare_images(batch, size, mean, std)


def prepare_images(batch: dict[str, jax.Array], size: int, mean: Sequence[float],
                   std: Sequence[float]) -> jax.Array:
  """A device-augmented batch ({"image", "box", "mirror"}) -> the model's input:
  float32 (N, size, size, C), (pixels / 255 - mean) / std for uint8 images, (image - mean)
  / std for float ones (in [0, 1]), as the host pipeline normalises."""
  images = crop_and_resize(batch["image"], size, batch["box"], batch["mirror"])
  if batch["image"].dtype == jnp.uint8:
    images = images / jnp.float32(255.0)
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
