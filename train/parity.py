"""Step parity with PyTorch: the same network, weights and batches, trained by our train
step and by ``torch.optim``, compared tensor by tensor.

Run (needs the parity extra, ``pip install 'attention_flax[parity]'``; no network):
  python -m train.parity                      # every case of CASES, ReLU, 20 resynced steps
  python -m train.parity --case=resnet20_step --steps=40
  python -m train.parity --free               # 20 free-running steps, SiLU
  python -m train.parity --model=seresnet18 --schedule=cosine --warmup_epochs=1 --nesterov

PyTorch side: a plain PyTorch ResNet-20 written here (:class:`TorchCifarResNet`, option-A
or 1x1 projection shortcuts) or timm's ``seresnet18`` / CBAM ResNet-18, trained with
``torch.optim.SGD`` or ``AdamW`` (parameter groups for ``weight_decay_on="kernels"``),
``F.cross_entropy(label_smoothing=...)``, ``clip_grad_norm_`` and, stepped after every
optimiser step, the scheduler of :func:`torch_scheduler`. Our side: the registered model,
its variables converted from the PyTorch state dict (``attention_flax.convert``), and
``train.steps.train_step`` with ``train.optim``'s schedule and optimiser, jitted.

Resync (the default): PyTorch trains freely; before each of its steps our state is set to
its state (parameters and batch-norm statistics through the converter, momentum buffers or
Adam's moments into the optax state's ``trace`` / ``mu`` / ``nu``, step counts), and one
step of ours is compared with PyTorch's: the learning rate, the loss, the parameter update
(new - old; one unit in the last place of the new parameter is forgiven: the parameter's
own rounding), the new buffers and the new batch-norm running mean and variance. An error
is max|ours - theirs| / max|theirs| over one tensor; the report gives the worst tensor of
each kind over all steps, against RESYNC_TOLERANCE. Round-off cannot compound. It can,
rarely, decide a ReLU: an input within float32 round-off of 0 falls on different sides of
0 in the two frameworks, and that element's gradient flows on one side only, which moves
one tensor's gradient by up to a few 1e-2 of its largest entry. A step off by more than
the tolerance is excused when one of PyTorch's ReLU inputs that step lay within TIE_MARGIN
of 0 (:class:`train.parity_torch.ReluTies`); at most MAX_TIE_STEPS steps of a run may be,
so a wrong rule, off at every step, still fails. (Max-pool near-ties are not watched.)

Free-running (``--free``): N steps on each side, compared after the last one (parameters
by their change from the shared start), against TOLERANCE. Both twins run their trunk with
SiLU here: with ReLU one such tie is amplified by the later steps (lr 0.03, random labels)
until the runs part. The attention gates keep their own activations in both modes. Images
are random normal (already normalised), labels random.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import configs
from train import optim
from train.state import TrainState
from train.steps import train_step

# Models with a PyTorch twin: registry name -> (model_kwargs, timm name or None).
MODELS: dict[str, tuple[dict[str, Any], str | None]] = {
    "resnet20": ({}, None),
    "resnet20_torch_like": ({"down": "conv", "zero_init_last": False}, None),
    "seresnet18": ({}, "seresnet18"),
    "cbam_resnet18": ({}, "cbam_resnet18"),
}
# Free-running (SiLU): every difference beyond this fails: float32 round-off (1e-7 a step)
# grown over 20 steps; the worst, 5e-4, in CBAM's one-channel spatial-gate norm.
TOLERANCE = 1e-3
# Resync: one step from the same state, float32 round-off of one forward and backward:
# about 3e-6; up to 2e-4 where Adam divides by a small sqrt(nu) and in CBAM's spatial gate.
RESYNC_TOLERANCE = 1e-3
# A step off by more than RESYNC_TOLERANCE in its gradient is excused as a ReLU tie when
# an input of one of PyTorch's ReLUs lay this close to 0 (relative to that ReLU's largest
# input; train.parity_torch.ReluTies); at most MAX_TIE_STEPS steps of a run may be.
TIE_MARGIN = 3e-7
MAX_TIE_STEPS = 2
FORWARD_KINDS = ("bn_stats",)  # unaffected by which side of 0 a ReLU input falls
STEPS_PER_EPOCH = 5


@dataclasses.dataclass(frozen=True)
class Case:
  """One parity run: a model of :data:`MODELS`, its input, its trunk activation
  ("relu", the models' own, or "silu") and config overrides."""
  model: str
  image_size: int = 16
  batch_size: int = 8
  num_classes: int = 10
  act: str = "relu"
  overrides: tuple[tuple[str, Any], ...] = ()


def _case(model: str, image_size: int, act: str = "relu", **overrides: Any) -> Case:
  return Case(model, image_size, act=act, overrides=tuple(sorted(overrides.items())))


# The standard cases (tests/train/test_step_parity.py resyncs them): every model, the three
# schedules, Nesterov on and off, both weight-decay rules, label smoothing, clipping, AdamW.
# Weight decay 5e-3 makes a wrong decay rule show in every step's update.
CASES: dict[str, Case] = {
    "resnet20_step": _case("resnet20", 16, schedule="step", decay_epochs=(1.6, 3.0),
                           weight_decay=5e-3, weight_decay_on="all"),
    "resnet20_torch_like_cosine_nesterov": _case(
        "resnet20_torch_like", 16, schedule="cosine", nesterov=True, weight_decay=5e-3),
    "seresnet18_warmup_cosine_nesterov": _case(
        "seresnet18", 32, schedule="cosine", warmup_epochs=1.0, nesterov=True,
        weight_decay=5e-3, weight_decay_on="all"),
    "cbam_resnet18_warmup_step": _case(
        "cbam_resnet18", 32, schedule="step", warmup_epochs=1.0, decay_epochs=(2.0, 3.0),
        weight_decay=5e-3, label_smoothing=0.1),
    "resnet20_adamw_cosine": _case(
        "resnet20_torch_like", 16, optimizer="adamw", learning_rate=2e-3, schedule="cosine",
        warmup_epochs=1.0, weight_decay=0.05, weight_decay_on="all", grad_clip_norm=1.0),
}


@dataclasses.dataclass
class Report:
  """The worst relative error of each kind of tensor (free: after the run; resync: over
  its steps, the path prefixed with "step k:"), and its tensor."""
  name: str
  steps: int
  lr_error: float  # max |lr_ours - lr_torch| / peak learning rate, over every step
  loss_error: float  # max relative loss difference over every step
  errors: dict[str, tuple[float, str]]  # kind -> (worst error, tensor path)
  losses: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (ours, torch)
  mode: str = "free"  # or "resync": every step from PyTorch's state
  # resync: the excused steps (a gradient off by more than RESYNC_TOLERANCE with a ReLU
  # input within TIE_MARGIN of 0), their gradient-side errors, every step's ReLU margin.
  tie_steps: list[int] = dataclasses.field(default_factory=list)
  tie_errors: dict[str, tuple[float, str]] = dataclasses.field(default_factory=dict)
  margins: list[float] = dataclasses.field(default_factory=list)

  def worst(self) -> float:
    return max([self.lr_error, self.loss_error] + [e for e, _ in self.errors.values()])

  def ok(self, tolerance: float | None = None) -> bool:
    if self.mode == "free":
      return self.worst() <= (TOLERANCE if tolerance is None else tolerance)
    return (self.worst() <= (RESYNC_TOLERANCE if tolerance is None else tolerance)
            and len(self.tie_steps) <= MAX_TIE_STEPS)

  def line(self) -> str:
    kinds = "  ".join(f"{kind} {err:.1e}" for kind, (err, _) in self.errors.items())
    ties = f"  ties at {self.tie_steps}" if self.tie_steps else ""
    return (f"{self.name:36s} {self.mode:6s} {self.steps:3d} steps  lr {self.lr_error:.1e}  "
            f"loss {self.loss_error:.1e}  {kinds}{ties}")


def make_config(case: Case, steps: int) -> ml_collections.ConfigDict:
  """base_config with the PyTorch-like defaults of a parity run and the case's overrides."""
  config = configs.base_config()
  config.model = case.model
  config.batch_size = case.batch_size
  config.num_train_steps = steps
  # 0.03 for batches of 8 (0.1 at batch 128 would scale to 0.006): at 0.1 these nets
  # memorise the random labels chaotically, and round-off grows ~2x a step.
  config.learning_rate = 0.03
  config.momentum = 0.9
  for key, value in case.overrides:
    config[key] = value
  return config


def convert(model_name: str, torch_model: Any, image_size: int, act: str,
            state_dict: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
  """Our model (trunk activation ``act``) and its variables from the PyTorch model's state
  dict (or from ``state_dict``: the same keys holding other tensors, e.g. momentum
  buffers); ``num_classes`` comes from ``fc.weight``."""
  from attention_flax.convert import convert_variables, from_timm
  from attention_flax.models import create_model
  kwargs, timm_name = MODELS[model_name]
  state = torch_model.state_dict() if state_dict is None else state_dict
  if timm_name is not None:
    return from_timm(timm_name, state, act=act)
  base = model_name.removesuffix("_torch_like")
  model = create_model(base, num_classes=int(state["fc.weight"].shape[0]), act=act, **kwargs)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  return model, convert_variables(abstract, state, linear=(("fc",),),
                                  what=f"our {model_name!r}")


def _flat(tree: Any) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in leaves}


def worst_error(ours: Any, theirs: Any, slack: Any = None) -> tuple[float, str]:
  """max|a - b| / max|b| of the worst tensor of two trees of the same structure;
  ``slack`` (a third such tree) is subtracted from |a - b| first."""
  a, b = _flat(ours), _flat(theirs)
  slack = _flat(slack) if slack is not None else dict.fromkeys(a, 0.0)
  if a.keys() != b.keys():
    raise RuntimeError(f"Trees differ: {sorted(a.keys() ^ b.keys())[:4]}")
  worst = (0.0, "")
  for key, value in a.items():
    scale = max(float(np.abs(b[key]).max()), 1e-12)
    diff = np.maximum(np.abs(value - b[key]) - slack[key], 0.0)
    worst = max(worst, (float(diff.max()) / scale, key))
  return worst


def make_batches(case: Case, steps: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``steps`` (images (N, H, W, 3) float32, labels (N,) int32) batches."""
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    images = rng.standard_normal((case.batch_size, case.image_size, case.image_size, 3),
                                 dtype=np.float32)
    yield images, rng.integers(0, case.num_classes, case.batch_size).astype(np.int32)


def run_case(case: Case, steps: int = 20, *, name: str = "", seed: int = 0, resync: bool = False,
             torch_threads: int = 1, torch_config: dict[str, Any] | None = None) -> Report:
  """Trains ``case`` for ``steps`` steps on both sides and compares them (module docstring):
  free-running, or with ``resync`` every step starting from PyTorch's state.

  ``torch_config``: config keys that differ on the PyTorch side only (to see a mismatch).
  """
  from train import parity_torch as pt  # imports torch; its error names the extra
  torch = pt.torch
  config = make_config(case, steps)
  torch.manual_seed(seed)
  torch_model = pt.build_torch_model(case.model, case.num_classes, case.act)
  model, variables = convert(case.model, torch_model, case.image_size, case.act)
  schedule = optim.make_schedule(config, STEPS_PER_EPOCH)
  state = TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=optim.make_optimizer(config, schedule),
      batch_stats=variables["batch_stats"], rng=jax.random.PRNGKey(seed), schedule=schedule,
      label_smoothing=float(config.label_smoothing))
  state = state.replace(step=jnp.zeros((), jnp.int32))
  step_fn = jax.jit(train_step)
  theirs = config.copy_and_resolve_references()
  theirs.update(torch_config or {})
  opt = pt.torch_optimizer(torch_model, theirs)
  sched = pt.torch_scheduler(opt, theirs, STEPS_PER_EPOCH)
  twin = _Twin(case, config, torch_model, opt)
  peak, lr_error, loss_error, losses = float(config.learning_rate), 0.0, 0.0, []
  errors: dict[str, tuple[float, str]] = {}
  with _torch_threads(torch, torch_threads), jax.default_matmul_precision("highest"):
    torch_model.train()
    before = twin.variables() if resync else None
    ties, tie_steps, tie_errors, margins = pt.ReluTies(torch_model), [], {}, []
    for step, (images, labels) in enumerate(make_batches(case, steps, seed)):
      if resync:
        state = twin.our_state(state, step, before)
      ties.reset()
      torch_lr, torch_loss = pt.torch_train_step(torch_model, opt, sched, images, labels,
                                                 theirs)
      new, metrics = step_fn(state, {"image": jnp.asarray(images),
                                     "label": jnp.asarray(labels)}, state.rng)
      lr_error = max(lr_error, abs(float(metrics["learning_rate"]) - torch_lr) / peak)
      losses.append((float(metrics["loss"]), torch_loss))
      loss_error = max(loss_error, abs(losses[-1][0] - torch_loss) / abs(torch_loss))
      if resync:
        after = twin.variables()
        margins.append(ties.margin)
        found = twin.errors(new, state.params, after, before["params"])
        if not float(metrics["learning_rate"]):  # warm-up's step 0: ours moves by 0,
          del found["update"]  # PyTorch's by 1e-8 of a step (WARMUP_START_FACTOR)
        tie = ties.margin < TIE_MARGIN and any(
            e > RESYNC_TOLERANCE for k, (e, _) in found.items() if k not in FORWARD_KINDS)
        tie_steps += [step] * tie
        for kind, error in found.items():
          into = tie_errors if tie and kind not in FORWARD_KINDS else errors
          into[kind] = max(into.get(kind, (0.0, "")), (error[0], f"step {step}: {error[1]}"))
        before = after
      state = new
  if not resync:
    errors = twin.errors(state, variables["params"], twin.variables(), variables["params"])
  return Report(name or case.model, steps, lr_error, loss_error, errors, losses,
                "resync" if resync else "free", tie_steps, tie_errors, margins)


class _Twin:
  """Reads the PyTorch side's state as our trees: variables, optimiser buffers."""

  def __init__(self, case: Case, config: ml_collections.ConfigDict, torch_model: Any,
               opt: Any):
    self.case, self.torch_model, self.opt = case, torch_model, opt
    if config.optimizer == "sgd":  # our optax state's field -> PyTorch's buffer
      self.buffers = {"momentum": ("trace", "momentum_buffer")} if config.momentum else {}
    else:
      self.buffers = {"adam_mu": ("mu", "exp_avg"), "adam_nu": ("nu", "exp_avg_sq")}

  def variables(self) -> dict[str, Any]:
    """{"params", "batch_stats"} and one params-like tree per optimiser buffer kind."""
    from train import parity_torch as pt
    case, torch_model = self.case, self.torch_model
    out = dict(convert(case.model, torch_model, case.image_size, case.act)[1])
    stats = {k: v for k, v in torch_model.state_dict().items() if "running_" in k}
    for kind, (_, torch_name) in self.buffers.items():
      state_dict = {**pt.torch_buffers(torch_model, self.opt, torch_name), **stats}
      out[kind] = convert(case.model, torch_model, case.image_size, case.act,
                          state_dict)[1]["params"]
    return out

  def our_state(self, state: TrainState, step: int, theirs: dict[str, Any]) -> TrainState:
    """``state`` holding PyTorch's parameters, statistics and buffers before ``step``."""
    f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    buffers = {ours: f32(theirs[kind]) for kind, (ours, _) in self.buffers.items()}
    count = jnp.asarray(step, jnp.int32)
    return state.replace(step=count, params=f32(theirs["params"]),
                         batch_stats=f32(theirs["batch_stats"]),
                         opt_state=optax.tree.set(state.opt_state, count=count, **buffers))

  def errors(self, state: TrainState, start: Any, theirs: dict[str, Any], their_start: Any
             ) -> dict[str, tuple[float, str]]:
    """Worst errors of ``state`` against PyTorch's ``theirs``; parameters compared by their
    change from ``start`` (ours) and ``their_start`` (the training's part of them)."""
    # One unit in the last place of the new parameter is its own rounding, not the update's.
    ulp = jax.tree.map(lambda p: np.spacing(np.abs(np.asarray(p, np.float32))), theirs["params"])
    sub = lambda a, b: np.asarray(a) - np.asarray(b)  # numpy: no compile per shape
    errors = {"update": worst_error(jax.tree.map(sub, state.params, start),
                                    jax.tree.map(sub, theirs["params"], their_start), ulp),
              "bn_stats": worst_error(state.batch_stats, theirs["batch_stats"])}
    for kind, (ours, _) in self.buffers.items():
      errors[kind] = worst_error(optax.tree.get(state.opt_state, ours), theirs[kind])
    return errors


@contextlib.contextmanager
def _torch_threads(torch: Any, threads: int) -> Iterator[None]:
  before = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    yield
  finally:
    torch.set_num_threads(before)


def _parse(argv: list[str]) -> argparse.Namespace:
  paragraphs = __doc__.split("\n\n")
  p = argparse.ArgumentParser(
      prog="python -m train.parity", description=" ".join(paragraphs[0].split()),
      epilog="\n\n".join(paragraphs[3:] + [
          f"RESYNC_TOLERANCE = {RESYNC_TOLERANCE:g}, TIE_MARGIN = {TIE_MARGIN:g}, "
          f"MAX_TIE_STEPS = {MAX_TIE_STEPS}, TOLERANCE = {TOLERANCE:g}."]),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--case", default="", help=f"one of {', '.join(CASES)} (default: all)")
  p.add_argument("--model", choices=sorted(MODELS), help="a custom case instead of --case")
  p.add_argument("--optimizer", choices=optim.OPTIMIZERS, default="sgd")
  p.add_argument("--schedule", choices=optim.SCHEDULES, default="step")
  p.add_argument("--warmup_epochs", type=float, default=0.0,
                 help=f"warm-up length in epochs of {STEPS_PER_EPOCH} steps")
  p.add_argument("--nesterov", action="store_true")
  p.add_argument("--free", action="store_true",
                 help="free-running: N steps on each side, compared at the end "
                      "(default: resync, every step from PyTorch's state)")
  p.add_argument("--act", choices=("silu", "relu"), default=None,
                 help="trunk activation of both twins (default: relu, silu with --free)")
  p.add_argument("--weight_decay", type=float, default=5e-3)
  p.add_argument("--weight_decay_on", choices=optim.DECAY_ON, default="kernels")
  p.add_argument("--learning_rate", type=float, default=None, help="default: 0.03 (SGD)")
  p.add_argument("--image_size", type=int, default=None, help="default: 16 CIFAR, 32 else")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  """Runs the cases, prints one line each; exit status 1 when one fails (Report.ok)."""
  args = _parse(sys.argv[1:] if argv is None else argv)
  if args.model:
    overrides = {k: getattr(args, k) for k in (
        "optimizer", "schedule", "warmup_epochs", "nesterov", "weight_decay",
        "weight_decay_on")}
    overrides["decay_epochs"] = (2.0, 3.0)
    if args.learning_rate is not None:
      overrides["learning_rate"] = args.learning_rate
    size = args.image_size or (16 if args.model.startswith("resnet20") else 32)
    cases = {args.model: _case(args.model, size, **overrides)}
  elif args.case:
    if args.case not in CASES:
      raise SystemExit(f"error: unknown case {args.case!r}; choose one of {', '.join(CASES)}.")
    cases = {args.case: CASES[args.case]}
  else:
    cases = CASES
  act = args.act or ("silu" if args.free else "relu")
  failed = 0
  for name, case in cases.items():
    report = run_case(dataclasses.replace(case, act=act), args.steps, name=name,
                      resync=not args.free, torch_threads=args.threads)
    print(report.line() + ("" if report.ok() else "  FAIL"), flush=True)
    failed += not report.ok()
  tolerance = TOLERANCE if args.free else RESYNC_TOLERANCE
  print(f"{len(cases) - failed}/{len(cases)} within {tolerance:.0e} of PyTorch")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
