"""Channel attention: a gate per channel computed from globally pooled features.

* Squeeze-and-Excitation (SE): Hu et al., "Squeeze-and-Excitation Networks",
  https://arxiv.org/abs/1709.01507. Effective SE (one C->C layer, hard sigmoid) is the
  variant of Lee & Park, "CenterMask", https://arxiv.org/abs/1911.06667.
* Efficient Channel Attention (ECA): Wang et al., "ECA-Net: Efficient Channel Attention for
  Deep Convolutional Neural Networks", https://arxiv.org/abs/1910.03151.
* Gather-Excite (GE): Hu et al., "Gather-Excite: Exploiting Feature Context in Convolutional
  Neural Networks", https://arxiv.org/abs/1810.12348.

The gating MLPs act on pooled (N, C) vectors with ``nn.Dense`` rather than 1x1 convolutions
on (N, 1, 1, C) maps: the same arithmetic as a plain matrix product. A timm/PyTorch 1x1 conv weight
of shape (O, I, 1, 1) is the Dense kernel ``w[:, :, 0, 0].T`` of shape (I, O); biases map
unchanged. Parameters use Flax's default initialisers (LeCun-normal kernels, zero biases).

Every gate is computed in ``dtype`` and applied in the input's dtype, so the output has the
input's dtype and shape.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from attention_flax.layers.common import (check_images, check_layout, get_act,
                                          make_divisible, reduced_width)

Array = jax.Array


def check_pooled(pooled: Array, name: str) -> Array:
  """Raises a clear error unless ``pooled`` is an (N, C) vector of channel statistics."""
  if getattr(pooled, "ndim", None) != 2:
    raise ValueError(f"{name}.gate_from_pooled expects (N, C) channel statistics, e.g. "
                     f"jnp.mean(x, axis=(1, 2)) of an (N, H, W, C) map; got shape "
                     f"{getattr(pooled, 'shape', None)}.")
  return pooled


class ChannelMlp(nn.Module):
  """Two layers over the last axis: ``fc1`` (-> ``hidden``), optional ``norm``, act, ``fc2``.

  The building block of the Gather-Excite and Global Context transforms (timm's ``ConvMlp``
  with the same child names ``fc1``, ``norm``, ``fc2``). Input (..., C) -> output (..., C).

  Attributes:
    hidden: width of the hidden layer.
    use_bias: biases on both layers.
    act: activation after the (normalised) hidden layer.
    use_norm: LayerNorm over the hidden features (GCNet's transform).
    norm_epsilon: LayerNorm epsilon (timm's LayerNorm2d uses 1e-6).
    zero_init_last: start ``fc2`` at zero, so the block first outputs zeros (GCNet's
      add-fusion starts as the identity).
  """
  hidden: int
  use_bias: bool = True
  act: str | Callable = "relu"
  use_norm: bool = False
  norm_epsilon: float = 1e-6
  zero_init_last: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    y = nn.Dense(self.hidden, use_bias=self.use_bias, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc1")(x)
    if self.use_norm:
      # Normalised in float32 (as half-precision statistics would lose the small variances)
      # and handed back in the compute dtype.
      norm = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=jnp.float32,
                          param_dtype=self.param_dtype, name="norm")
      y = norm(y.astype(jnp.float32)).astype(y.dtype)
    y = get_act(self.act)(y)
    last_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.lecun_normal()
    return nn.Dense(features, use_bias=self.use_bias, kernel_init=last_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="fc2")(y)


class SqueezeExcite(nn.Module):
  """Squeeze-and-Excitation: ``x * gate(fc2(act(fc1(mean_hw(x)))))``.

  Input and output (N, H, W, C). The hidden width is ``reduced_width(C, rd_ratio,
  rd_divisor, rd_channels)``: timm's divisor 8 gives 8 for a 64-channel block;
  ``rd_divisor=1`` rounds ``C / 16`` to the nearest integer (2 for 24 channels), and
  ``rd_channels=lambda c: c // 16`` gives the floor that PyTorch sketches such as the
  common ``CALayer(channel, reduction=16)`` compute (1 for 24 channels). Children ``fc1``
  (C -> rd) and ``fc2`` (rd -> C), both with bias, ReLU between and a sigmoid gate, as
  timm's ``SEModule`` and that ``CALayer``. Sows ``"channel_gate"`` (N, 1, 1, C).
  :meth:`gate_from_pooled` computes the gate from the (N, C) spatial mean alone.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).

  Attributes:
    rd_ratio, rd_divisor: the hidden width ``C * rd_ratio``, rounded as timm rounds.
    rd_channels: an explicit hidden width, or a function of C giving it (wins over the
      ratio).
    act, gate: the hidden activation and the gating function.
  """
  pools: ClassVar[tuple[str, ...]] = ("mean",)
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"channel_gate": "channel_gate"}

  rd_ratio: float = 1.0 / 16
  rd_divisor: int = 8
  rd_channels: int | Callable[[int], int] | None = None
  act: str | Callable = "relu"
  gate: str | Callable = "sigmoid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "fc1", "kernel")
    return x * self.gate_from_pooled(jnp.mean(x, axis=(1, 2))).astype(x.dtype)

  @nn.compact
  def gate_from_pooled(self, mean: Array) -> Array:
    """The gate (N, 1, 1, C) from the channel means (N, C) of the input."""
    channels = check_pooled(mean, type(self).__name__).shape[-1]
    hidden = reduced_width(channels, self.rd_ratio, self.rd_divisor, self.rd_channels)
    y = nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(mean)
    y = get_act(self.act)(y)
    y = nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(y)
    gate = get_act(self.gate)(y)[:, None, None, :]
    self.sow("intermediates", "channel_gate", gate)
    return gate


class EffectiveSE(nn.Module):
  """Effective SE: ``x * hard_sigmoid(fc(mean_hw(x)))`` with one C -> C layer (with bias).

  No reduction, so no information is lost in a bottleneck; timm's hard sigmoid is
  ``relu6(x + 3) / 6`` (``jax.nn.hard_sigmoid``). Input and output (N, H, W, C); child ``fc``;
  sows ``"channel_gate"`` (N, 1, 1, C); :meth:`gate_from_pooled` as :class:`SqueezeExcite`.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied (one-line error naming x.transpose(0, 2, 3, 1)).
  """
  pools: ClassVar[tuple[str, ...]] = ("mean",)
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"channel_gate": "channel_gate"}

  gate: str | Callable = "hard_sigmoid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "fc", "kernel")
    return x * self.gate_from_pooled(jnp.mean(x, axis=(1, 2))).astype(x.dtype)

  @nn.compact
  def gate_from_pooled(self, mean: Array) -> Array:
    """The gate (N, 1, 1, C) from the channel means (N, C) of the input."""
    channels = check_pooled(mean, type(self).__name__).shape[-1]
    y = nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(mean)
    gate = get_act(self.gate)(y)[:, None, None, :]
    self.sow("intermediates", "channel_gate", gate)
    return gate


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
  """ECA's adaptive kernel size: the odd ``|log2(C) + beta| / gamma`` (rounded up to odd),
  at least 3. ResNet-50's 256/512/1024/2048 channels give 5, 5, 5, 7.

  ``math.log2`` is exact on powers of two, where the floor below is most fragile.
  """
  if channels < 1:
    raise ValueError(f"channels must be >= 1, got {channels}.")
  t = int(abs(math.log2(channels) + beta) / gamma)
  return max(t if t % 2 else t + 1, 3)


_ECA_PADDINGS = ("zeros", "circular")


class ECA(nn.Module):
  """Efficient Channel Attention: a 1-D convolution across the pooled channel vector.

  ``x * gate(conv1d(mean_hw(x)))``: channel c's gate sees its ``k`` neighbours in channel
  order, with zero padding ``(k - 1) // 2`` on both ends and no bias. Input and output
  (N, H, W, C). The child ``conv`` is an ``nn.Conv`` over a length-C sequence with one
  feature, kernel shape (k, 1, 1); timm's ``Conv1d`` weight (1, 1, k) maps to
  ``w.reshape(k, 1, 1)`` (both are correlations, no flip). Sows ``"channel_gate"``;
  :meth:`gate_from_pooled` as :class:`SqueezeExcite`.

  Two variants of timm 1.0 (not in the paper), each a field:

  * ``padding="circular"`` (timm's ``CecaModule``, registered as ``"ceca"``): the channel
    sequence wraps around, so the first and last channels are neighbours.
  * ``use_mlp=True`` (timm's ``EcaModule(use_mlp=True)``, registered as ``"ecam"``): every
    channel mean is lifted to ``rd`` features by a 1x1 layer with bias (child ``conv``,
    kernel (1, 1, rd) from timm's (rd, 1, 1)), passed through ``act``, and the k-tap
    convolution maps the rd features back to one, with bias (child ``conv2``, kernel
    (k, rd, 1) from timm's (1, rd, k)). ``rd`` is ``rd_channels`` or timm's
    ``make_divisible(C * rd_ratio, rd_divisor)`` with its 0.9 round limit: 8 for C = 64,
    32 for C = 256.

  Its parameters do not depend on C, so it cannot tell a channels-first (NCHW) batch
  from an NHWC one, at init or apply: transpose such input with x.transpose(0, 2, 3, 1).

  Attributes:
    kernel_size: odd kernel size, or None to derive it from C with :func:`eca_kernel_size`.
    gamma, beta: the constants of that mapping (the paper's 2 and 1).
    padding: ``"zeros"`` (the paper) or ``"circular"`` padding of the channel sequence.
    use_mlp: the per-channel MLP variant above; ``rd_ratio``, ``rd_divisor``,
      ``rd_channels`` and ``act`` apply only to it.
  """
  pools: ClassVar[tuple[str, ...]] = ("mean",)
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"channel_gate": "channel_gate"}

  kernel_size: int | None = None
  gamma: float = 2
  beta: float = 1
  padding: str = "zeros"
  use_mlp: bool = False
  rd_ratio: float = 1.0 / 8
  rd_divisor: int = 8
  rd_channels: int | None = None
  act: str | Callable = "relu"
  gate: str | Callable = "sigmoid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    return x * self.gate_from_pooled(jnp.mean(x, axis=(1, 2))).astype(x.dtype)

  @nn.compact
  def gate_from_pooled(self, mean: Array) -> Array:
    """The gate (N, 1, 1, C) from the channel means (N, C) of the input."""
    channels = check_pooled(mean, type(self).__name__).shape[-1]
    if self.kernel_size is None:
      k = eca_kernel_size(channels, self.gamma, self.beta)
    else:
      k = self.kernel_size
      if not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(
            f"ECA needs an odd positive kernel_size so that the padding is symmetric; "
            f"got {k!r}. Pass an odd size such as 3, 5 or 7, or None to derive it from the "
            "channel count.")
    if self.padding not in _ECA_PADDINGS:
      raise ValueError(f"ECA padding must be one of {_ECA_PADDINGS}; got {self.padding!r}.")
    pad = (k - 1) // 2

    def taps(y: Array, features: int, use_bias: bool, name: str) -> Array:
      """The k-tap convolution along the channel axis of (N, C, F) -> (N, C, features)."""
      if self.padding == "circular":
        y, pads = jnp.pad(y, ((0, 0), (pad, pad), (0, 0)), mode="wrap"), [(0, 0)]
      else:
        pads = [(pad, pad)]
      return nn.Conv(features, kernel_size=(k,), padding=pads, use_bias=use_bias,
                     dtype=self.dtype, param_dtype=self.param_dtype, name=name)(y)

    # (N, C) -> (N, C, 1): the channels become the spatial axis of a 1-D convolution.
    y = mean[:, :, None]
    if self.use_mlp:
      if self.rd_channels is not None:
        hidden = reduced_width(channels, self.rd_ratio, self.rd_divisor, self.rd_channels)
      else:  # timm rounds this width with its default 0.9 round limit, unlike SE's 0
        hidden = make_divisible(channels * self.rd_ratio, self.rd_divisor, round_limit=0.9)
      y = nn.Conv(hidden, kernel_size=(1,), use_bias=True, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="conv")(y)
      y = taps(get_act(self.act)(y), 1, True, "conv2")
    else:
      y = taps(y, 1, False, "conv")
    gate = get_act(self.gate)(y[:, :, 0])[:, None, None, :]
    self.sow("intermediates", "channel_gate", gate)
    return gate


def _avg_pool_exclude_pad(x: Array, window: int, stride: int, pad: int) -> Array:
  """Average pooling over H, W that divides by the number of real (unpadded) inputs,
  PyTorch's ``count_include_pad=False``. (N, H, W, C) -> (N, H', W', C) with
  H' = (H + 2 * pad - window) // stride + 1 (``ceil(H / e)`` for GE's window, stride, pad)."""
  dims = (1, window, window, 1)
  strides = (1, stride, stride, 1)
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  total = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, dims, strides, padding)
  ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
  count = jax.lax.reduce_window(ones, jnp.zeros((), x.dtype), jax.lax.add, dims, strides,
                                padding)
  return total / count


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source rows of PyTorch's ``interpolate(mode="nearest")``: ``floor(i * in / out)``,
  in exact integer arithmetic."""
  return (np.arange(out_size) * in_size) // out_size


class GatherExcite(nn.Module):
  """Gather-Excite: gate each position by the gathered context of its neighbourhood.

  The gather is always parameter-free (the paper's GE-theta-minus):

  * ``extent=0``: the global average, (N, 1, 1, C).
  * ``extent=e`` (a positive even integer): average pooling with window ``2e - 1``, stride
    ``e``, padding ``e - 1``, padded cells excluded from the mean, giving (N, H', W', C)
    with H' = ceil(H / e); the gate is upsampled back to (H, W) by nearest neighbour
    (PyTorch's ``interpolate`` default, as timm).

  The excite is ``gate(mlp(gathered))`` with ``use_mlp=True`` (timm's default, so that
  ``GatherExcite()`` matches timm's; child ``mlp`` with ``fc1``, ``fc2`` and biases, hidden
  width from ``rd_ratio`` and ``rd_divisor=1``, applied per gathered position), or
  ``gate(gathered)`` with ``use_mlp=False`` (no parameters at all). The parametric gather
  (depthwise convolutions, GE-theta) is not supported: ``extra_params=True`` raises
  ValueError. Input and output (N, H, W, C). Sows ``"channel_gate"`` (N, 1, 1, C) for
  ``extent=0`` and ``"gather_gate"`` (N, H', W', C), at the gathered resolution, otherwise.

  C is read from the input at init, so a channels-first batch is caught only when the
  initialised layer is applied, and only with ``use_mlp`` (one-line error naming
  x.transpose(0, 2, 3, 1)); without parameters it cannot tell.
  """
  # The maps it sows, by name, and their kind (attention_flax.inspect).
  maps: ClassVar[dict[str, str]] = {"channel_gate": "channel_gate", "gather_gate": "gather_gate"}

  extent: int = 0
  extra_params: bool = False
  use_mlp: bool = True
  rd_ratio: float = 1.0 / 16
  rd_divisor: int = 1
  rd_channels: int | None = None
  act: str | Callable = "relu"
  gate: str | Callable = "sigmoid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    check_images(x, type(self).__name__)
    check_layout(self, x, "mlp", "fc1", "kernel")
    if self.extra_params:
      raise ValueError(
          "GatherExcite supports only the parameter-free gather (extra_params=False); "
          "use extra_params=False (with use_mlp=True for a learned excite).")
    e = self.extent
    if not isinstance(e, int) or e < 0 or e % 2:
      raise ValueError(
          f"GatherExcite extent must be 0 (global) or a positive even integer (2, 4, 8); "
          f"got {e!r}.")
    _, height, width, channels = x.shape
    if e == 0:
      gathered = jnp.mean(x, axis=(1, 2), keepdims=True)
    else:
      gathered = _avg_pool_exclude_pad(x, 2 * e - 1, e, e - 1)
    if self.use_mlp:
      hidden = reduced_width(channels, self.rd_ratio, self.rd_divisor, self.rd_channels)
      gathered = ChannelMlp(hidden, act=self.act, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="mlp")(gathered)
    gate = get_act(self.gate)(gathered)
    if e == 0:
      self.sow("intermediates", "channel_gate", gate)
    else:
      self.sow("intermediates", "gather_gate", gate)
      rows = _nearest_indices(gate.shape[1], height)
      cols = _nearest_indices(gate.shape[2], width)
      gate = gate[:, rows][:, :, cols]
    return x * gate.astype(x.dtype)
