"""Spatial Transformer Networks (Jaderberg et al., NIPS 2015), https://arxiv.org/abs/1506.02025

A spatial transformer regresses an affine transform from its input with a small
localization network, turns it into a sampling grid (:func:`affine_grid`) and resamples the
input on that grid (:func:`grid_sample`). Both functions follow the semantics of
``torch.nn.functional.affine_grid`` / ``grid_sample`` exactly, in NHWC layout:

* grid points are (x, y) pairs normalised to [-1, 1]; (-1, -1) is the top-left corner;
* ``theta`` maps output coordinates to input coordinates;
* ``align_corners=False``: -1 and 1 are the outer edges of the corner pixels, so pixel i of
  n sits at (2i + 1) / n - 1; ``align_corners=True``: -1 and 1 are the corner pixel centres;
* padding ``zeros`` (taps outside the image read 0), ``border`` (coordinates clipped to the
  image) or ``reflection`` (coordinates reflected about the borders, then clipped);
* ``nearest`` rounds half to even, as C's ``nearbyint`` does.

One deliberate refinement: a source coordinate within a few float32 ulps of a pixel centre
is moved onto it (in value, not in gradient), so that the identity transform returns its
input bit for bit, where PyTorch's float32 arithmetic leaves errors of about 1e-7.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from attention_flax.conv import conv_general_dilated
from attention_flax.fusion import materialize
from attention_flax.layers.bilinear import (bilinear_index, bilinear_taps, flat_index, take_rows,
                                             weighted_taps)
from attention_flax.layers.common import accumulation_dtype, check_images, get_act

Array = jax.Array

MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border", "reflection")
# theta of the identity transform, row-major (2, 3).
IDENTITY_THETA = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# grid_sample gathers with one int32 index into the whole batch while the batch holds
# fewer pixels than this (int32's range), and with (image, pixel) indices from there on.
BATCH_INDEX_PIXELS = 2**31


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}.")


def _check_float(a: Any, what: str) -> None:
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"{what} must be floating point; got dtype {a.dtype}. "
                    "Convert first, e.g. .astype(jnp.float32).")


def _base_coords(n: int, align_corners: bool) -> np.ndarray:
  """The normalised centres of n pixels along one axis, in float64 (exact, rounded once)."""
  i = np.arange(n, dtype=np.float64)
  if align_corners:
    # PyTorch's linspace(-1, 1, 1) is [-1]; the sampler maps any coordinate to pixel 0 then.
    return (2.0 * i - (n - 1)) / (n - 1) if n > 1 else np.full((1,), -1.0)
  return (2.0 * i + 1.0 - n) / n


def affine_grid(theta: Array, size: Sequence[int], align_corners: bool = False) -> Array:
  """The sampling grid of a batch of affine transforms (``F.affine_grid`` in NHWC).

  Args:
    theta: (N, 2, 3) floating transforms, mapping output (x, y, 1) to input (x, y).
    size: the output size, (N, H_out, W_out) or (N, H_out, W_out, C) (C is ignored); NHWC
      order, unlike PyTorch's (N, C, H, W).
    align_corners: whether -1 and 1 are the centres (True) or the outer edges (False) of
      the corner pixels.

  Returns:
    (N, H_out, W_out, 2) grid of (x, y) input coordinates, in theta's dtype.
  """
  shape = getattr(theta, "shape", None)
  if shape is None or len(shape) != 3 or tuple(shape[1:]) != (2, 3):
    raise ValueError(f"affine_grid expects theta of shape (N, 2, 3); got {shape}. "
                     "Reshape six parameters per example with theta.reshape(-1, 2, 3).")
  _check_float(theta, "affine_grid's theta")
  size = tuple(size)
  if len(size) not in (3, 4) or not all(isinstance(s, (int, np.integer)) for s in size):
    raise ValueError(f"affine_grid expects size (N, H_out, W_out) or (N, H_out, W_out, C) "
                     f"of ints; got {size}.")
  n, h, w = (int(s) for s in size[:3])
  if n != shape[0]:
    raise ValueError(f"affine_grid: size[0] = {n} but theta holds {shape[0]} transforms; "
                     "pass size=(theta.shape[0], H_out, W_out).")
  if h < 1 or w < 1:
    raise ValueError(f"affine_grid needs a positive output size; got H={h}, W={w}.")
  xs = jnp.asarray(_base_coords(w, align_corners), theta.dtype)[None, None, :]
  ys = jnp.asarray(_base_coords(h, align_corners), theta.dtype)[None, :, None]
  t = theta[:, :, :, None, None]  # (N, 2, 3, 1, 1): broadcast against (H, W)
  gx = t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2]
  gy = t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2]
  return jnp.stack([gx, gy], axis=-1)


def _reflect(c: Array, twice_low: int, twice_high: int) -> Array:
  """Reflects c about low = twice_low / 2 and high = twice_high / 2 until it lies between.

  Bounds come doubled so that the half-pixel edges of align_corners=False stay integers.
  """
  if twice_low == twice_high:
    return jnp.zeros_like(c)
  low = twice_low / 2
  span = (twice_high - twice_low) / 2
  c = jnp.abs(c - low)
  extra = jnp.fmod(c, span)
  flips = jnp.floor(c / span)
  # An even number of flips leaves the direction unchanged, an odd one mirrors it.
  return jnp.where(jnp.fmod(flips, 2.0) == 0.0, extra + low, span - extra + low)


def _source_index(coord: Array, size: int, padding_mode: str, align_corners: bool) -> Array:
  """Normalised coordinates -> pixel coordinates along one axis, padding applied."""
  if align_corners:
    c = (coord + 1.0) / 2.0 * (size - 1)
  else:
    c = ((coord + 1.0) * size - 1.0) / 2.0
  # Normalising a pixel centre and back lands within one ulp of size of the integer, not on
  # it, which would blend a 1e-7 share of the neighbour into every pixel of an identity
  # warp. Points that close are moved onto the centre; the move is below the coordinate's
  # own rounding error, and it is made in value only, so gradients stay those of the
  # bilinear formula.
  tol = 4.0 * float(np.finfo(c.dtype).eps) * max(size, 1)
  nearest = jnp.round(c)
  snap = jnp.where(jnp.abs(c - nearest) <= tol, nearest - c, jnp.zeros((), c.dtype))
  c = c + jax.lax.stop_gradient(snap)
  if padding_mode == "border":
    c = jnp.clip(c, 0.0, size - 1.0)
  elif padding_mode == "reflection":
    if align_corners:
      c = _reflect(c, 0, 2 * (size - 1))
    else:
      c = _reflect(c, -1, 2 * size - 1)
    c = jnp.clip(c, 0.0, size - 1.0)
  return c


def grid_sample(x: Array, grid: Array, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False, *, forward_mode: bool = False) -> Array:
  """Samples images at grid points (``F.grid_sample`` for 4-D input, in NHWC).

  Args:
    x: (N, H, W, C) floating images.
    grid: (N, H_out, W_out, 2) floating (x, y) coordinates normalised to [-1, 1].
    mode: "bilinear" (differentiable in x and grid) or "nearest" (round half to even).
    padding_mode: "zeros", "border" or "reflection": what out-of-range points read.
    align_corners: as in :func:`affine_grid`; use the same value for both.
    forward_mode: differentiate the bilinear sampler with JAX's own autodiff, so that
      forward mode (``jax.jvp``, ``jax.jacfwd``) works too. By default its gradient is a
      ``jax.custom_vjp``: reverse mode (``grad``, ``vjp``, second order) and ``vmap``
      work, forward mode raises ``TypeError``; on CPU that gradient is computed by
      :func:`attention_flax.layers.bilinear.taps_vjp_cpu` (2-5x faster with 32-64
      channels), on other backends it is autodiff's. Values and gradients are the same
      either way (to float rounding).

  Returns:
    (N, H_out, W_out, C) samples in x's dtype (positions and weights in float32 or wider).
  """
  check_images(x, "grid_sample")
  gshape = getattr(grid, "shape", None)
  if gshape is None or len(gshape) != 4 or gshape[-1] != 2:
    raise ValueError(f"grid_sample expects grid of shape (N, H_out, W_out, 2) holding (x, y) "
                     f"pairs; got {gshape}.")
  if gshape[0] != x.shape[0]:
    raise ValueError(f"grid_sample: grid has batch {gshape[0]} but x has {x.shape[0]}; "
                     "build one grid per image.")
  _check_float(grid, "grid_sample's grid")
  _check_choice(mode, MODES, "mode")
  _check_choice(padding_mode, PADDING_MODES, "padding_mode")

  n, h, w, c = x.shape
  _, h_out, w_out, _ = gshape
  acc = accumulation_dtype(x.dtype, grid.dtype)
  g = grid.astype(acc).reshape(n, h_out * w_out, 2)
  # Computed once and read back on CPU (fusion.py): left to fusion, XLA:CPU evaluates
  # this arithmetic again inside every index, weight and gradient expression below (1.4x
  # the whole sampler's time with one channel). XLA:CPU drops optimization barriers before
  # it fuses; other backends keep the one below, as measured on GPUs.
  ix = materialize(_source_index(g[..., 0], w, padding_mode, align_corners))
  iy = materialize(_source_index(g[..., 1], h, padding_mode, align_corners))
  ix, iy = jax.lax.optimization_barrier((ix, iy))

  if mode == "nearest":
    index, valid = flat_index(jnp.round(ix), jnp.round(iy), h, w)
    if n * h * w < BATCH_INDEX_PIXELS:
      # Indices into the whole batch, as the bilinear taps below: 1.3-2x faster forward
      # and backward on CPU than per-image ones (docs/benchmarks.md).
      index = (index + (jnp.arange(n, dtype=jnp.int32) * (h * w))[:, None]).reshape(-1)
      flat = x.reshape(n * h * w, c)
      if c == 3:
        # RGB on CPU reads rows of four, the fourth zero, so that the gradient scatters
        # rows of four too (XLA:CPU scatters rows of three slowly; bilinear.taps_vjp_cpu).
        rows = jax.lax.platform_dependent(
            flat, index, cpu=lambda f, i: take_rows(jnp.pad(f, ((0, 0), (0, 1))), i)[:, :3],
            default=take_rows)
      else:
        rows = take_rows(flat, index)
      rows = rows.reshape(n, h_out * w_out, c)
    else:
      rows = take_rows(x.reshape(n, h * w, c), index)
    out = jnp.where(valid[..., None], rows, jnp.zeros((), x.dtype))
    return out.reshape(n, h_out, w_out, c)

  def bilinear(padded: bool) -> Callable[[Array, Array, Array], Array]:
    def taps(x, ix, iy):
      index, weight = bilinear_index(ix, iy, h, w, padded)
      pixels = (h + 2) * (w + 2) if padded else h * w
      if n * pixels < BATCH_INDEX_PIXELS:
        # Indices into the whole batch: one int32 per tap, where a per-image gather or
        # scatter builds an (image, row) pair for each (a pass over the indices each time
        # on CPU). Batches of 2^31 pixels or more keep per-image indices.
        start = (jnp.arange(n, dtype=jnp.int32) * pixels)[:, None]
        index = jax.tree.map(lambda i: (i + start).reshape(-1), index)
        weight = tuple(wt.reshape(-1) for wt in weight)
      if forward_mode:
        return weighted_taps(x, index, weight, padded)
      return bilinear_taps(x, index, weight, padded)
    return taps

  if c == 1:
    # One channel, on CPU: each point's only index is its top-left tap in the zero-padded
    # image, and the input gradient is one scatter (bilinear.taps_vjp_cpu); 2-2.5x faster
    # there. With more channels the padded copies cost more than they save. Other
    # backends keep the per-tap indices, measured on GPUs.
    out = jax.lax.platform_dependent(x, ix, iy, cpu=bilinear(True), default=bilinear(False))
  else:
    out = bilinear(False)(x, ix, iy)
  return out.reshape(n, h_out, w_out, c).astype(x.dtype)


def localization_min_size(kernel_sizes: Sequence[int]) -> int:
  """The smallest input side the default localization net accepts: each stage is a valid
  k x k convolution and a 2 x 2 max-pool, and the last must leave at least one pixel."""
  side = 1
  for k in reversed(tuple(kernel_sizes)):
    side = 2 * side + k - 1
  return side


def _adaptive_avg_matrix(size: int, out: int) -> np.ndarray:
  """(out, size) averaging weights of PyTorch's adaptive average pooling along one axis:
  bin i covers [floor(i * size / out), ceil((i + 1) * size / out))."""
  m = np.zeros((out, size), np.float64)
  for i in range(out):
    start = (i * size) // out
    stop = -((-(i + 1) * size) // out)
    m[i, start:stop] = 1.0 / (stop - start)
  return m


class LocalizationNet(nn.Module):
  """The ST-CNN localization body: (N, H, W, C) images -> (N, hidden) features.

  Per stage a valid k x k convolution (``conv{i}``), 2 x 2 max-pool and activation: with the
  defaults conv 7x7 (8) -> pool -> ReLU -> conv 5x5 (10) -> pool -> ReLU. An adaptive
  average pool to ``pool_size`` (PyTorch's binning) makes the flattened width independent
  of the input size; for a 28 x 28 input the map is 3 x 3 already and the network is the
  classic one. Then ``fc1`` (Dense, ``hidden``) and the activation. Inputs need at least
  :func:`localization_min_size` pixels per side (18 for the defaults).
  """
  features: Sequence[int] = (8, 10)
  kernel_sizes: Sequence[int] = (7, 5)
  hidden: int = 32
  pool_size: tuple[int, int] = (3, 3)
  act: str | Callable = "relu"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    if len(self.features) != len(self.kernel_sizes):
      raise ValueError(f"LocalizationNet: {len(self.features)} features but "
                       f"{len(self.kernel_sizes)} kernel_sizes; give one kernel per stage.")
    min_side = localization_min_size(self.kernel_sizes)
    if min(x.shape[1:3]) < min_side:
      raise ValueError(
          f"The localization net needs inputs of at least {min_side} x {min_side} pixels; "
          f"got {x.shape[1]} x {x.shape[2]}. Upsample the input, use smaller "
          "kernel_sizes, or pass a custom `localization` factory.")
    act = get_act(self.act)
    y = x
    for i, (feat, k) in enumerate(zip(self.features, self.kernel_sizes), start=1):
      y = nn.Conv(feat, (k, k), padding="VALID", dtype=self.dtype,
                  param_dtype=self.param_dtype, conv_general_dilated=conv_general_dilated,
                  name=f"conv{i}")(y)
      y = act(nn.max_pool(y, (2, 2), strides=(2, 2), padding="VALID"))
    ph = jnp.asarray(_adaptive_avg_matrix(y.shape[1], self.pool_size[0]), y.dtype)
    pw = jnp.asarray(_adaptive_avg_matrix(y.shape[2], self.pool_size[1]), y.dtype)
    y = jnp.einsum("ih,nhwc,jw->nijc", ph, y, pw)
    y = y.reshape(y.shape[0], -1)
    y = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(y)
    return act(y)


def _identity_bias(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
  del key
  if tuple(shape) != (6,):
    raise ValueError(f"the theta bias must have shape (6,); got {tuple(shape)}.")
  return jnp.asarray(IDENTITY_THETA, dtype)


def _accepts_train(module: nn.Module) -> bool:
  try:
    return "train" in inspect.signature(module.__call__).parameters
  except (TypeError, ValueError):
    return False


class SpatialTransformer(nn.Module):
  """Localization net -> affine theta -> grid -> sampled image (the paper's Fig. 2).

  Attributes:
    out_size: (H_out, W_out) of the sampled image; None keeps the input's size.
    localization: a zero-argument factory of the localization body, a module mapping
      (N, H, W, C) to features of any shape (N, ...); it is called with ``train=`` when its
      ``__call__`` takes that argument. None builds :class:`LocalizationNet` from
      ``loc_features``, ``loc_hidden`` and ``act``. The body is named ``localization``.
    loc_features: widths of the default body's conv stages (kernels 7, 5, 3, 3, ...).
    loc_hidden: width of the default body's hidden Dense layer.
    act: the default body's activation.
    mode, padding_mode, align_corners: passed to :func:`grid_sample` / :func:`affine_grid`.
    forward_mode: passed to :func:`grid_sample`: True lets ``jax.jvp`` / ``jax.jacfwd``
      differentiate through the sampler, at the cost of a slower gradient on CPU.
    dtype: compute dtype of the body; None promotes the input's dtype with param_dtype.
      theta and the grid are always computed in float32 (or float64).
    param_dtype: dtype of the parameters.

  Whatever the body, the final layer ``fc_theta`` (Dense to 6) starts with zero weights and
  bias [1, 0, 0, 0, 1, 0], so at initialisation the module is the identity transform: with
  out_size None it returns its input exactly, in either mode and align_corners. Sows
  ``"stn_theta"`` (N, 2, 3) and ``"stn_output"`` (N, H_out, W_out, C).
  """
  out_size: tuple[int, int] | None = None
  localization: Callable[[], nn.Module] | None = None
  loc_features: Sequence[int] = (8, 10)
  loc_hidden: int = 32
  act: str | Callable = "relu"
  mode: str = "bilinear"
  padding_mode: str = "zeros"
  align_corners: bool = False
  forward_mode: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """(N, H, W, C) images -> (N, H_out, W_out, C) resampled images."""
    check_images(x, type(self).__name__)
    _check_choice(self.mode, MODES, "mode")
    _check_choice(self.padding_mode, PADDING_MODES, "padding_mode")
    if self.out_size is None:
      out_h, out_w = x.shape[1], x.shape[2]
    else:
      size = tuple(self.out_size)
      if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(f"SpatialTransformer.out_size must be two positive ints (H, W) or "
                         f"None; got {self.out_size!r}.")
      out_h, out_w = int(size[0]), int(size[1])
    if self.dtype is not None:
      dtype = self.dtype
    else:
      # Flax's promotion rule (bfloat16 input, float32 params -> float32), worked out here
      # so that it holds under strict dtype promotion too.
      with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.promote_types(x.dtype, self.param_dtype)
    x = x.astype(dtype)

    if self.localization is None:
      kernels = (7, 5) + (3,) * max(0, len(self.loc_features) - 2)
      body = LocalizationNet(features=tuple(self.loc_features),
                             kernel_sizes=kernels[:len(self.loc_features)],
                             hidden=self.loc_hidden, act=self.act, dtype=dtype,
                             param_dtype=self.param_dtype, name="localization")
    else:
      # Factories build their module in this scope under an automatic name; a clone gives
      # it the stable name `localization` whatever it is.
      body = self.localization().clone(parent=self, name="localization")
    feats = body(x, train=train) if _accepts_train(body) else body(x)
    feats = jnp.asarray(feats).reshape(x.shape[0], -1).astype(jnp.float32)
    theta = nn.Dense(6, dtype=jnp.float32, param_dtype=self.param_dtype,
                     kernel_init=nn.initializers.zeros, bias_init=_identity_bias,
                     name="fc_theta")(feats)
    theta = theta.astype(jnp.float32).reshape(-1, 2, 3)
    self.sow("intermediates", "stn_theta", theta)
    grid = affine_grid(theta, (x.shape[0], out_h, out_w), align_corners=self.align_corners)
    out = grid_sample(x, grid, mode=self.mode, padding_mode=self.padding_mode,
                      align_corners=self.align_corners, forward_mode=self.forward_mode)
    self.sow("intermediates", "stn_output", out)
    return out
