"""Tests of train/visualize.py: a smoke run of the default config, then the CLI in-process
writes decodable PNGs; write_eval_overlay writes one; bad arguments say what to give."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from configs import default as default_config
from train import trainer
from train import visualize


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = default_config.get_config("smoke")
  config.plot_curves = False
  config.attention_png = True
  trainer.train_and_evaluate(config, workdir)
  return workdir


def test_training_writes_an_attention_png_at_evaluation(smoke_run):
  steps = default_config.get_config("smoke").num_train_steps
  w, h = _decodes(os.path.join(smoke_run, "attention", f"step_{steps}.png"))
  assert w > 100 and h > 100


def _decodes(path):
  assert os.path.getsize(path) > 0
  with Image.open(path) as im:
    im.load()
    return im.size


def test_cli_writes_pngs_of_the_run(smoke_run, tmp_path, capsys):
  out = str(tmp_path / "maps")
  assert visualize.main([f"--workdir={smoke_run}", "--num_images=4", f"--out={out}"]) == 0
  names = sorted(os.listdir(out))
  # The default model is an SE-ResNet-20: channel gates and a Grad-CAM of stage 3.
  assert names == ["channel_gates.png", "grad_cam_stage3.png"]
  for name in names:
    w, h = _decodes(os.path.join(out, name))
    assert w > 100 and h > 100
  assert capsys.readouterr().out.split() == [os.path.join(out, n) for n in names]


def test_write_eval_overlay(smoke_run, tmp_path):
  run = visualize.load_run(smoke_run, 3)
  assert run["images"].shape == (3, 16, 16, 1) and run["num_classes"] == 10
  path = visualize.write_eval_overlay(run["model"], run["variables"], run["images"],
                                      str(tmp_path / "eval.png"))
  assert path == str(tmp_path / "eval.png")
  _decodes(path)


def test_bad_arguments(tmp_path):
  with pytest.raises(SystemExit):
    visualize.main([])
  with pytest.raises(FileNotFoundError, match="not a training run"):
    visualize.main([f"--workdir={tmp_path}"])
  with pytest.raises(SystemExit):
    visualize.main(["--timm=seresnet50"])  # needs --weights, --images and --out
  if importlib.util.find_spec("attention_flax.convert") is None:
    with pytest.raises(SystemExit, match="load_pretrained"):
      visualize.load_timm("seresnet50", "w.pth", str(tmp_path))


def test_load_images(tmp_path):
  Image.fromarray(np.full((10, 20, 3), 255, np.uint8)).save(tmp_path / "a.png")
  x = visualize.load_images(str(tmp_path), 8, 3, mean=(0.5,) * 3, std=(0.5,) * 3)
  assert x.shape == (1, 8, 8, 3)
  np.testing.assert_allclose(x, 1.0)
