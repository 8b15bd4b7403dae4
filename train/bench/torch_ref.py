"""The PyTorch twins of ``python -m train.bench --against=torch``: each registered model in
timm, its SGD step, and ``F.conv2d`` / ``F.grid_sample`` forward + backward.

A model's twin is timm's model of the same name where timm has one; otherwise, for a
registered ResNet, timm's ``ResNet`` with ``block_args=dict(attn_layer=<our attention's
registry name>)`` (timm's ``get_attn`` takes the same names), or, for stems and shortcuts
timm's ``ResNet`` does not build (CIFAR stem, option-A shortcut, a narrow 7x7 stem), the
same network assembled from timm's ``BasicBlock`` / ``Bottleneck``. Anything else raises
:class:`NoTwin`. torch and timm are imported inside the functions.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from train.bench.common import synchronize, torch_device


class NoTwin(ValueError):
  """A model with no PyTorch twin; the message starts with "no torch twin"."""


def timm_attention(attn: Any) -> str | None:
  """The name timm knows ``attn`` by (a registry name, or a registered factory), None for
  no attention; :class:`NoTwin` when timm's ``get_attn`` has no layer of that name."""
  if attn is None:
    return None
  if isinstance(attn, str):
    name = attn.lower()
  else:
    from attention_flax.layers import ATTENTIONS
    name = next((key for key, factory in ATTENTIONS.items()
                 if attn is factory or getattr(attn, "func", None) is factory), None)
    if name is None:
      raise NoTwin(f"no torch twin: the attention {attn!r} is not a registered name")
  from timm.layers import get_attn
  try:
    layer = get_attn(name)
  except (AssertionError, ValueError, KeyError):  # timm asserts on names it does not know
    layer = None
  if layer is None:
    raise NoTwin(f"no torch twin: timm has no attention layer {name!r}")
  return name


def _resnet(name: str) -> Any:
  """The registered model ``name`` (unbound) if it is one of our ResNets, else NoTwin."""
  from attention_flax import models
  from attention_flax.models.resnet import BasicBlock, Bottleneck, ResNet
  model = models.create_model(name, num_classes=1)
  if not isinstance(model, ResNet):
    raise NoTwin(f"no torch twin: timm has no model {name!r} and it is not a ResNet")
  if not issubclass(model.block, (BasicBlock, Bottleneck)):
    raise NoTwin(f"no torch twin: {name}'s block {model.block.__name__} is not timm's")
  if model.act != "relu" or model.attn_kwargs:
    raise NoTwin(f"no torch twin: {name}'s act={model.act!r} / attn_kwargs="
                 f"{model.attn_kwargs!r} have no timm equivalent")
  return model


def torch_model(name: str, num_classes: int, in_chans: int) -> tuple[Any, str]:
  """(torch module, description) of the twin of the registered model ``name`` (module
  docstring); :class:`NoTwin` (a ValueError) when there is none."""
  import timm
  from timm.models import resnet as timm_resnet
  if timm.is_model(name):
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans), f"timm {name}"
  model = _resnet(name)
  attn = timm_attention(model.attn)
  block = getattr(timm_resnet, model.block.__name__)
  down = model.down or ("pad" if model.stem == "cifar" else "conv")
  stem_width = model.stem_width or model.widths[0]
  stem = {"classic": (stem_width == 64, 64, ""),
          "deep": (stem_width % 2 == 0, stem_width // 2, "deep")}.get(model.stem)
  try:
    if stem and stem[0] and down in ("conv", "avg"):
      module = timm_resnet.ResNet(
          block, tuple(model.stage_sizes), channels=tuple(model.widths),
          num_classes=num_classes, in_chans=in_chans, stem_width=stem[1], stem_type=stem[2],
          avg_down=down == "avg", block_args=dict(attn_layer=attn) if attn else None)
      return module, f"timm ResNet ({block.__name__}, attn_layer={attn})"
    module = _resnet_of_timm_blocks(model, block, attn, down, stem_width, num_classes,
                                    in_chans)
  except Exception as err:  # timm's own constructors fail for some layer defaults
    raise NoTwin(f"no torch twin: timm could not build {name} with attn_layer={attn} "
                 f"({type(err).__name__}: {err})") from err
  return module, f"timm {block.__name__}s (attn_layer={attn}), same stem/widths/shortcut"


def _resnet_of_timm_blocks(model: Any, block: Any, attn: str | None, down: str,
                           stem_width: int, num_classes: int, in_chans: int) -> Any:
  """Our ResNet ``model``'s stem, widths and shortcuts around timm's ``block``s."""
  import torch
  from torch import nn

  class PadShortcut(nn.Module):  # Option A: subsample, append zero channels.
    def __init__(self, stride: int, extra: int):
      super().__init__()
      self.stride, self.extra = stride, extra

    def forward(self, x):
      x = x[:, :, ::self.stride, ::self.stride]
      return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra))

  def conv_bn_relu(cin: int, cout: int, k: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]

  def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if down == "pad":
      return PadShortcut(stride, cout - cin)
    pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
            if down == "avg" and stride > 1 else nn.Identity())
    return nn.Sequential(pool, nn.Conv2d(cin, cout, 1, 1 if down == "avg" else stride,
                                         bias=False), nn.BatchNorm2d(cout))

  if model.stem == "cifar":
    layers = conv_bn_relu(in_chans, stem_width, 3, 1)
  elif model.stem == "classic":
    layers = [*conv_bn_relu(in_chans, stem_width, 7, 2), nn.MaxPool2d(3, 2, 1)]
  else:
    half = stem_width // 2
    layers = [*conv_bn_relu(in_chans, half, 3, 2), *conv_bn_relu(half, half, 3, 1),
              *conv_bn_relu(half, stem_width, 3, 1), nn.MaxPool2d(3, 2, 1)]
  inplanes = stem_width
  for i, (n, width) in enumerate(zip(model.stage_sizes, model.widths)):
    for j in range(n):
      stride = 2 if i > 0 and j == 0 else 1
      out = width * block.expansion
      projection = shortcut(inplanes, out, stride) if stride != 1 or inplanes != out else None
      layers.append(block(inplanes, width, stride, projection, attn_layer=attn))
      inplanes = out
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
  return nn.Sequential(*layers)


class TorchStep:
  """One SGD step (momentum 0.9, weight decay 1e-4, ``loss.backward()``) of the twin of
  ``model`` on the (N, H, W, C) images and labels of ``batch``; channels_last;
  ``torch.compile`` and bf16 autocast only on a GPU. The first step runs here."""

  def __init__(self, model: str, batch: Mapping[str, np.ndarray], num_classes: int,
               dtype: str):
    import torch
    self.torch = torch
    image = batch["image"]
    module, self.description = torch_model(model, num_classes, image.shape[-1])
    self.device = torch_device()
    self.model = module.to(self.device).to(memory_format=torch.channels_last).train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9,
                               weight_decay=1e-4)
    x = torch.from_numpy(image).permute(0, 3, 1, 2)
    self.x = x.contiguous(memory_format=torch.channels_last).to(self.device)
    self.y = torch.from_numpy(batch["label"]).long().to(self.device)
    self.autocast = self.device == "cuda" and dtype == "bfloat16"
    self.forward = torch.compile(self.model) if self.device == "cuda" else self.model
    self.times: list[float] = []
    self.first_step = self.step()

  def step(self) -> float:
    torch = self.torch
    start = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device, torch.bfloat16, enabled=self.autocast):
      loss = torch.nn.functional.cross_entropy(self.forward(self.x), self.y)
    loss.backward()
    self.opt.step()
    synchronize(self.device)
    return time.perf_counter() - start


class TorchSampler:
  """``F.grid_sample`` (zeros padding, align_corners=False) forward and backward for the
  output gradient ``cot``; ``x`` and ``cot`` (N, H, W, C), ``grid`` (N, H, W, 2)."""

  def __init__(self, x: np.ndarray, grid: np.ndarray, cot: np.ndarray, mode: str):
    import torch
    self.torch, self.device, self.mode = torch, torch_device(), mode
    def nchw(a: np.ndarray) -> Any:
      return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().to(self.device)

    self.x = nchw(x).requires_grad_()
    self.grid = torch.from_numpy(grid.copy()).to(self.device).requires_grad_()
    self.cot = nchw(cot)
    self.times: list[float] = []

  def step(self) -> float:
    start = time.perf_counter()
    self.x.grad = self.grid.grad = None
    out = self.torch.nn.functional.grid_sample(self.x, self.grid, mode=self.mode,
                                               align_corners=False)
    out.backward(self.cot)
    synchronize(self.device)
    return time.perf_counter() - start


class TorchConv:
  """``F.conv2d`` forward and ``backward(g)`` in channels_last; ``x`` and ``g`` (N, H, W,
  C), ``w`` (kh, kw, C_in, C_out), symmetric padding ``pad``."""

  def __init__(self, x: np.ndarray, w: np.ndarray, g: np.ndarray, stride: int, pad: int):
    import torch
    self.torch, self.device = torch, torch_device()
    self.stride, self.pad = stride, pad
    def as_torch(a: np.ndarray, order: tuple[int, ...]) -> Any:
      return torch.from_numpy(a.transpose(order).copy()).to(
          self.device, memory_format=torch.channels_last)

    self.x = as_torch(x, (0, 3, 1, 2)).requires_grad_(True)
    self.w = as_torch(w, (3, 2, 0, 1)).requires_grad_(True)
    self.g = as_torch(g, (0, 3, 1, 2))
    self.times: list[float] = []

  def step(self) -> float:
    start = time.perf_counter()
    y = self.torch.nn.functional.conv2d(self.x, self.w, stride=self.stride, padding=self.pad)
    y.backward(self.g)
    synchronize(self.device)
    self.x.grad, self.w.grad = None, None
    return time.perf_counter() - start


class TorchLoop:
  """The plain PyTorch CIFAR loop of ``--cache``: the images decoded once into one uint8
  (N, C, H, W) tensor, then per step a shuffled batch of ``batch`` rows, zero-padded by
  ``padding`` and cropped back at a random offset per image, mirrored with probability 1/2,
  normalised, and one SGD step of ``model``'s twin (:class:`TorchStep`'s settings)."""

  def __init__(self, model: str, images: np.ndarray, labels: np.ndarray, *, batch: int,
               mean: Any, std: Any, padding: int, num_classes: int = 10, seed: int = 0):
    import torch
    self.torch, self.batch, self.padding = torch, batch, padding
    module, self.description = torch_model(model, num_classes, images.shape[-1])
    self.model = module.to(memory_format=torch.channels_last).train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9,
                               weight_decay=1e-4)
    self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    self.images = self.images.contiguous()
    self.labels = torch.from_numpy(np.asarray(labels)).long()
    self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    self.gen = torch.Generator().manual_seed(seed)
    self.order, self.at = torch.randperm(len(self.labels), generator=self.gen), 0

  def next_batch(self) -> tuple[Any, Any]:
    """The next (images float32 (B, C, H, W) channels_last, labels (B,)) of the epoch."""
    torch = self.torch
    if self.at + self.batch > len(self.order):
      self.order, self.at = torch.randperm(len(self.labels), generator=self.gen), 0
    index = self.order[self.at:self.at + self.batch]
    self.at += self.batch
    x = self.images[index]
    n, c, h, w = x.shape
    p = self.padding
    if p:
      padded = torch.nn.functional.pad(x, (p, p, p, p))
      offset = torch.randint(0, 2 * p + 1, (n, 2), generator=self.gen)
      rows = (offset[:, 0, None] + torch.arange(h))[:, None, :, None]
      cols = (offset[:, 1, None] + torch.arange(w))[:, None, None, :]
      x = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows, cols]
    mirror = torch.rand(n, generator=self.gen) < 0.5
    x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    x = (x.float() / 255.0 - self.mean) / self.std
    return x.contiguous(memory_format=torch.channels_last), self.labels[index]

  def step(self, x: Any, y: Any) -> None:
    self.opt.zero_grad(set_to_none=True)
    loss = self.torch.nn.functional.cross_entropy(self.model(x), y)
    loss.backward()
    self.opt.step()
