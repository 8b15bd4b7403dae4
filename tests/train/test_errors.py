"""User errors are one line: ``python -m train`` (subprocesses, a few representative cases)
and ``python -m train.visualize`` print one ``error: <cause; fix>`` line and exit 2, with
the traceback only under --debug; negative counts and learning rates, empty class folders,
permission and disk-full causes, and the weight loader's file messages (in process)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from configs import default as default_config
from train import checkpoint as ckpt_lib
from train import datasets, errors, trainer, visualize
from train import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args, module="train"):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.pop(errors.DEBUG_ENV, None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def one_error_line(done) -> str:
  """The single output line of a failed command (stdout and stderr together)."""
  lines = (done.stdout + done.stderr).strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1, (done.returncode, lines[-30:])
  assert lines[0].startswith("error: ")
  return lines[0]


# ------------------------------------------------------------ the command line


def test_string_for_an_integer_key(tmp_path):
  line = one_error_line(cli("--config.batch_size=abc", f"--workdir={tmp_path}"))
  assert line == ("error: --config.batch_size=abc is not an integer; config.batch_size "
                  "takes an integer.")


def test_missing_config_file_lists_the_configs(tmp_path):
  line = one_error_line(cli(f"--config={tmp_path / 'nope.py'}"))
  assert line.startswith(f"error: config file '{tmp_path / 'nope.py'}' not found; give "
                         "--config=FILE[:smoke] with an existing file, e.g. one of configs/: ")
  assert "default.py" in line and "cifar10_resnet20.py" in line


def test_syntax_error_in_a_config_file_and_debug(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\n\ndef get_config(:\n  pass\n")
  line = one_error_line(cli(f"--config={bad}"))
  assert line == f"error: syntax error in {bad} line 3: invalid syntax; fix that file."
  done = cli(f"--config={bad}", "--debug")  # the traceback, then the same line
  assert done.returncode == 2 and "Traceback (most recent call last)" in done.stderr
  assert done.stderr.strip().splitlines()[-1] == line


def test_misspelt_smoke_argument():
  line = one_error_line(cli("--config=configs/default.py:smok"))
  assert line == ("error: Unknown config argument 'smok'; use one of smoke "
                  "(e.g. --config=configs/default.py:smoke) or none.")


def test_unknown_flag_names_the_close_one():
  line = one_error_line(cli("--workdirr=/tmp/x"))
  assert line.startswith("error: unknown flag --workdirr (did you mean --workdir?); the flags "
                         "are --config=FILE[:smoke], --config.KEY=VALUE, --workdir=DIR")


def test_negative_step_count_and_workdir_that_is_a_file(tmp_path):
  line = one_error_line(cli("--config.num_train_steps=-5", f"--workdir={tmp_path}"))
  assert line == ("error: config.num_train_steps must be >= 0; got -5 (0 trains for "
                  "config.num_epochs).")
  assert not os.listdir(tmp_path)  # refused before anything is written
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  line = one_error_line(cli("--config=configs/default.py:smoke", f"--workdir={a_file}"))
  assert line == (f"error: --workdir={a_file} is a file, not a directory; choose another "
                  "--workdir (or move the file away).")


def test_visualize_errors_are_one_line(tmp_path, capsys):
  for argv, want in [
      (["--num_images=0", f"--workdir={tmp_path}"],
       "error: --num_images must be >= 1; got 0; python -m train.visualize --help lists "
       "the options."),
      (["--bogus"], "error: unrecognized arguments: --bogus; python -m train.visualize "
                    "--help lists the options."),
      ([f"--workdir={tmp_path}"],
       f"error: {tmp_path} is not a training run: it needs config.json and checkpoints/ "
       f"(written by `python -m train --workdir={tmp_path}`)."),
      (["--timm=seresnet18", f"--weights={tmp_path / 'w.safetensors'}", f"--images={tmp_path}"],
       f"error: No weights file at '{tmp_path / 'w.safetensors'}'; download it first (this "
       "library never fetches files)."),
  ]:
    with pytest.raises(SystemExit) as exit_info:
      visualize.cli(argv)
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    assert (out.out + out.err).strip().splitlines() == [want]


def test_visualize_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
  for argv, env in (([f"--workdir={tmp_path}", "--debug"], "0"), ([f"--workdir={tmp_path}"], "1")):
    monkeypatch.setenv(errors.DEBUG_ENV, env)
    with pytest.raises(SystemExit):
      visualize.cli(argv)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith(f"error: {tmp_path} is not a training run")


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("key, value, message", [
    ("num_train_steps", -5, r"config.num_train_steps must be >= 0; got -5 \(0 trains"),
    ("num_epochs", -1.0, "config.num_epochs must be >= 0; got -1.0"),
    ("warmup_epochs", -0.5, "config.warmup_epochs must be >= 0"),
    ("momentum", -0.9, "config.momentum must be >= 0"),
    ("learning_rate", -0.1, "config.learning_rate must be > 0; got -0.1 .a negative rate"),
    ("learning_rate", 0.0, "config.learning_rate must be > 0; got 0.0"),
    ("learning_rate", float("nan"), "config.learning_rate must be > 0; got nan"),
    ("decay_steps", (10, -3), r"config.decay_steps must hold values >= 0; got \(10, -3\)"),
    ("decay_factor", 0.0, "config.decay_factor must be > 0"),
])
def test_negative_counts_and_rates_are_refused(key, value, message):
  config = default_config.get_config()
  config[key] = value
  with pytest.raises(errors.UserError, match=message):
    trainer.validate_config(config)


def test_empty_class_folder_is_refused(tmp_path):
  for name in ("cat", "dog", "emu"):
    os.makedirs(tmp_path / "train" / name)
  (tmp_path / "train" / "cat" / "1.png").write_bytes(b"")
  (tmp_path / "train" / "emu" / "notes.txt").write_text("not an image")
  with pytest.raises(errors.UserError) as err:
    datasets.folder_classes(str(tmp_path), "train")
  assert str(err.value) == (
      f"Class folders dog, emu of {str(tmp_path / 'train')!r} hold no images "
      f"({', '.join(datasets.IMAGE_EXTENSIONS)}); add images or remove the folder (each "
      "folder is a class).")
  for name in ("dog", "emu"):
    (tmp_path / "train" / name / "1.jpg").write_bytes(b"")
  assert datasets.folder_classes(str(tmp_path), "train") == ["cat", "dog", "emu"]


# --------------------------------------------------- causes found in a chain


def test_permission_and_disk_full_are_named_through_wrappers(tmp_path):
  denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ckpt"))
  try:
    try:
      raise denied
    except OSError as inner:
      raise RuntimeError("orbax: could not save") from inner
  except RuntimeError as wrapped:
    assert errors.user_message(wrapped) == (
        f"no permission to access {tmp_path / 'ckpt'} (Permission denied); fix its "
        "permissions or choose another --workdir.")
    # The checkpointer says the same instead of calling the checkpoint corrupt.
    error = ckpt_lib._read_error(str(tmp_path), wrapped)  # pylint: disable=protected-access
    assert not isinstance(error, ckpt_lib.CorruptCheckpointError)
    assert str(error).startswith(f"No permission to access {tmp_path / 'ckpt'}")
    assert "corrupt" not in str(error)
  full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
  assert errors.user_message(RuntimeError("x")) is None  # a bug: its traceback is shown
  try:
    raise ValueError("save failed") from full
  except ValueError as err:
    assert errors.user_message(err).startswith(
        f"no space left on the device writing {tmp_path / 'x'}; free some space")


def test_workdir_without_write_permission(tmp_path, monkeypatch):
  real_open = os.open

  def refuse(path, *args, **kwargs):
    if str(path).endswith(workdir_lib.LOCK_NAME):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(workdir_lib.os, "open", refuse)  # root may write anywhere
  with pytest.raises(errors.UserError) as err:
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert str(err.value) == (
      f"no permission to write {tmp_path / '.lock'} (Permission denied); give this user "
      f"write access to --workdir={tmp_path} (chmod u+w) or choose another --workdir.")


# ------------------------------------------------------------- weight loader


@pytest.fixture(scope="module")
def resnet18_state():
  timm = pytest.importorskip("timm")
  model = timm.create_model("resnet18", pretrained=False, num_classes=7)
  return model


def test_loader_strips_a_data_parallel_prefix(tmp_path, resnet18_state):
  torch = pytest.importorskip("torch")
  from attention_flax import convert
  wrapped = torch.nn.DataParallel(resnet18_state).state_dict()
  assert all(k.startswith("module.") for k in wrapped)
  path = tmp_path / "dp.pth"
  torch.save(wrapped, path)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, variables = convert.load_pretrained("resnet18", path)
  assert [str(w.message) for w in caught] == [
      "Every state dict key starts with 'module.' (a wrapped model's state dict); the "
      "prefix was removed."]
  np.testing.assert_array_equal(  # fc (O, I) -> Dense kernel (I, O)
      np.asarray(variables["params"]["fc"]["kernel"]),
      resnet18_state.fc.weight.detach().numpy().T)


def test_loader_hints_state_dict_for_a_pickled_module(tmp_path, resnet18_state):
  torch = pytest.importorskip("torch")
  from attention_flax import convert
  path = tmp_path / "whole_model.pth"
  torch.save(resnet18_state, path)  # the module itself, not its state_dict()
  with pytest.raises(ValueError) as err:
    convert.load_pretrained("resnet18", path)
  assert str(err.value) == (
      f"'{path}' is not a state dict: it pickles timm.models.resnet.ResNet, which "
      "torch.load(weights_only=True) refuses to run. If it is a whole model saved with "
      "torch.save(model), save its weights instead: torch.save(model.state_dict(), PATH).")


def test_loader_names_a_truncated_file(tmp_path):
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  from attention_flax import convert
  whole = tmp_path / "whole.safetensors"
  safetensors_torch.save_file({"fc.weight": torch.zeros(4, 8)}, str(whole))
  data = whole.read_bytes()
  for name, suffix, save in (("cut", ".safetensors", None), ("cut", ".pth", torch.save)):
    path = tmp_path / f"{name}{suffix}"
    if save is None:
      path.write_bytes(data[:len(data) // 2])
    else:
      save({"fc.weight": torch.zeros(4, 8)}, path)
      path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError) as err:
      convert.load_pretrained("resnet18", path)
    kind = ".safetensors" if save is None else "a PyTorch file"
    assert str(err.value).startswith(f"Cannot read '{path}' as {kind} (")
    assert str(err.value).endswith("is cut short or not a "
                                   f"{'safetensors' if save is None else 'torch.save'} "
                                   "file; download it again.")
  # A readable file that does not fit names the file too.
  with pytest.raises(ValueError, match=rf"^'{whole}': State dict does not fit"):
    convert.load_pretrained("resnet18", whole)


# ------------------------------------------------- the visualizer's checkpoints


def test_load_state_skips_a_corrupt_newest_checkpoint(tmp_path, capfd):
  from tests.train.test_checkpoint import META, _garble, small_state
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=3, metadata=META)
  ckpt.save(3, small_state())
  ckpt.save(6, small_state())
  ckpt.close()
  _garble(tmp_path / "6" / "state")
  capfd.readouterr()
  step, state = ckpt_lib.load_state(str(tmp_path))  # what train.visualize reads
  assert step == 3
  np.testing.assert_array_equal(state["params"]["conv"]["kernel"],
                                np.arange(12.0).reshape(3, 4))
  warned = [l for l in capfd.readouterr().err.splitlines() if l.startswith("warning:")]
  assert len(warned) == 1 and warned[0].startswith(
      f"warning: Cannot read the checkpoint at {tmp_path / '6'} (")
  assert sorted(os.listdir(tmp_path)) == ["3", "6"]  # reading moves nothing
  _garble(tmp_path / "3" / "state")
  with pytest.raises(ckpt_lib.CorruptCheckpointError,
                     match=f"No readable checkpoint left in {tmp_path}: steps 6, 3 are"):
    ckpt_lib.load_state(str(tmp_path))
