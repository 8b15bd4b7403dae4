"""compare_with entries (several models, each with its own model_kwargs) and models that
bring their own training loss (RAM's hybrid loss) through the trainer."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_flax import models
from train import metrics as metrics_lib
from train import steps as steps_lib
from train import trainer
from tests.train.test_trainer import tiny_config


def test_parse_compare_with():
  assert trainer.parse_compare_with("") == []
  assert trainer.parse_compare_with(" cnn_digits ") == [("cnn_digits", "cnn_digits", {})]
  got = trainer.parse_compare_with("a:x=1;y=0.5;z=true;w=max, b:flag=False;")
  assert got == [("a:x=1;y=0.5;z=true;w=max", "a", {"x": 1, "y": 0.5, "z": True, "w": "max"}),
                 ("b:flag=False;", "b", {"flag": False})]
  assert isinstance(got[0][2]["x"], int) and isinstance(got[0][2]["z"], bool)
  with pytest.raises(ValueError, match="is not key=value"):
    trainer.parse_compare_with("cnn_digits:kernel_size")
  with pytest.raises(ValueError, match="names no model"):
    trainer.parse_compare_with(":kernel_size=3")


def test_compared_dirs():
  assert trainer.compared_dir("w", "cnn", several=False) == os.path.join("w", "baseline")
  assert trainer.compared_dir("w", "cnn:k=3;a=b c", several=True) == os.path.join(
      "w", "compared", "cnn_k=3_a=b_c")


def test_validate_config_checks_every_entry():
  config = tiny_config(compare_with="cnn_digits_tiny,cnn_digits_tiny:kernel_sise=5")
  with pytest.raises(ValueError, match="kernel_sise.*Did you mean \"kernel_size\""):
    trainer.validate_config(config)
  config = tiny_config(compare_with="cnn_digits_tiny,no_such_model")
  with pytest.raises(ValueError, match="Unknown model 'no_such_model'"):
    trainer.validate_config(config)


def test_format_results_shows_every_compared_model():
  one = {"model": "m", "test_accuracy": 0.5, "test_top5": 0.9, "steps": 3,
         "images_per_second": 10.0}
  results = dict(one, model="ram", compared={"a": dict(one, model="a", test_accuracy=0.25),
                                              "a:k=3": dict(one, model="a")})
  results["baseline"] = results["compared"]["a"]
  lines = metrics_lib.format_results(results).splitlines()
  assert lines[0].startswith("compared a: test_accuracy=0.2500 (model=a,")
  assert lines[1].startswith("compared a:k=3: test_accuracy=0.5000 (model=a,")
  assert lines[2].startswith("test_accuracy=0.5000 (model=ram,")


@pytest.fixture(scope="module")
def ram_run(tmp_path_factory):
  """RAM (its own loss) and two compared CNNs, a few steps each on 24 x 24 digits."""
  workdir = str(tmp_path_factory.mktemp("compare_run"))
  config = tiny_config(model="ram_digits_tiny", eval_every_steps=0, num_train_steps=4,
                       compare_with="cnn_digits_tiny, cnn_digits_tiny:kernel_size=5",
                       optimizer="adamw", learning_rate=1e-3, weight_decay=0.0)
  config.data.image_size = 24
  config.attention_png = True  # the glimpse path is drawn at the end
  return config, workdir, trainer.train_and_evaluate(config, workdir)


def test_several_entries_train_into_their_own_dirs(ram_run):
  config, workdir, results = ram_run
  entries = ["cnn_digits_tiny", "cnn_digits_tiny:kernel_size=5"]
  assert list(results["compared"]) == entries
  assert results["baseline"] is results["compared"]["cnn_digits_tiny"]
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert list(saved["compared"]) == entries and saved["model"] == "ram_digits_tiny"
  kernels = {}
  for entry in entries:
    sub = os.path.join(workdir, "compared", entry.replace(":", "_"))
    with open(os.path.join(sub, "config.json")) as f:
      sub_config = json.load(f)
    assert sub_config["model"] == "cnn_digits_tiny" and sub_config["compare_with"] == ""
    kernels[entry] = sub_config["model_kwargs"].get("kernel_size")
    assert results["compared"][entry]["steps"] == config.num_train_steps
  assert kernels == {"cnn_digits_tiny": None, "cnn_digits_tiny:kernel_size=5": 5}
  assert not os.path.exists(os.path.join(workdir, "baseline"))
  # The two CNNs differ in their kernels: 3 x 3 (the tiny default) and 5 x 5.
  counts = [results["compared"][e]["num_params"] for e in entries]
  assert counts[1] > counts[0]


def test_own_loss_metrics_are_logged_and_glimpses_drawn(ram_run):
  _, workdir, _ = ram_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  train_lines = [m for m in lines if m["split"] == "train"]
  for key in ("cross_entropy", "reinforce", "baseline_loss", "reward", "accuracy"):
    assert all(np.isfinite(m[key]) for m in train_lines), key
  for m in train_lines:  # the loss is the sum of its three terms (means over the same steps)
    np.testing.assert_allclose(m["loss"], m["cross_entropy"] + m["reinforce"]
                               + m["baseline_loss"], rtol=1e-5, atol=1e-6)
    assert m["reward"] == pytest.approx(m["accuracy"])
  assert os.path.isfile(os.path.join(workdir, "attention", "step_4.png"))


def test_train_step_uses_the_models_own_loss():
  model = models.create_model("ram_digits_tiny", num_classes=10)
  config = tiny_config(model="ram_digits_tiny")
  config.data.image_size = 24
  state = trainer.create_train_state(config, model, jax.random.PRNGKey(0), (24, 24, 1))
  assert steps_lib.has_training_loss(state)
  cnn = models.create_model("cnn_digits_tiny", num_classes=10)
  assert not steps_lib.has_training_loss(
      trainer.create_train_state(config, cnn, jax.random.PRNGKey(0), (24, 24, 1)))
  images = np.random.default_rng(0).uniform(0, 1, (4, 24, 24, 1)).astype(np.float32)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray([1, 2, 3, 4], jnp.int32)}
  rng = jax.random.PRNGKey(5)
  new_state, metrics = jax.jit(steps_lib.train_step)(state, batch, rng)
  # The same loss, by the model's own method, with the key the step folds in.
  x = steps_lib.input_images(state, batch)
  loss, aux = model.apply({"params": state.params}, x, batch["label"], method="training_loss",
                          rngs={"dropout": jax.random.fold_in(rng, state.step)})
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["reinforce"]), float(aux["reinforce"]), rtol=1e-4,
                             atol=1e-6)
  assert int(new_state.step) == 1
