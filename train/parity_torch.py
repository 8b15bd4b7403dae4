"""The PyTorch side of ``train.parity``: twin models, and the optimiser and scheduler a
PyTorch user writes for our config keys.

Importing this module imports torch (and timm for the ImageNet-style twins); it comes with
the parity extra: ``pip install 'attention_flax[parity]'``.
"""

from __future__ import annotations

import warnings
from typing import Any

import ml_collections

from train import optim

try:
  import torch
  from torch import nn
  from torch.nn import functional as F
except ImportError as err:  # pragma: no cover - depends on the environment
  raise ImportError(
      "train.parity compares against PyTorch, which is not installed; "
      "pip install 'attention_flax[parity]' (or the test extra).") from err


ACTS = {"relu": F.relu, "silu": F.silu}


class TorchBasicBlock(nn.Module):
  """He et al.'s CIFAR basic block: conv-bn-relu-conv-bn, + shortcut, relu.

  ``projection``: a 1x1 strided conv + BN shortcut ("option B") when the shape changes;
  otherwise option A: the shortcut subsamples with the stride and appends zero channels.
  ``zero_init_last``: the second BN's scale starts at 0.
  """

  def __init__(self, cin: int, cout: int, stride: int, projection: bool,
               zero_init_last: bool, act: Any = F.relu):
    super().__init__()
    self.act = act
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.stride, self.extra = stride, cout - cin
    self.downsample = None
    if projection and (stride != 1 or cin != cout):
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))
    if zero_init_last:
      nn.init.zeros_(self.bn2.weight)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
    if self.downsample is not None:
      short = self.downsample(x)
    elif self.stride != 1 or self.extra:
      short = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))
    else:
      short = x
    return self.act(y + short)


class TorchCifarResNet(nn.Module):
  """A plain PyTorch CIFAR ResNet-(6n + 2) (He et al. 2016, sec. 4.2): a 3x3 stem of 16,
  three stages of n blocks of 16, 32, 64 channels, global average pool, ``fc``.

  Module names are those of timm's ResNet (``conv1``, ``bn1``, ``layer{i}.{j}``, ``fc``),
  so ``attention_flax.convert.convert_variables`` maps it onto our ``resnet{6n + 2}``.
  Convolutions start He-normal (fan-out), as ours.
  """

  def __init__(self, depth: int = 20, num_classes: int = 10, projection: bool = False,
               zero_init_last: bool = True, act: str = "relu"):
    super().__init__()
    self.act = ACTS[act]
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    cin = 16
    for i, width in enumerate((16, 32, 64)):
      blocks = []
      for j in range(n):
        blocks.append(TorchBasicBlock(cin, width, 2 if i and not j else 1, projection,
                                      zero_init_last, self.act))
        cin = width
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(64, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.act(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.fc(x.mean(dim=(2, 3)))


def build_torch_model(name: str, num_classes: int, act: str = "relu") -> nn.Module:
  """The PyTorch twin of a ``train.parity.MODELS`` entry, freshly initialised, with the
  trunk activation ``act`` ("relu" or "silu"; attention gates keep their own)."""
  if act not in ACTS:
    raise ValueError(f"Unknown act {act!r}; choose one of {', '.join(ACTS)}.")
  if name == "resnet20":
    return TorchCifarResNet(20, num_classes, act=act)
  if name == "resnet20_torch_like":
    return TorchCifarResNet(20, num_classes, projection=True, zero_init_last=False, act=act)
  from timm.models.resnet import BasicBlock, ResNet
  layer = {"relu": nn.ReLU, "silu": nn.SiLU}[act]
  if name == "seresnet18":
    import timm
    return timm.create_model("seresnet18", pretrained=False, num_classes=num_classes,
                             act_layer=layer)
  if name == "cbam_resnet18":
    return ResNet(block=BasicBlock, layers=[2, 2, 2, 2], num_classes=num_classes,
                  act_layer=layer, block_args=dict(attn_layer="cbam"))
  raise ValueError(f"No PyTorch twin for {name!r}.")


def torch_optimizer(model: nn.Module, config: ml_collections.ConfigDict
                    ) -> torch.optim.Optimizer:
  """``torch.optim.SGD`` or ``AdamW`` as our ``train.optim.make_optimizer`` builds for
  ``config``: weight_decay_on="kernels" puts the parameters of ndim <= 1 (biases, norm
  scales and offsets) in a group without decay."""
  decay = float(config.weight_decay)
  params = list(model.parameters())
  if config.weight_decay_on == "all":
    groups = [{"params": params, "weight_decay": decay}]
  else:
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
  lr = float(config.learning_rate)
  if config.optimizer == "sgd":
    return torch.optim.SGD(groups, lr=lr, momentum=float(config.momentum),
                           nesterov=bool(config.nesterov))
  if config.optimizer == "adamw":  # eps 1e-8 on both sides (optax's and PyTorch's default)
    return torch.optim.AdamW(groups, lr=lr, betas=(float(config.b1), float(config.b2)),
                             eps=1e-8)
  raise optim.choice_error("optimizer", config.optimizer, optim.OPTIMIZERS)


def torch_train_step(model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, images: Any, labels: Any,
                     config: ml_collections.ConfigDict) -> tuple[float, float]:
  """One PyTorch training step on numpy ``images`` (N, H, W, 3) and ``labels`` (N,):
  cross-entropy with ``config.label_smoothing``, ``clip_grad_norm_`` when
  ``config.grad_clip_norm`` > 0, the optimiser step, then the scheduler's.

  Returns the step's learning rate (before the scheduler moves it) and loss.
  """
  lr = float(opt.param_groups[0]["lr"])
  opt.zero_grad()
  logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  loss = F.cross_entropy(logits, torch.from_numpy(labels).long(),
                         label_smoothing=float(config.label_smoothing))
  loss.backward()
  if config.grad_clip_norm > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
  opt.step()
  with warnings.catch_warnings():  # SequentialLR's own call of step(0) warns
    warnings.simplefilter("ignore", UserWarning)
    sched.step()
  return lr, loss.item()


class ReluTies:
  """Watches every ReLU of ``model`` (``nn.ReLU`` modules and the ``act`` of our twins):
  :attr:`margin` is the smallest nonzero |input| / max|input| of one ReLU call since the
  last :meth:`reset`. Below float32 round-off (about 1e-7) the two frameworks may put an input
  on different sides of 0, and the gradient of that element flows on one side only."""

  def __init__(self, model: nn.Module):
    self.margin = float("inf")
    for m in model.modules():
      if isinstance(m, nn.ReLU):
        m.register_forward_pre_hook(lambda _, args: self._see(args[0]))
      if getattr(m, "act", None) is F.relu:
        m.act = self._relu

  def reset(self) -> None:
    self.margin = float("inf")

  def _relu(self, x: torch.Tensor) -> torch.Tensor:
    self._see(x)
    return F.relu(x)

  def _see(self, x: torch.Tensor) -> None:
    with torch.no_grad():
      size = x.abs()  # exact zeros are 0 on both sides, and both pass no gradient
      nonzero = torch.where(size > 0, size, torch.full_like(size, float("inf")))
      self.margin = min(self.margin, float(nonzero.min() / size.max().clamp_min(1e-30)))


def torch_buffers(model: nn.Module, opt: torch.optim.Optimizer, name: str
                  ) -> dict[str, torch.Tensor]:
  """The optimiser's buffer ``name`` ("momentum_buffer", "exp_avg", "exp_avg_sq") of every
  parameter, keyed as the state dict; zeros where it does not exist yet (before the first
  step: optax's buffers start at zero, PyTorch's first step sets them)."""
  out = {}
  for key, param in model.named_parameters():
    buffer = opt.state.get(param, {}).get(name)
    out[key] = torch.zeros_like(param) if buffer is None else buffer.detach().clone()
  return out


# LinearLR refuses a start factor of 0; ours rises from exactly 0 at step 0.
WARMUP_START_FACTOR = 1e-8


def torch_scheduler(opt: torch.optim.Optimizer, config: ml_collections.ConfigDict,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
  """The ``torch.optim.lr_scheduler`` equal to ``train.optim.make_schedule``, stepped once
  after every optimiser step (our schedules count steps, not epochs):

  * step: ``MultiStepLR(milestones=boundaries in steps, gamma=decay_factor)``;
  * cosine: ``CosineAnnealingLR(T_max=total steps)``;
  * constant: ``ConstantLR(factor=1)``;
  * with a warm-up of w steps: ``SequentialLR([LinearLR(start_factor=1e-8,
    total_iters=w), the above counted from w], milestones=[w])``.
  """
  sched = torch.optim.lr_scheduler
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  total = optim.total_steps(config, steps_per_epoch)
  if config.schedule == "step":
    boundaries = [b - warmup for b in optim.decay_boundaries(config, steps_per_epoch)]
    main = sched.MultiStepLR(opt, milestones=boundaries, gamma=float(config.decay_factor))
  elif config.schedule == "cosine":
    main = sched.CosineAnnealingLR(opt, T_max=max(total - warmup, 1))
  else:
    main = sched.ConstantLR(opt, factor=1.0, total_iters=0)
  if not warmup:
    return main
  ramp = sched.LinearLR(opt, start_factor=WARMUP_START_FACTOR, end_factor=1.0,
                        total_iters=warmup)
  return sched.SequentialLR(opt, [ramp, main], milestones=[warmup])
