"""Command line: ``python -m train --config=configs/<name>.py[:arg] --workdir=DIR``.

  python -m train                                   # configs/default.py into runs/default
  python -m train --config=configs/cifar10_resnet20.py --config.batch_size=256
  python -m train --config=configs/cifar10_resnet20.py:smoke --workdir=/tmp/smoke

``--config.key=value`` overrides any key of the (locked) config; an unknown key stops with
an error naming it. ``--config.model_kwargs.KEY=VALUE`` sets a field of the model
(``--config.model_kwargs.down=conv``); the value parses as a Python literal (ints, floats,
bools, tuples), else as a string, and a KEY that is not a field of ``config.model`` stops
with an error listing its fields. The workdir defaults to ``runs/<config name>[_<arg>]``. A workdir that
holds a checkpoint is resumed. Several hosts: set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM, Open MPI or a Cloud TPU pod)
and start the same command on every host. The last line printed is the test accuracy.

A run holds an exclusive lock on its workdir (``workdir/.lock``, see ``train.workdir``): a
second run on the same workdir stops at once naming the first (pid, host, start time); a
lock left by a killed run is taken over with a warning. A user's problem (a bad flag or
config value, a missing or broken config file, an unusable workdir, missing data, a
checkpoint of another run) ends with one ``error: <cause; fix>`` line and exit status 2;
``--debug`` (or ATTENTION_FLAX_DEBUG=1) prints the traceback before it. A corrupt newest
checkpoint is skipped with a warning and the next older one resumed.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import traceback
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from train import errors

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")


def _config_error(err: Exception) -> str:
  """A one-line message for an unknown --config.KEY (ml_collections raises a bare key)."""
  if not isinstance(err, (KeyError, AttributeError)):
    return errors.one_line(err)
  text = str(err)
  found = re.search(r"'([^'\\]+)", text)
  key = found.group(1) if found else text
  given = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a]
  hint = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', text)
  return (f"unknown config key {key!r} in {' '.join(given) or 'the overrides'}. "
          f"{hint.group(0) + ' ' if hint else ''}The keys are listed in "
          "configs/__init__.py (base_config and data_config).")


def _innermost(err: BaseException) -> BaseException:
  """The first exception of ``err``'s chain (what a config file itself raised)."""
  seen = {id(err)}
  while (err.__cause__ or err.__context__) is not None and id(
      err.__cause__ or err.__context__) not in seen:
    err = err.__cause__ or err.__context__
    seen.add(id(err))
  return err


def flag_error(err: BaseException) -> str:
  """One line for an error of flag parsing or config loading: an unknown flag or key, a
  value of the wrong type, a missing config file or an error inside one."""
  if isinstance(err, (KeyError, AttributeError)):
    return _config_error(err)
  if isinstance(err, flags.UnrecognizedFlagError):
    hint = re.search(r"Did you mean: ([\w.,\s]+?) ?\?", str(err))
    return (f"unknown flag --{err.flagname}"
            + (f" (did you mean --{hint.group(1).strip()}?)" if hint else "")
            + "; the flags are --config=FILE[:smoke], --config.KEY=VALUE, --workdir=DIR and "
            "--debug (--helpfull lists all).")
  root = _innermost(err)
  if isinstance(root, SyntaxError):
    return errors.user_message(root)
  found = re.match(r"flag --(config\.[\w.]+)=(.*?): (.*)", errors.one_line(err))
  if found:  # a --config.KEY=VALUE of the wrong type
    key, value, reason = found.groups()
    for kind, word in (("int()", "an integer"), ("float", "a number")):
      if kind in reason:
        return f"--{key}={value} is not {word}; {key} takes {word}."
    return f"--{key}={value}: {reason}"
  if isinstance(root, (flags.Error, ValueError)):
    return errors.one_line(root)
  return (f"the config file failed to load ({type(root).__name__}: "  # raised by the file
          f"{errors.one_line(root)}); fix it (--debug shows where).")


def _config_path(argv: list[str]) -> str | None:
  """The file of the last --config=FILE[:arg] in ``argv`` (None when not given)."""
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      path = arg.partition("=")[2]
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      path = argv[i + 1]
  return None if path is None else path.partition(":")[0]


def _fail(message: str, err: BaseException | None = None, debug: bool | None = None):
  """Prints ``error: <message>`` (after the traceback with --debug) and exits with 2."""
  if debug is None:
    debug = errors.debug_requested(sys.argv)
  if debug and err is not None:
    traceback.print_exception(err)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_CODE)


_MODEL_KWARG = re.compile(r"^--?config\.model_kwargs\.")


def parse_value(text: str) -> Any:
  """A command-line value as ml_collections parses one of unknown type: a Python literal
  (true / false as bools; lists become tuples, as Flax fields want), else the string."""
  try:
    value = ast.literal_eval(text.capitalize() if text in ("true", "false") else text)
  except (SyntaxError, ValueError):
    return text
  return tuple(value) if isinstance(value, list) else value


def split_model_kwargs(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
  """``argv`` (flag files expanded) without its ``--config.model_kwargs.KEY[=VALUE]`` items,
  and those items as {KEY: value} (a bare KEY is True). config_flags would refuse them:
  model_kwargs is an empty dict in a locked config."""
  rest, kwargs = [], {}
  for arg in flags.FLAGS.read_flags_from_files(argv, force_gnu=False):
    found = _MODEL_KWARG.match(arg)
    if found:
      key, has_value, text = arg[found.end():].partition("=")
      kwargs[key] = parse_value(text) if has_value else True
    else:
      rest.append(arg)
  return rest, kwargs


def with_model_kwargs(config: Any, kwargs: dict[str, Any]) -> Any:
  """``config`` with ``kwargs`` added to config.model_kwargs, after checking that each key
  is a field of config.model (ValueError listing the fields)."""
  if not kwargs:
    return config
  from train import state  # Imports JAX: only once the flags are known to be good.
  state.check_model_kwargs(config.model, kwargs)
  with config.unlocked():
    config.model_kwargs.update(kwargs)
  return config


def _define_config_flag():
  """--config; config_flags loads the file (and default overrides) while defining it."""
  try:
    argv = split_model_kwargs(sys.argv)[0]
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path):
      found = sorted(f for f in os.listdir(_CONFIG_DIR) if f.endswith(".py") and f[0] != "_")
      raise errors.UserError(
          f"config file {path!r} not found; give --config=FILE[:smoke] with an existing "
          f"file, e.g. one of configs/: {', '.join(found)}.")
    return config_flags.DEFINE_config_file(
        "config", os.path.join(_CONFIG_DIR, "default.py"),
        "Experiment config file, optionally with ':arg' (e.g. configs/default.py:smoke).",
        lock_config=True, sys_argv=argv)
  except Exception as err:  # pylint: disable=broad-except
    _fail(flag_error(err), err)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with unknown --config.KEY overrides reported in one line; the
  model_kwargs overrides are kept for :func:`main`."""
  try:
    argv, kwargs = split_model_kwargs(argv)
    _MODEL_KWARGS.update(kwargs)
    return flags.FLAGS(argv)
  except Exception as err:  # pylint: disable=broad-except
    _fail(flag_error(err), err)


_MODEL_KWARGS: dict[str, Any] = {}  # --config.model_kwargs.KEY=VALUE, set by _parse_flags
_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results "
    "(default: runs/<config name>[_<arg>]).")
_DEBUG = flags.DEFINE_bool(
    "debug", False, f"Show the traceback of an error (also {errors.DEBUG_ENV}=1).")


def default_workdir(config_path: str) -> str:
  """runs/<file stem>[_<arg>] for a ``path/name.py[:arg]`` config flag value."""
  path, _, arg = config_path.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{stem}_{arg}" if arg else stem)


def initialize_distributed() -> bool:
  """Joins a multi-process run when the environment describes one; returns whether it did.

  Recognised: JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID (any
  cluster), SLURM with more than one task, Open MPI (OMPI_MCA_orte_hnp_uri), and
  multi-host Cloud TPU (TPU_WORKER_HOSTNAMES with several hosts); the last three let
  ``jax.distributed.initialize()`` read the details. Call before any other JAX use.
  ATTENTION_FLAX_INIT_TIMEOUT, ATTENTION_FLAX_HEARTBEAT_TIMEOUT and
  ATTENTION_FLAX_SHUTDOWN_TIMEOUT (seconds) set how long a process waits for the others
  to join, how long a silent process may go before the others stop with an error (the
  same on every process), and how long a finished one waits for the rest.
  """
  import jax  # Not at the top: flag errors should come back before JAX starts.

  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not; set all three to run "
                       "on several hosts.")
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]), **_timeouts(env))
  elif (int(env.get("SLURM_NTASKS", "1")) > 1 or "OMPI_MCA_orte_hnp_uri" in env
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")):
    jax.distributed.initialize(**_timeouts(env))
  else:
    return False
  sys.excepthook = _exit_on_lost_process(sys.excepthook)
  return True


# Words of the errors JAX raises when another process of the run is gone.
_LOST_PROCESS = ("Gloo", "Connection reset", "Connection closed", "heartbeat", "UNAVAILABLE",
                 "DEADLINE_EXCEEDED", "Barrier failed")


def lost_process_message(err: BaseException) -> str | None:
  """The one-line message for ``err`` when it says that another process of the run
  stopped (a collective or a barrier that lost its peer); None for any other error."""
  import jax

  text = str(err)
  if not isinstance(err, jax.errors.JaxRuntimeError) or not any(
      word in text for word in _LOST_PROCESS):
    return None
  first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
  return (f"another process of this run stopped ({first}); process "
          f"{jax.process_index()} stops too. Look for the first error in the other "
          "processes' output, then start every process again with the same command: the "
          "run resumes from its last checkpoint.")


def _exit_on_lost_process(previous: Any) -> Any:
  """An excepthook printing :func:`lost_process_message` as ``error: ...`` and leaving
  at once: JAX's exit handler would otherwise wait for the lost process and abort with a
  long report. Any other error goes to ``previous``."""
  def hook(kind, err, trace):
    message = lost_process_message(err)
    if message is None or errors.debug_requested(sys.argv):
      previous(kind, err, trace)
    if message is not None:
      print(f"error: {message}", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(1)
  return hook


# Environment variable -> jax.distributed.initialize argument, in seconds.
_TIMEOUTS = {"ATTENTION_FLAX_INIT_TIMEOUT": "initialization_timeout",
             "ATTENTION_FLAX_HEARTBEAT_TIMEOUT": "heartbeat_timeout_seconds",
             "ATTENTION_FLAX_SHUTDOWN_TIMEOUT": "shutdown_timeout_seconds"}


def _timeouts(env: Any) -> dict[str, int]:
  """The timeouts of a multi-process run set in the environment (JAX's defaults: 300 s to
  join, 100 s without heartbeats before a process counts as dead and the others stop,
  300 s waiting for the others at exit)."""
  found = {}
  for name, argument in _TIMEOUTS.items():
    text = env.get(name, "")
    if text:
      if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={text!r} must be a whole number of seconds >= 1; fix or "
                         "unset it.")
      found[argument] = int(text)
  return found


def main(argv: list[str]) -> None:
  """Trains the flags' config; a user's problem ends the process with one ``error:`` line
  and exit status 2 (the traceback too with --debug)."""
  debug = _DEBUG.value or errors.debug_requested()
  try:
    _run(argv)
  except Exception as err:  # pylint: disable=broad-except
    known = (ValueError, TypeError, OSError, KeyError)
    if "train.checkpoint" in sys.modules:
      known += (sys.modules["train.checkpoint"].CheckpointError,
                sys.modules["train.metrics"].NonFiniteLossError)
    errors.exit_with(err, debug, known)


def _run(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}; flags take the "
                           "form --name=value (--config.KEY=VALUE for config keys).")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  initialize_distributed()
  from train import metrics, trainer
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or default_workdir(config_path)
  try:
    config = _CONFIG.value
  except Exception as err:  # pylint: disable=broad-except
    raise errors.UserError(flag_error(err)) from err  # a config that failed to load
  config = with_model_kwargs(config, _MODEL_KWARGS)
  results = trainer.train_and_evaluate(config, workdir)
  print(metrics.format_results(results), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
