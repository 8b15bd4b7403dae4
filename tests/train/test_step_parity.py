"""Step parity with PyTorch (train.parity): schedules against torch.optim.lr_scheduler;
N = 20 training steps of ResNet-20 (option A and torch-like), SE-ResNet-18 and
CBAM-ResNet-18 with ReLU (SGD, Nesterov on and off, both weight-decay rules) and one AdamW
run against torch.optim, each step from PyTorch's state (resync); one 20-step free run with
SiLU; and the CIFAR configs' ``:torch_like`` option."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import configs  # noqa: E402
from attention_flax import models  # noqa: E402
from attention_flax.models.resnet import BasicBlock  # noqa: E402
from configs import cifar10_resnet20, cifar10_se_resnet110  # noqa: E402
from train import optim, parity, parity_torch, trainer  # noqa: E402


def _config(**overrides):
  config = configs.base_config()
  config.learning_rate = 0.1
  for key, value in overrides.items():
    config[key] = value
  return config


# Seven steps per epoch, so that epoch boundaries fall between steps (1.5 epochs -> step 10.5
# -> 10 or 11 after rounding) and the warm-up lasts 7 steps.
SCHEDULES = {
    "step": dict(schedule="step", decay_epochs=(1.5, 4.0), decay_factor=0.2),
    "step_by_steps": dict(schedule="step", decay_steps=(9, 30, 30)),
    "cosine": dict(schedule="cosine"),
    "warmup_cosine": dict(schedule="cosine", warmup_epochs=1.0),
    "warmup_step": dict(schedule="step", warmup_epochs=1.0, decay_epochs=(3.0,)),
    "constant": dict(schedule="constant"),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_learning_rate_of_every_step_is_torch_schedulers(name):
  config = _config(num_train_steps=42, **SCHEDULES[name])
  ours = optim.make_schedule(config, 7)
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=config.learning_rate, momentum=0.9)
  sched = parity_torch.torch_scheduler(opt, config, 7)
  theirs = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    for _ in range(config.num_train_steps):
      theirs.append(opt.param_groups[0]["lr"])
      opt.step()
      sched.step()
  ours = np.asarray([float(ours(step)) for step in range(config.num_train_steps)])
  # float32 steps on our side; the warm-up's first rate is 0 here, 1e-8 of the peak there.
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=2e-8)
  assert len(set(np.round(theirs, 6))) > (1 if name != "constant" else 0)


# Free-running with SiLU (ReLU's ties make a long free run chaotic; train.parity's doc).
FREE = ("resnet20_torch_like_cosine_nesterov",)


@pytest.fixture(scope="module")
def reports():
  """Every standard case of train.parity with ReLU, resynced at each of 20 steps, and the
  FREE cases with SiLU, 20 steps free-running (run once for the tests below)."""
  out = {(name, "resync"): parity.run_case(case, 20, name=name, resync=True)
         for name, case in parity.CASES.items()}
  for name in FREE:
    case = dataclasses.replace(parity.CASES[name], act="silu")
    out[name, "free"] = parity.run_case(case, 20, name=name)
  return out


@pytest.mark.parametrize("name,mode", [(n, "resync") for n in sorted(parity.CASES)]
                         + [(n, "free") for n in FREE])
def test_twenty_steps_equal_pytorch(reports, name, mode):
  report = reports[name, mode]
  assert report.mode == mode
  kinds = {"update", "bn_stats"} | (
      {"adam_mu", "adam_nu"} if "adamw" in name else {"momentum"})
  assert set(report.errors) == kinds
  # Training moved: the losses of the 20 batches differ, and they agree step by step.
  losses = np.asarray(report.losses)
  assert losses.shape == (20, 2) and np.ptp(losses[:, 1]) > 0.05
  assert report.lr_error < 1e-6 and report.loss_error < 1e-5
  tolerance = parity.TOLERANCE if mode == "free" else parity.RESYNC_TOLERANCE
  for kind, (error, where) in report.errors.items():
    assert error < tolerance, f"{name}: {kind} off by {error:.2e} at {where}"
  # Resync: a step may be excused only for a ReLU input within round-off of 0, rarely.
  assert len(report.tie_steps) <= parity.MAX_TIE_STEPS, report.tie_steps
  assert all(report.margins[step] < parity.TIE_MARGIN for step in report.tie_steps)
  assert len(report.margins) == (20 if mode == "resync" else 0)
  assert report.ok()


def test_a_different_update_rule_is_caught():
  # The same steps with our side decaying every parameter and PyTorch's only the kernels:
  # biases and norm scales move differently from the first step on.
  case = parity.CASES["resnet20_step"]
  wrong = dataclasses.replace(case, overrides=tuple(
      (k, "kernels" if k == "weight_decay_on" else v) for k, v in case.overrides))
  # More steps than may be excused as ReLU ties: a wrong rule is off at every step.
  report = parity.run_case(wrong, parity.MAX_TIE_STEPS + 2, resync=True,
                           torch_config={"weight_decay_on": "all"})
  found = [report.errors.get("update", (0.0, "")), report.tie_errors.get("update", (0.0, ""))]
  assert max(found)[0] > 10 * parity.RESYNC_TOLERANCE
  assert not report.ok()


def test_weight_decay_on_all_decays_biases_too():
  # PyTorch's SGD rule on a bias: d = g + wd * b = 0.5 + 0.1; b = 1 - 0.1 * 0.6 = 0.94.
  config = _config(schedule="constant", weight_decay=0.1, momentum=0.0,
                   weight_decay_on="all")
  params = {"w": jnp.ones((1, 1)), "b": jnp.ones((1,))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  tx = optim.make_optimizer(config, optim.make_schedule(config, 1))
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose([new["w"][0, 0], new["b"][0]], [0.94, 0.94], rtol=1e-6)
  config.weight_decay_on = "kernels"
  tx = optim.make_optimizer(config, optim.make_schedule(config, 1))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.apply_updates(params, updates)["b"][0], 0.95, rtol=1e-6)


def test_unknown_weight_decay_rule_is_refused():
  config = _config(weight_decay_on="biases")
  with pytest.raises(ValueError, match=r"weight_decay_on.*kernels, all"):
    trainer.validate_config(config)


def _count(name, **kwargs):
  model = models.create_model(name, num_classes=10, **kwargs)
  return models.count_params(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))))


def test_torch_like_configs_build_projection_shortcuts_without_zero_init():
  # Two 1x1 projections + their batch norms: 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
  paper = cifar10_resnet20.get_config()
  torch_like = cifar10_resnet20.get_config("torch_like")
  assert paper.model_kwargs.to_dict() == {}
  assert torch_like.model_kwargs.to_dict() == {"down": "conv", "zero_init_last": False}
  trainer.validate_config(torch_like)  # both are fields of the model
  assert _count("resnet20") == 269_722
  assert _count("resnet20", **torch_like.model_kwargs) == 269_722 + 2_752
  twin = parity_torch.TorchCifarResNet(20, 10, projection=True, zero_init_last=False)
  assert sum(p.numel() for p in twin.parameters()) == 269_722 + 2_752
  # The last batch norm of a block starts at 1 instead of 0 (one block, initialised: the
  # whole net takes long to initialise op by op).
  model = models.create_model("resnet20", num_classes=10, **torch_like.model_kwargs)
  assert (model.down, model.zero_init_last) == ("conv", False)
  block = BasicBlock(16, zero_init_last=model.zero_init_last)
  params = block.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 16)))["params"]
  np.testing.assert_array_equal(params["bn2"]["scale"], np.ones(16))
  se = cifar10_se_resnet110.get_config("torch_like,smoke")
  assert se.num_train_steps == 2
  assert se.model == "se_resnet110"
  assert se.model_kwargs.to_dict() == torch_like.model_kwargs.to_dict()
  with pytest.raises(ValueError, match="torch_like"):
    cifar10_resnet20.get_config("torch-like")
