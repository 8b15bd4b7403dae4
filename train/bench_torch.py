"""The PyTorch side of ``python -m train.bench --against=torch``: the same architectures
in timm (CIFAR ResNets built from timm's blocks), their SGD step, and torch's grid_sample.

torch and timm are imported inside the functions, so ``train.bench`` runs without them.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from train.bench_models import OurStep
  from train.bench_sampler import _OurSampler

_TIMM_ATTN = {"se": "se", "ese": "ese", "eca": "eca", "cbam": "cbam", "gc": "gc", "ge": "ge"}


def torch_device() -> str:
  """"cuda" when PyTorch sees a GPU, else "cpu": the twins run where torch runs best."""
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
  """Wait for the queued GPU work, so host clocks time it (no-op on CPU)."""
  if device == "cuda":
    import torch
    torch.cuda.synchronize()


def _torch_cifar_resnet(fields: dict[str, Any], num_classes: int, in_chans: int) -> Any:
  """A CIFAR-style ResNet of timm BasicBlocks: the same stem, widths and shortcut as ours."""
  import torch
  from timm.layers import get_attn
  from timm.models.resnet import BasicBlock

  class PadShortcut(torch.nn.Module):  # Option A: subsample, append zero channels.
    def __init__(self, stride, extra):
      super().__init__()
      self.stride, self.extra = stride, extra

    def forward(self, x):
      x = x[:, :, ::self.stride, ::self.stride]
      return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra))

  attn = fields.get("attn")
  attn_layer = get_attn(_TIMM_ATTN[attn]) if attn else None
  widths, stem = tuple(fields["widths"]), fields.get("stem", "classic")
  layers = [torch.nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
            torch.nn.BatchNorm2d(widths[0]), torch.nn.ReLU(inplace=True)]
  if stem != "cifar":  # Classic stem: 7x7/2 conv and 3x3/2 max-pool.
    layers = [torch.nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False),
              torch.nn.BatchNorm2d(widths[0]), torch.nn.ReLU(inplace=True),
              torch.nn.MaxPool2d(3, 2, 1)]
  inplanes = widths[0]
  for i, (n, width) in enumerate(zip(fields["stage_sizes"], widths)):
    for j in range(n):
      stride = 2 if i > 0 and j == 0 else 1
      down = None
      if stride != 1 or inplanes != width:
        down = (PadShortcut(stride, width - inplanes) if stem == "cifar" else
                torch.nn.Sequential(torch.nn.Conv2d(inplanes, width, 1, stride, bias=False),
                                    torch.nn.BatchNorm2d(width)))
      layers.append(BasicBlock(inplanes, width, stride, down, attn_layer=attn_layer))
      inplanes = width
  layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
             torch.nn.Linear(inplanes, num_classes)]
  return torch.nn.Sequential(*layers)


def torch_model(name: str, num_classes: int, in_chans: int) -> tuple[Any, str]:
  """(module, description) of the PyTorch counterpart; ValueError when there is none."""
  import timm
  from timm.models.resnet import BasicBlock, Bottleneck, ResNet
  from attention_flax import models
  if timm.is_model(name):
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans), f"timm {name}"
  match = re.fullmatch(r"(cbam|gc)_?resnet(18|34|50|101|152)", name)
  if match:
    depth = int(match.group(2))
    block, layers = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                     50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
                     152: (Bottleneck, (3, 8, 36, 3))}[depth]
    module = ResNet(block, layers, num_classes=num_classes, in_chans=in_chans,
                    block_args=dict(attn_layer=match.group(1)))
    return module, f"timm ResNet{depth} + attn_layer={match.group(1)}"
  fields = dict(getattr(models.model_info(name).factory, "keywords", {}))
  block = fields.get("block")
  if (block is not None and block.__name__ == "BasicBlock" and "stage_sizes" in fields
      and fields.get("attn") in (None, *_TIMM_ATTN) and fields.get("down") is None):
    return (_torch_cifar_resnet(fields, num_classes, in_chans),
            "timm BasicBlocks, same stem/widths/shortcut")
  raise ValueError(f"no PyTorch counterpart of {name} is built here")


class TorchStep:
  """The PyTorch twin of an :class:`OurStep`: same batch, SGD, loss.backward()."""

  def __init__(self, ours: OurStep, dtype: str):
    import torch
    self.torch = torch
    module, self.description = torch_model(ours.model, ours.num_classes, ours.shape[-1])
    self.device = torch_device()
    self.model = module.to(self.device).to(memory_format=torch.channels_last).train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9,
                               weight_decay=1e-4)
    image = torch.from_numpy(ours.host_batch["image"]).permute(0, 3, 1, 2)
    self.x = image.contiguous(memory_format=torch.channels_last).to(self.device)
    self.y = torch.from_numpy(ours.host_batch["label"]).long().to(self.device)
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


class _TorchSampler:
  def __init__(self, ours: _OurSampler):
    import torch
    self.torch, self.device = torch, torch_device()
    x = torch.from_numpy(ours.x).permute(0, 3, 1, 2).contiguous()
    self.x = x.to(self.device).requires_grad_()
    self.grid = torch.from_numpy(ours.grid.copy()).to(self.device).requires_grad_()
    self.cot = torch.from_numpy(ours.cot).permute(0, 3, 1, 2).contiguous().to(self.device)
    self.mode = ours.mode
    self.times = []

  def step(self) -> float:
    start = time.perf_counter()
    self.x.grad = self.grid.grad = None
    out = self.torch.nn.functional.grid_sample(self.x, self.grid, mode=self.mode,
                                               align_corners=False)
    out.backward(self.cot)
    synchronize(self.device)
    return time.perf_counter() - start
