"""Two processes on one machine, as on two hosts: ``python -m train`` under jax.distributed
(localhost coordinator, gloo CPU collectives, one CPU device each).

They train the default config for a few steps and must end with the parameters, batch
statistics and optimiser state of one process with two devices and the same global batch;
a copy of their run resumed from its middle checkpoint must end there too; and when one
process is killed mid-run, the other must exit non-zero within a minute with one error
line. The runs are subprocesses started once for the module (two rounds of two runs side
by side); the JAX compilation cache of the test session spares the later ones compiling.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, MIDDLE = 6, 3
COMMAND = [sys.executable, "-m", "train", "--config=configs/default.py",
           f"--config.num_train_steps={STEPS}", f"--config.checkpoint_every_steps={MIDDLE}",
           "--config.log_every_steps=1", "--config.progress_bar=False",
           "--config.attention_png=False", "--config.plot_curves=False"]
TIMEOUT = 420  # seconds for a round of runs; one that hangs fails the test, not CI
KILL_DEADLINE = 60  # seconds within which the survivor of a killed peer must exit


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_COORDINATOR_ADDRESS",
                      "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "ATTENTION_FLAX_DEBUG")}
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Run:
  """One ``python -m train`` process writing into ``workdir``; output goes to files."""

  def __init__(self, workdir, *extra: str, name: str = "run", **env: str):
    self.workdir = str(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.log = os.path.join(os.path.dirname(self.workdir), f"{os.path.basename(self.workdir)}"
                            f"_{name}")
    self.out, self.err = open(self.log + ".out", "w"), open(self.log + ".err", "w")
    self.process = subprocess.Popen([*COMMAND, *extra, f"--workdir={self.workdir}"],
                                    cwd=ROOT, env=_env(**env), stdout=self.out,
                                    stderr=self.err)

  def wait(self, timeout: float) -> int:
    try:
      return self.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
      raise
    finally:
      self.out.close()
      self.err.close()

  def stderr(self) -> str:
    with open(self.log + ".err") as f:
      return f.read()


def _two(workdir, *extra: str, **env: str) -> list[Run]:
  """Processes 0 and 1 of one run on a fresh localhost port."""
  address = f"127.0.0.1:{_free_port()}"
  return [Run(workdir, *extra, name=f"process{i}", JAX_COORDINATOR_ADDRESS=address,
              JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), **env) for i in range(2)]


def _one_two_devices(workdir) -> Run:
  return Run(workdir, name="one", XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _finish(runs: list[Run], deadline: float) -> None:
  try:
    codes = [run.wait(max(1.0, deadline - time.monotonic())) for run in runs]
  finally:
    for run in runs:  # a failed peer must not leave the other one running
      if run.process.poll() is None:
        run.process.kill()
        run.process.wait()
  for run, code in zip(runs, codes):
    assert code == 0, f"{run.log} exited {code}:\n{run.stderr()[-3000:]}"


def _state(workdir: str, step: int) -> dict:
  """The saved state of ``step`` as numpy arrays, whatever devices saved it."""
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"), item_handlers={"state": ocp.StandardCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        manager.item_metadata(step)["state"])
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  manager.close()
  return jax.tree.map(np.asarray, state["state"])


def _max_difference(a: dict, b: dict) -> float:
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))
             for x, y in zip(leaves_a, leaves_b))


def _assert_states_close(a: dict, b: dict) -> None:
  # float32 tolerance: the two layouts reduce the same numbers over the same devices.
  for key in ("params", "batch_stats", "opt_state"):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6),
                 a[key], b[key])
  assert int(a["step"]) == int(b["step"])


def _train_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in row.items() if k not in ("time", "images_per_second")}
          for row in rows if row["split"] == "train"]


@pytest.fixture(scope="module")
def first_round(tmp_path_factory):
  """The same run as one process with two devices and as two processes, side by side."""
  base = tmp_path_factory.mktemp("multiprocess")
  start = time.monotonic()
  one, two = _one_two_devices(base / "one"), _two(base / "two")
  _finish([one, *two], start + TIMEOUT)
  return {"one": one.workdir, "two": two[0].workdir, "base": base,
          "seconds": time.monotonic() - start}


@pytest.fixture(scope="module")
def second_round(first_round):
  """Side by side: the two-process run resumed from its middle checkpoint (a copy with the
  last step deleted), and a long two-process run whose process 1 is killed mid-run."""
  base, start = first_round["base"], time.monotonic()
  resumed = str(base / "resumed")
  shutil.copytree(first_round["two"], resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))
  os.remove(os.path.join(resumed, "results.json"))
  resume = _two(resumed)
  # A silent peer counts as dead after 20 s instead of JAX's 100 (the gloo error of the
  # next collective usually comes first).
  killed = _two(base / "killed", "--config.num_train_steps=100000",
                "--config.checkpoint_every_steps=100000", ATTENTION_FLAX_HEARTBEAT_TIMEOUT="20")
  metrics = os.path.join(killed[0].workdir, "metrics.jsonl")

  def logged() -> bool:  # process 0 has logged a second step: it is training
    if not os.path.exists(metrics):
      return False
    with open(metrics) as f:
      return f.read().count("\n") >= 2

  while time.monotonic() < start + TIMEOUT and not logged():
    if any(run.process.poll() is not None for run in killed):
      break
    time.sleep(0.2)
  was_training = logged()
  killed[1].process.kill()
  killed_at = time.monotonic()
  try:
    code = killed[0].wait(KILL_DEADLINE)
    exit_seconds = time.monotonic() - killed_at
  except subprocess.TimeoutExpired:
    code, exit_seconds = None, None
  killed[1].wait(10)
  _finish(resume, start + TIMEOUT)
  return {"resumed": resumed, "logged": was_training, "code": code, "exit_seconds": exit_seconds,
          "stderr": killed[0].stderr(), "seconds": time.monotonic() - start}


def _digits(**kw):
  import configs
  return configs.data_config("digits", image_size=16, channels=1, mean=(0.5,), std=(0.5,),
                             augment={"crop_padding": 2, "flip": True}, **kw)


@pytest.mark.parametrize("count", [2, 3])
def test_global_batches_do_not_depend_on_the_number_of_processes(count):
  from train import data
  config = _digits()
  # 1,437 digits in global batches of 96: 14 per epoch, so 20 batches cross an epoch.
  whole = iter(data.train_dataset(config, batch_size=96, seed=5))
  parts = [iter(data.train_dataset(config, batch_size=96 // count, seed=5, process_index=i,
                                   process_count=count)) for i in range(count)]
  for _ in range(20):
    batch, rows = next(whole), [next(part) for part in parts]
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([r[key] for r in rows]))
  # Eval: the split in order, in global batches of 3 x 50 rows, the last one padded.
  whole = list(data.eval_batches(config, batch_size=150))
  parts = [list(data.eval_batches(config, batch_size=150 // count, process_index=i,
                                  process_count=count)) for i in range(count)]
  assert len(whole) == 3 and [len(p) for p in parts] == [3] * count
  for k, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([p[k][key] for p in parts]))
  assert whole[-1]["mask"].sum() == 360 - 300


def test_two_processes_match_one_process_with_two_devices(first_round):
  one, two = first_round["one"], first_round["two"]
  for workdir, processes in ((one, 1), (two, 2)):
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
    assert (results["devices"], results["processes"], results["steps"]) == (2, processes, STEPS)
  # Each process saved its own data position, the same step of the same global batches.
  data = os.path.join(two, "checkpoints", str(STEPS), "data")
  positions = [json.load(open(os.path.join(data, f"process_{i}-of-2.json"))) for i in range(2)]
  assert positions[0] == positions[1]
  for step in (MIDDLE, STEPS):
    _assert_states_close(_state(one, step), _state(two, step))
  rows_one, rows_two = _train_rows(one), _train_rows(two)
  assert [r["step"] for r in rows_one] == list(range(1, STEPS + 1))
  for a, b in zip(rows_one, rows_two):
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in sorted(a) if k != "split"],
                               [b[k] for k in sorted(b) if k != "split"], rtol=1e-5)


def test_resumed_two_processes_end_where_the_whole_run_did(first_round, second_round):
  resumed = second_round["resumed"]
  with open(os.path.join(resumed, "results.json")) as f:
    results = json.load(f)
  assert (results["resumed_from_step"], results["steps"]) == (MIDDLE, STEPS)
  _assert_states_close(_state(first_round["one"], STEPS), _state(resumed, STEPS))
  assert _max_difference(_state(first_round["two"], STEPS)["params"],
                         _state(resumed, STEPS)["params"]) == 0.0


def test_killed_process_stops_the_other_with_one_error_line(second_round):
  assert second_round["logged"], second_round["stderr"][-3000:]
  assert second_round["code"] is not None, (
      f"process 0 still ran {KILL_DEADLINE} s after process 1 was killed")
  assert second_round["code"] not in (0, -6), second_round["stderr"][-3000:]  # -6: abort
  lines = [line for line in second_round["stderr"].splitlines() if line.strip()]
  assert lines[-1].startswith("error: another process of this run stopped"), lines[-5:]
  assert "Traceback" not in second_round["stderr"]


def test_timeouts_from_the_environment_and_the_lost_process_message():
  # In a subprocess: importing train.__main__ defines absl flags process-wide.
  code = "\n".join([
      "import jax",
      "from train.__main__ import _timeouts, lost_process_message",
      "print(_timeouts({'ATTENTION_FLAX_HEARTBEAT_TIMEOUT': '20',",
      "                 'ATTENTION_FLAX_INIT_TIMEOUT': '', 'OTHER': '1'}))",
      "try:",
      "  _timeouts({'ATTENTION_FLAX_SHUTDOWN_TIMEOUT': '-3'})",
      "except ValueError as err:",
      "  print(err)",
      "print(lost_process_message(ValueError('Gloo')))",
      "print(lost_process_message(jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: memory')))",
      "lost = jax.errors.JaxRuntimeError('UNKNOWN: Gloo all-reduce failed: Connection reset"
      " by peer\\nmore')",
      "print(lost_process_message(lost))",
  ])
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=_env())
  lines = done.stdout.splitlines()
  assert lines[:4] == [
      "{'heartbeat_timeout_seconds': 20}",
      "ATTENTION_FLAX_SHUTDOWN_TIMEOUT='-3' must be a whole number of seconds >= 1; fix or "
      "unset it.", "None", "None"], done.stderr
  assert lines[4].startswith("another process of this run stopped (UNKNOWN: Gloo all-reduce "
                             "failed: Connection reset by peer); process 0 stops too."), lines
  assert len(lines) == 5
