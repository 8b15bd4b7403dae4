"""Tests of the command line (train/__main__.py) in subprocesses: config errors exit
non-zero with a message naming the fix, --config.model_kwargs.KEY=VALUE reaches the model
(and an unknown KEY is one line listing the model's fields), and the CIFAR-10 smoke config
trains end to end on tfds mock data and prints the final accuracy line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from attention_flax import models
from train import metrics as metrics_lib
from train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args, cache_dir=None, timeout=540):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_default_workdir_and_cluster_variables():
  # In a subprocess: importing train.__main__ defines absl flags process-wide.
  code = "\n".join([
      "import os",
      "from train.__main__ import _CONFIG_DIR, default_workdir, initialize_distributed",
      "print(default_workdir(os.path.join(_CONFIG_DIR, 'default.py')))",
      "print(default_workdir('configs/cifar10_resnet20.py:smoke'))",
      "print(initialize_distributed())",  # a single process: nothing to join
      "os.environ['JAX_COORDINATOR_ADDRESS'] = 'localhost:1234'",
      "try:",
      "  initialize_distributed()",
      "except ValueError as err:",
      "  print(err)",
  ])
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "SLURM_", "OMPI_", "TPU_WORKER"))}
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=env)
  assert done.stdout.splitlines() == [
      "runs/default", "runs/cifar10_resnet20_smoke", "False",
      "JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES and JAX_PROCESS_ID are not; "
      "set all three to run on several hosts."], done.stderr


def test_unknown_config_key_is_named(tmp_path):
  done = cli("--config=configs/default.py:smoke", "--config.data.image_sise=8",
             f"--workdir={tmp_path}")
  assert done.returncode != 0
  assert done.stderr.strip().splitlines()[-1] == (
      "error: unknown config key 'image_sise' in --config.data.image_sise=8. Did you mean "
      '"image_size" instead of "image_sise"? The keys are listed in configs/__init__.py '
      "(base_config and data_config).")
  assert not os.listdir(tmp_path)


def test_unknown_optimizer_lists_the_choices(tmp_path):
  done = cli("--config=configs/default.py:smoke", "--config.optimizer=rmsprop",
             f"--workdir={tmp_path}")
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "error: Unknown optimizer 'rmsprop'; choose one of: sgd, adamw "
      "(--config.optimizer=...)."]


def test_model_kwargs_values_parse_as_ml_collections_does():
  # In a subprocess: importing train.__main__ defines absl flags process-wide.
  code = "\n".join([
      "from train.__main__ import parse_value, split_model_kwargs",
      "for text in ['3', '-2.5', '1e-3', 'true', 'False', 'None', 'conv', '(8, 16)',",
      "             '[4,8]', '\"7\"', 'a b']:",
      "  print(repr(parse_value(text)))",
      "print(split_model_kwargs(['prog', '--config=c.py', '--config.model_kwargs.down=avg',",
      "                          '--config.batch_size=8', '--config.model_kwargs.zero_init_last']))",
  ])
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert done.stdout.splitlines() == [
      "3", "-2.5", "0.001", "True", "False", "None", "'conv'", "(8, 16)", "(4, 8)", "'7'",
      "'a b'",
      "(['prog', '--config=c.py', '--config.batch_size=8'], "
      "{'down': 'avg', 'zero_init_last': True})"], done.stderr


def test_unknown_model_kwargs_key_lists_the_fields(tmp_path):
  done = cli("--config=configs/default.py:smoke", "--config.model_kwargs.dwon=conv",
             f"--workdir={tmp_path}")
  assert done.returncode != 0
  fields = ", ".join(state_lib.model_fields("se_resnet20"))
  assert done.stderr.strip().splitlines() == [
      "error: Unknown model_kwargs key 'dwon' for model 'se_resnet20'. Did you mean "
      f'"down"? Its keys are: {fields} (--config.model_kwargs.KEY=VALUE).']
  assert "zero_init_last" in fields and "num_classes" not in fields
  assert not os.listdir(tmp_path)


def test_model_kwargs_reach_the_model(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("model_kwargs")
  tiny = "test_resnet_cifar_tiny"
  done = cli("--config=configs/default.py:smoke", f"--config.model={tiny}",
             "--config.data.image_size=8", "--config.model_kwargs.down=conv",
             "--config.model_kwargs.widths=(4,8,8)", "--config.model_kwargs.zero_init_last=false",
             f"--workdir={workdir}", cache_dir=tmp_path_factory.getbasetemp() / "jax_cache")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(workdir / "config.json") as f:
    assert json.load(f)["model_kwargs"] == {"down": "conv", "widths": [4, 8, 8],
                                            "zero_init_last": False}
  with open(workdir / "results.json") as f:
    trained = json.load(f)["num_params"]

  def params(**kwargs):
    model = models.create_model(tiny, num_classes=10, **kwargs)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 8, 8, 1)), train=False))
    return models.count_params(shapes)

  assert trained == params(down="conv", widths=(4, 8, 8), zero_init_last=False)
  assert trained != params()


def test_format_results_lines():
  result = {"model": "stn_cnn", "test_accuracy": 0.98765, "test_top5": 1.0, "steps": 12,
            "images_per_second": 123.45}
  assert metrics_lib.format_results(result) == (
      "test_accuracy=0.9877 (model=stn_cnn, top5=1.0000, steps=12, images/s=123.5)")
  both = dict(result, baseline=dict(result, model="cnn_digits", test_accuracy=0.5))
  first, last = metrics_lib.format_results(both).splitlines()
  assert first.startswith("baseline cnn_digits: test_accuracy=0.5000 (model=cnn_digits")
  assert last.startswith("test_accuracy=0.9877")
  # A run resumed at its last step trains nothing: no rate, and it says why.
  done = dict(result, resumed_from_step=12, images_per_second=0.0)
  assert metrics_lib.format_results(done).endswith(
      "steps=12, images/s=n/a, resumed at the last step)")
  partly = dict(result, resumed_from_step=5)
  assert metrics_lib.format_results(partly).endswith("images/s=123.5)")


def test_cifar10_smoke_runs_on_mock_data(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cifar10_smoke")
  done = cli("--config=configs/cifar10_resnet20.py:smoke", f"--workdir={workdir}",
             cache_dir=tmp_path_factory.getbasetemp() / "jax_cache")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  last = done.stdout.strip().splitlines()[-1]
  assert last.startswith(f"test_accuracy={results['test_accuracy']:.4f} (model=resnet20,")
  assert results["steps"] == 3 and results["eval_examples"] == 16  # mock_data examples
  assert round(results["num_params"] / 1e4) == 27  # He et al. Table 6: 0.27M
  rows = metrics_lib.read_metrics(str(workdir / "metrics.jsonl"))
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
  assert os.path.exists(workdir / "curves.png")
