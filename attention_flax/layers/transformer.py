"""Spatial Transformer Networks: Jaderberg et al., NIPS 2015, https://arxiv.org/abs/1506.02025

A spatial transformer regresses an affine transform theta from its input with a small
localization network (:class:`LocalizationNet`), turns it into a sampling grid
(:func:`~attention_flax.sampling.affine_grid`) and resamples the input on that grid
(``sampler``, PyTorch's ``grid_sample`` semantics; :mod:`attention_flax.sampling`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from attention_flax import ops
from attention_flax.checks import check_choice, check_images
from attention_flax.layers.common import check_layout, get_act
from attention_flax.sampling import IDENTITY_THETA, MODES, PADDING_MODES, affine_grid
from attention_flax.sampling import grid_sample  # noqa: F401  (re-exported)

Array = jax.Array
ModuleDef = Callable[..., nn.Module]


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
  :func:`localization_min_size` pixels per side (18 for the defaults). ``conv`` is the
  convolution factory (``flax.linen.Conv``'s signature).
  """
  features: Sequence[int] = (8, 10)
  kernel_sizes: Sequence[int] = (7, 5)
  hidden: int = 32
  pool_size: tuple[int, int] = (3, 3)
  act: str | Callable = "relu"
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "conv1", "kernel")
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
      y = self.conv(feat, (k, k), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"conv{i}")(y)
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

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    out_size: (H_out, W_out) of the sampled image; None keeps the input's size.
    localization: a zero-argument factory of the localization body, a module mapping
      (N, H, W, C) to features of any shape (N, ...); it is called with ``train=`` when its
      ``__call__`` takes that argument. None builds :class:`LocalizationNet` from
      ``loc_features``, ``loc_hidden`` and ``act``. The body is named ``localization``.
    loc_features: widths of the default body's conv stages (kernels 7, 5, 3, 3, ...).
    loc_hidden: width of the default body's hidden Dense layer.
    act: the default body's activation.
    mode, padding_mode, align_corners: passed to ``sampler`` / :func:`affine_grid`.
    sampler: the resampling function, with :func:`grid_sample`'s signature and values;
      the default :func:`attention_flax.ops.grid_sample` has a faster gradient and no
      forward mode; pass :func:`attention_flax.sampling.grid_sample` for ``jax.jvp``.
    conv: the default body's convolution factory (``flax.linen.Conv``'s signature).
    dtype: compute dtype of the body; None promotes the input's dtype with param_dtype.
      theta and the grid are always computed in float32 (or float64).
    param_dtype: dtype of the parameters.

  Whatever the body, the final layer ``fc_theta`` (Dense to 6) starts with zero weights and
  bias [1, 0, 0, 0, 1, 0], so at initialisation the module is the identity transform: with
  out_size None it returns its input exactly, in either mode and align_corners. Sows
  ``"stn_theta"`` (N, 2, 3) and ``"stn_output"`` (N, H_out, W_out, C).
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"stn_theta": "stn_theta", "stn_output": "stn_output"}

  out_size: tuple[int, int] | None = None
  localization: Callable[[], nn.Module] | None = None
  loc_features: Sequence[int] = (8, 10)
  loc_hidden: int = 32
  act: str | Callable = "relu"
  mode: str = "bilinear"
  padding_mode: str = "zeros"
  align_corners: bool = False
  sampler: Callable[..., Array] = ops.grid_sample
  conv: ModuleDef = ops.conv
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """(N, H, W, C) images -> (N, H_out, W_out, C) resampled images."""
    check_images(x, type(self).__name__)
    check_layout(self, x, "localization", "conv1", "kernel")
    check_choice(self.mode, MODES, "mode")
    check_choice(self.padding_mode, PADDING_MODES, "padding_mode")
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
                             hidden=self.loc_hidden, act=self.act, conv=self.conv, dtype=dtype,
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
    out = self.sampler(x, grid, mode=self.mode, padding_mode=self.padding_mode,
                       align_corners=self.align_corners)
    self.sow("intermediates", "stn_output", out)
    return out
