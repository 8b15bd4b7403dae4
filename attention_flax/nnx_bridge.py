"""Flax NNX access to every attention_flax layer and model, through Flax's bridge.

The library stays linen; :func:`to_nnx` wraps any of its modules in :class:`Bridged`, a
``flax.nnx.bridge.ToNNX`` that knows this library's conventions: ``train=True`` updates
the batch-norm statistics (``nnx.BatchStat``, linen's ``"batch_stats"``), and every call
keeps the maps the layers sow (``nnx.Intermediate``, linen's ``"intermediates"``) from
that call only. The variables keep their linen names and nesting, so
:func:`linen_variables` and :func:`load_linen_variables` move weights (those of
:mod:`attention_flax.convert` too) between the two APIs.

Example: an NNX network holding SE and CBAM, trained with ``nnx.Optimizer``::

  import jax, jax.numpy as jnp, optax
  from flax import nnx
  import attention_flax as af
  from attention_flax.nnx_bridge import sown_maps, to_nnx

  class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, channels: int = 16, classes: int = 10):
      self.conv = nnx.Conv(1, channels, (3, 3), rngs=rngs)
      x = jnp.zeros((1, 8, 8, channels))  # an example input fixes the shapes
      self.se = to_nnx(af.SqueezeExcite(), x, rngs=rngs)
      self.cbam = to_nnx(af.CBAM(rd_ratio=1 / 4), x, rngs=rngs)
      self.head = nnx.Linear(channels, classes, rngs=rngs)

    def __call__(self, x, train: bool = False):
      y = nnx.relu(self.conv(x))
      y = self.cbam(self.se(y, train=train), train=train)
      return self.head(y.mean(axis=(1, 2)))

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      logits = model(images, train=True)  # updates CBAM's spatial BatchNorm statistics
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  images, labels = jnp.ones((4, 8, 8, 1)), jnp.arange(4)
  loss = train_step(model, optimizer, images, labels)
  logits = model(images)  # eval mode: the statistics stay as they are
  maps = sown_maps(model)
  maps["se"]["channel_gate"][0]        # (4, 1, 1, 16) SE gate
  maps["cbam"]["spatial"]["spatial_mask"][0]  # (4, 8, 8, 1) CBAM spatial mask

See docs/nnx.md for the details (parity with linen, weights, what the bridge costs).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn
from flax import nnx

# The linen collections a model of this library has besides what it sows.
_COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


class Bridged(nnx.bridge.ToNNX):
  """An attention_flax linen module as an NNX module; build it with :func:`to_nnx`.

  ``bridged(x, train=False, **kwargs)`` applies the linen module's ``__call__`` with
  ``train`` and ``kwargs``; other methods work as in ``ToNNX``
  (``bridged.gate_from_pooled(mean)``), given ``train`` only when the caller gives it.
  With ``train=True`` the ``"batch_stats"``
  collection is mutable and its update is stored in the module (``nnx.BatchStat``), as
  ``apply(..., mutable=["batch_stats"])`` would return it; with ``train=False`` the
  statistics are only read. With ``sow=True`` the call's sown maps replace the previous
  call's as ``nnx.Intermediate`` variables (see :func:`sown_maps`); ``sow=False`` keeps
  none, which saves their memory in a training step.
  """

  def __init__(self, module: nn.Module, rngs: nnx.Rngs | jax.Array | None = None,
               sow: bool = True):
    super().__init__(module, rngs=rngs)
    self.to_nnx__sow = sow  # the prefix keeps it out of the linen variables

  def __getattr__(self, name: str) -> Any:
    # ToNNX offers the linen class's callables as methods, and so its factory fields
    # (``conv``) too, which hide a child of that name whose variables do not exist yet.
    fields = getattr(type(vars(self).get("to_nnx__module")), "__dataclass_fields__", {})
    if name in fields:
      raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
    return super().__getattr__(name)

  def __call__(self, *args: Any, train: bool | None = None, **kwargs: Any) -> Any:
    nnx.pop(self, nnx.Intermediate)  # linen's sow appends: start from none
    mutable = ["batch_stats"] if train else []
    if self.to_nnx__sow:
      mutable.append("intermediates")
    if train is not None:
      kwargs["train"] = train
    return super().__call__(*args, mutable=mutable or False, **kwargs)


def to_nnx(module: nn.Module, *example_args: Any, rngs: nnx.Rngs | jax.Array,
           sow: bool = True, **example_kwargs: Any) -> Bridged:
  """``module`` (an attention_flax layer or model) as an initialised NNX module.

  The variables are created as ``module.init`` would from the example input(s), e.g. one
  (N, H, W, C) image batch (only the shapes matter); ``rngs`` is an ``nnx.Rngs`` or a
  key for the ``"params"`` stream. Returns a :class:`Bridged` whose parameters are
  ``nnx.Param`` and batch-norm statistics ``nnx.BatchStat``, named as the linen variables.
  """
  bridged = Bridged(module, rngs=rngs, sow=sow)

  # Compiled, as one would jax.jit(module.init): op by op, a whole model starts slowly.
  @nnx.jit
  def initialise(bridged: Bridged, *args: Any) -> None:
    nnx.bridge.lazy_init(bridged, *args, **example_kwargs)

  initialise(bridged, *example_args)
  return bridged


def sown_maps(model: nnx.Module) -> dict[str, Any]:
  """The maps sown by the last call of every :class:`Bridged` inside ``model``.

  A nested dict by attribute path, then linen module path, each map a 1-tuple as in
  linen's ``"intermediates"``: for a bridged CBAM ``cbam``,
  ``sown_maps(model)["cbam"]["spatial"]["spatial_mask"][0]`` is its (N, H, W, 1) mask;
  for a bridged layer or model itself, the dict equals linen's ``"intermediates"``.
  """
  return nnx.to_pure_dict(nnx.state(model, nnx.Intermediate))


def linen_variables(bridged: Bridged) -> dict[str, Any]:
  """The linen variables of a :class:`Bridged`: ``{"params": ..., "batch_stats": ...}``.

  Usable as ``bridged.to_nnx__module.apply(linen_variables(bridged), x)``; a module
  without batch norms has no ``"batch_stats"`` entry.
  """
  out = {name: nnx.to_pure_dict(nnx.state(bridged, kind)) for name, kind in _COLLECTIONS.items()}
  return {name: tree for name, tree in out.items() if tree}


def load_linen_variables(bridged: Bridged, variables: dict[str, Any]) -> None:
  """Sets a :class:`Bridged`'s variables in place from linen ones (e.g. converted timm weights).

  ``variables`` has ``"params"`` and optionally ``"batch_stats"``, with the names and
  shapes ``module.init`` gives; each array replaces the one at the same path (a path the
  module does not have raises).
  """
  for name, kind in _COLLECTIONS.items():
    if name in variables:
      state = nnx.state(bridged, kind)
      nnx.replace_by_pure_dict(state, variables[name])
      nnx.update(bridged, state)
