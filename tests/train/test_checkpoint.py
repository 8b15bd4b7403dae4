"""Tests of train/checkpoint.py and resuming: round trips with the data position, refusal
of foreign and corrupt checkpoints, and a run killed with SIGKILL that, restarted, ends
with the parameters of an uninterrupted run (subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default as default_config
from train import checkpoint as ckpt_lib
from train import metrics as metrics_lib
from train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
META = {"model": "a", "num_classes": 10, "image_shape": (8, 8, 1), "fingerprint": "f0",
        "optimizer_fingerprint": "o0"}


def small_state():
  params = {"conv": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4)}}
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  opt_state = tx.update(params, tx.init(params), params)[1]  # a non-zero momentum
  return {"step": jnp.asarray(3, jnp.int32), "params": params, "batch_stats": {},
          "opt_state": opt_state, "rng": jax.random.PRNGKey(7)}


def batches():
  return iter(grain.MapDataset.range(50).seed(0).shuffle().batch(5).to_iter_dataset())


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_state_and_data_position(tmp_path):
  state, it = small_state(), batches()
  for _ in range(3):
    next(it)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, metadata=META)
  ckpt.save(3, state, it)
  expected = [next(it) for _ in range(2)]  # drawn after the save: must not leak into it
  ckpt.close()

  fresh_it = batches()
  zeros = jax.tree.map(jnp.zeros_like, state)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, metadata=META)
  assert ckpt.verify_latest() == 3
  assert_trees_equal(ckpt.restore(zeros, fresh_it), state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh_it), want)


def test_save_copies_before_the_state_is_donated(tmp_path):
  state = small_state()
  expected = jax.device_get(state)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1, metadata=META)
  ckpt.save(3, state)
  bump = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
  jax.block_until_ready(bump(state))  # frees the saved buffers while the write may still run
  ckpt.close()
  assert_trees_equal(ckpt_lib.load_state(str(tmp_path))[1]["params"], expected["params"])


def test_keeps_the_newest_steps_and_ignores_unfinished_saves(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, metadata=META)
  for step in (1, 2, 3):
    ckpt.save(step, small_state())
  ckpt.close()
  # What a save killed half way leaves behind: orbax's temporary folder.
  os.makedirs(tmp_path / "9.orbax-checkpoint-tmp-1700000000" / "state")
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, metadata=META)
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3


@pytest.mark.parametrize("key, value", [("model", "b"), ("image_shape", (16, 16, 1)),
                                        ("optimizer_fingerprint", "o1")])
def test_checkpoint_of_another_run_is_refused(tmp_path, key, value):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1, metadata=META)
  ckpt.save(3, small_state())
  ckpt.close()
  other = ckpt_lib.Checkpointer(str(tmp_path), keep=1, metadata=dict(META, **{key: value}))
  message = rf"belongs to another run \({key}: checkpoint .*this run .*fresh --workdir"
  with pytest.raises(ckpt_lib.CheckpointError, match=message):
    other.verify_latest()
  with pytest.raises(ckpt_lib.CheckpointError, match=message):
    other.restore(small_state())


def _garble(directory):
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")


@pytest.mark.parametrize("damage", ["garble_state", "garble_meta", "drop_state", "empty_step"])
def test_corrupt_checkpoint_names_the_path(tmp_path, damage, capfd):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=3, metadata=META)
  ckpt.save(3, small_state())
  ckpt.close()
  if damage == "garble_state":
    _garble(tmp_path / "3" / "state")
  elif damage == "garble_meta":
    _garble(tmp_path / "3" / "meta")
  elif damage == "drop_state":
    shutil.rmtree(tmp_path / "3" / "state")
  else:
    os.makedirs(tmp_path / "5")
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=3, metadata=META)
  if damage == "empty_step":  # an older readable step remains: it is restored
    assert ckpt.verify_latest() == 3
    assert_trees_equal(ckpt.restore(small_state()), small_state())
    assert sorted(os.listdir(tmp_path)) == ["3", "5.corrupt"] and ckpt.all_steps() == [3]
    step = 5
  else:
    with pytest.raises(ckpt_lib.CorruptCheckpointError,
                       match=rf"No readable checkpoint left in {tmp_path}: steps 3 are "
                             "incomplete or corrupt.*fresh --workdir"):
      ckpt.verify_latest()
      ckpt.restore(small_state())
    assert os.listdir(tmp_path) == ["3"]  # nothing moved or deleted
    step = 3
  warnings = capfd.readouterr().err.strip().splitlines()
  assert warnings[0].startswith(f"warning: Cannot read the checkpoint at {tmp_path / str(step)} ")
  assert warnings[0].endswith("incomplete or corrupt; skipped it, trying the next older "
                              "checkpoint.")


def test_no_checkpoint_to_restore(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1, metadata=META)
  assert ckpt.verify_latest() is None
  with pytest.raises(ckpt_lib.CheckpointError, match="No checkpoint"):
    ckpt.restore(small_state())


def test_fingerprints_follow_architecture_and_optimiser_layout():
  def meta(**overrides):
    config = default_config.get_config()
    for key, value in overrides.items():
      config[key] = value
    return ckpt_lib.run_metadata(config, 10, (16, 16, 1))

  base = meta()
  assert meta(learning_rate=0.5, num_epochs=99.0, seed=3) == base  # may change on resume
  assert meta(model="resnet20")["fingerprint"] != base["fingerprint"]
  config = default_config.get_config()
  config.model_kwargs.attn = "eca"
  assert ckpt_lib.run_metadata(config, 10, (16, 16, 1))["fingerprint"] != base["fingerprint"]
  assert ckpt_lib.run_metadata(default_config.get_config(), 10, (8, 8, 1)) != base
  for change in ({"optimizer": "adamw"}, {"grad_clip_norm": 1.0}, {"weight_decay": 0.0}):
    assert meta(**change)["optimizer_fingerprint"] != base["optimizer_fingerprint"]


def test_metric_writer_drops_lines_after_the_resumed_step(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    writer.write(step, "train", {"loss": np.float32(1.0 / step)})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "split": "tr')  # a line cut by a kill
  writer = metrics_lib.MetricWriter(str(tmp_path), resume_step=3)
  writer.write(4, "train", {"loss": 0.5})
  writer.close()
  rows = metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.5


# ------------------------------------------------------------------ kill and resume

RUN_FLAGS = ["--config.model=test_resnet_cifar_tiny", "--config.data.image_size=8",
             "--config.batch_size=16", "--config.eval_batch_size=120",
             "--config.num_train_steps=40", "--config.log_every_steps=4",
             "--config.checkpoint_every_steps=4", "--config.keep_checkpoints=2",
             "--config.eval_every_steps=0", "--config.progress_bar=False",
             "--config.plot_curves=False",
             # A constant schedule keeps the compiled step independent of the run length, so
             # the runs of test_trainer.py and test_checkpoint.py share the XLA cache.
             "--config.schedule=constant", "--config.learning_rate=0.05",
             "--config.warmup_epochs=0"]


def run_env(cache_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)
  return env


def train_cli(workdir):
  return [sys.executable, "-m", "train", f"--workdir={workdir}", *RUN_FLAGS]


@pytest.fixture(scope="module")
def killed_and_reference(tmp_path_factory):
  env = run_env(tmp_path_factory.getbasetemp() / "jax_cache")
  reference = tmp_path_factory.mktemp("uninterrupted")
  done = subprocess.run(train_cli(reference), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=540)
  assert done.returncode == 0, done.stderr[-3000:]

  killed = tmp_path_factory.mktemp("killed")
  proc = subprocess.Popen(train_cli(killed), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = killed / "checkpoints" / "4"
  deadline = time.time() + 540
  while not first.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
  steps_at_kill = sorted(int(p) for p in os.listdir(killed / "checkpoints") if p.isdigit())
  assert steps_at_kill and steps_at_kill[-1] < 40 and not (killed / "results.json").exists()

  again = subprocess.run(train_cli(killed), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=540)
  assert again.returncode == 0, again.stderr[-3000:]
  return reference, killed, steps_at_kill


def test_killed_run_resumes_to_the_same_parameters(killed_and_reference):
  reference, killed, steps_at_kill = killed_and_reference
  with open(killed / "results.json") as f:
    resumed = json.load(f)
  with open(reference / "results.json") as f:
    uninterrupted = json.load(f)
  assert resumed["resumed_from_step"] == steps_at_kill[-1] >= 4
  assert resumed["steps"] == uninterrupted["steps"] == 40
  step_a, state_a = ckpt_lib.load_state(str(reference / "checkpoints"))
  step_b, state_b = ckpt_lib.load_state(str(killed / "checkpoints"))
  assert step_a == step_b == 40
  for key in ("params", "batch_stats", "opt_state"):
    for x, y in zip(jax.tree.leaves(state_a[key]), jax.tree.leaves(state_b[key])):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-6)
  assert resumed["test_accuracy"] == pytest.approx(uninterrupted["test_accuracy"], abs=1e-9)


def test_killed_run_logs_the_same_losses(killed_and_reference):
  reference, killed, _ = killed_and_reference
  def losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(
        str(workdir / "metrics.jsonl")) if r["split"] == "train"]
  assert [s for s, _ in losses(killed)] == list(range(4, 41, 4))
  np.testing.assert_allclose(losses(killed), losses(reference), rtol=1e-6)


def test_foreign_config_on_a_used_workdir_fails_before_compiling(killed_and_reference):
  _, killed, _ = killed_and_reference
  config = default_config.get_config()
  config.model, config.data.image_size = "test_resnet_tiny", 8
  with pytest.raises(ckpt_lib.CheckpointError,
                     match="model: checkpoint 'test_resnet_cifar_tiny', this run "
                           "'test_resnet_tiny'.*fresh --workdir"):
    trainer.train_and_evaluate(config, str(killed))


_SAVE_ON_TWO_DEVICES = """
import sys
import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P())
state = {"params": {"w": jax.device_put(jnp.arange(6.0).reshape(2, 3), replicated)},
         "step": jax.device_put(jnp.asarray(3), replicated)}
manager = ocp.CheckpointManager(sys.argv[1], options=ocp.CheckpointManagerOptions(create=True))
manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
manager.wait_until_finished()
manager.close()
"""


def test_load_state_reads_a_checkpoint_saved_by_more_devices(tmp_path):
  """A run on two devices (or two processes) is read back on this one-device process."""
  directory = str(tmp_path / "checkpoints")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", _SAVE_ON_TWO_DEVICES, directory], env=env,
                 check=True, capture_output=True, timeout=300)
  step, state = ckpt_lib.load_state(directory)
  assert step == 3
  np.testing.assert_array_equal(state["params"]["w"], np.arange(6.0).reshape(2, 3))
  assert int(state["step"]) == 3
