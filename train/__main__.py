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

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")


def _config_error(err: Exception) -> str:
  """A one-line message for an unknown --config.KEY (ml_collections raises a bare key)."""
  if not isinstance(err, (KeyError, AttributeError)):
    return f"error: {err}"
  text = str(err)
  found = re.search(r"'([^'\\]+)", text)
  key = found.group(1) if found else text
  given = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a]
  hint = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', text)
  return (f"error: unknown config key {key!r} in {' '.join(given) or 'the overrides'}. "
          f"{hint.group(0) + ' ' if hint else ''}The keys are listed in "
          "configs/__init__.py (base_config and data_config).")


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
    return config_flags.DEFINE_config_file(
        "config", os.path.join(_CONFIG_DIR, "default.py"),
        "Experiment config file, optionally with ':arg' (e.g. configs/default.py:smoke).",
        lock_config=True, sys_argv=split_model_kwargs(sys.argv)[0])
  except (KeyError, AttributeError, ValueError) as err:
    sys.exit(_config_error(err))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with unknown --config.KEY overrides reported in one line; the
  model_kwargs overrides are kept for :func:`main`."""
  argv, kwargs = split_model_kwargs(argv)
  _MODEL_KWARGS.update(kwargs)
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as err:
    sys.exit(_config_error(err))


_MODEL_KWARGS: dict[str, Any] = {}  # --config.model_kwargs.KEY=VALUE, set by _parse_flags
_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results "
    "(default: runs/<config name>[_<arg>]).")


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
                               process_id=int(env["JAX_PROCESS_ID"]))
    return True
  if (int(env.get("SLURM_NTASKS", "1")) > 1 or "OMPI_MCA_orte_hnp_uri" in env
      or "," in env.get("TPU_WORKER_HOSTNAMES", "")):
    jax.distributed.initialize()
    return True
  return False


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  initialize_distributed()
  from train import checkpoint, metrics, trainer
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or default_workdir(config_path)
  try:
    config = with_model_kwargs(_CONFIG.value, _MODEL_KWARGS)
  except (ValueError, TypeError) as err:  # A bad key or value: one line, no trace.
    sys.exit(f"error: {err}")
  try:
    results = trainer.train_and_evaluate(config, workdir)
  except (ValueError, TypeError, FileNotFoundError, checkpoint.CheckpointError,
          metrics.NonFiniteLossError) as err:
    # Configuration, data and checkpoint problems: the trace for context, then the
    # message (which says what to change) as the last line.
    traceback.print_exc()
    print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(1)
  print(metrics.format_results(results), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
