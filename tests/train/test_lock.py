"""One workdir, one run: the workdir lock (held, stale after SIGKILL, released, refused to
a second ``python -m train``), a metrics file that keeps every row when a second writer
appears, and a resumed run that skips a corrupt newest checkpoint for the older one and
keeps no more than keep_checkpoints steps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from configs import default as default_config
from train import checkpoint as ckpt_lib
from train import errors, trainer
from train import metrics as metrics_lib
from train import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_held_lock_refuses_a_second_holder_and_names_it(tmp_path):
  first = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  with open(tmp_path / ".lock") as f:
    record = json.load(f)
  assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
  assert record["since"].endswith(" UTC")
  # flock excludes a second open file even in the same process.
  with pytest.raises(errors.UserError) as err:
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert str(err.value) == (
      f"--workdir={tmp_path} is in use by another run (pid {os.getpid()} on host "
      f"{socket.gethostname()} since {record['since']}); wait for it to finish, stop it, or "
      "choose another --workdir.")
  # Another process index of the same run takes its own lock file.
  with workdir_lib.WorkdirLock(str(tmp_path), process_index=1) as other:
    assert other.path.endswith(".lock.1") and os.path.exists(other.path)
  assert not os.path.exists(tmp_path / ".lock.1")
  first.release()
  assert not os.path.exists(tmp_path / ".lock")  # released: the file is gone
  with workdir_lib.WorkdirLock(str(tmp_path)) as again:
    assert again.held and again.stale is None


def test_a_stale_lock_after_sigkill_is_taken_over(tmp_path, capfd):
  code = ("import os, signal, sys\n"
          "from train.workdir import WorkdirLock\n"
          "WorkdirLock(sys.argv[1]).acquire()\n"
          "os.kill(os.getpid(), signal.SIGKILL)\n")
  done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, timeout=60)
  assert done.returncode == -signal.SIGKILL
  with open(tmp_path / ".lock") as f:  # left behind, but nobody holds it
    dead = json.load(f)
  lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert lock.stale == dead and dead["pid"] != os.getpid()
  assert capfd.readouterr().err.strip().splitlines() == [
      f"warning: took over the stale lock of pid {dead['pid']} on host {dead['host']} since "
      f"{dead['since']} on {tmp_path} (that run ended without releasing it)."]
  lock.release()


def test_second_train_on_a_locked_workdir_fails_at_once(tmp_path):
  with workdir_lib.WorkdirLock(str(tmp_path)):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-m", "train", "--config=configs/default.py:smoke",
                           f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert os.listdir(tmp_path) == [".lock"]  # nothing written by the refused run
  lines = (done.stdout + done.stderr).strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1, lines[-20:]
  assert lines[0].startswith(f"error: --workdir={tmp_path} is in use by another run (pid "
                             f"{os.getpid()} on host {socket.gethostname()} since ")


def test_metric_rows_survive_a_second_writer(tmp_path):
  # Two runs on one workdir (what the lock now prevents) used to lose the first run's
  # rows: the second rewrote the file and the first kept appending to the replaced one.
  first = metrics_lib.MetricWriter(str(tmp_path))
  for step in (1, 2):
    first.write(step, "train", {"loss": 1.0})
  second = metrics_lib.MetricWriter(str(tmp_path), resume_step=0)
  for step in (3, 4, 5, 6):
    first.write(step, "train", {"loss": 1.0 / step})
  second.write(1, "train", {"loss": 9.0})
  first.close()
  second.close()
  with open(tmp_path / "metrics.jsonl") as f:
    raw = [json.loads(line) for line in f]
  assert [(r["step"], r["split"]) for r in raw] == [
      (1, "train"), (2, "train"), (0, "resume"), (3, "train"), (4, "train"), (5, "train"),
      (6, "train"), (1, "train")]
  # Read as one run, the marker keeps what the last writer redid from step 0.
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))] == [
      3, 4, 5, 6, 1]


def tiny_config(steps):
  config = default_config.get_config()
  config.model = "test_resnet_cifar_tiny"
  config.data.image_size = 8
  config.batch_size, config.eval_batch_size = 16, 120
  config.num_train_steps, config.warmup_epochs = steps, 0.0
  config.schedule, config.learning_rate = "constant", 0.05
  config.log_every_steps = config.checkpoint_every_steps = 3
  config.keep_checkpoints, config.eval_every_steps = 2, 0
  config.progress_bar = config.plot_curves = config.attention_png = False
  return config


def test_corrupt_newest_checkpoint_falls_back_to_the_older_one(tmp_path, capfd):
  workdir = str(tmp_path / "run")
  first = trainer.train_and_evaluate(tiny_config(6), workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert first["steps"] == 6 and sorted(os.listdir(ckpt_dir)) == ["3", "6"]
  for root, _, files in os.walk(os.path.join(ckpt_dir, "6", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  capfd.readouterr()
  again = trainer.train_and_evaluate(tiny_config(9), workdir)
  warnings = [l for l in capfd.readouterr().err.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 2
  assert warnings[0].startswith(f"warning: Cannot read the checkpoint at {ckpt_dir}/6 (")
  assert warnings[0].endswith("skipped it, trying the next older checkpoint.")
  assert warnings[1] == (f"warning: moved the unreadable checkpoint {ckpt_dir}/6 to "
                         f"{ckpt_dir}/6.corrupt.")
  assert again["resumed_from_step"] == 3 and again["steps"] == 9
  # keep_checkpoints=2 holds after the fallback; the corrupt step is kept aside, not deleted.
  assert sorted(os.listdir(ckpt_dir)) == ["6", "6.corrupt", "9"]
  assert not os.path.exists(os.path.join(workdir, ".lock"))
  rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows if r["split"] == "train"] == [3, 6, 9]
  # With no readable step left the run stops and says so, moving nothing.
  for step in ("6", "9"):
    for root, _, files in os.walk(os.path.join(ckpt_dir, step, "state")):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage")
  with pytest.raises(ckpt_lib.CorruptCheckpointError,
                     match=rf"No readable checkpoint left in {ckpt_dir}: steps 9, 6 are "
                           "incomplete or corrupt"):
    trainer.train_and_evaluate(tiny_config(12), workdir)
  assert sorted(os.listdir(ckpt_dir)) == ["6", "6.corrupt", "9"]
  assert not os.path.exists(os.path.join(workdir, ".lock"))
