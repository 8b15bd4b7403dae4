"""Tests of ``python -m train.bench`` on tiny models (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest

from train import bench

TINY = ["--models=test_resnet_tiny_se", "--batch=2", "--warmup=1", "--repeats=2"]
MODEL_FIELDS = ("model", "step_time_median_s", "step_time_min_s", "step_time_max_s",
                "images_per_second", "compile_time_s", "peak_memory_bytes",
                "peak_memory_source", "overhead_vs_backbone", "xla_memory_bytes", "params")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  rc = bench.main([*TINY, "--sampler", "--sampler_shapes=2,6,5,3", "--pipeline",
                   "--pipeline_batches=2", f"--out={out}"])
  return rc, json.loads(out.read_text())


def test_backbone_mapping():
  assert bench.backbone_of("seresnet50") == "resnet50"
  assert bench.backbone_of("cbam_resnet50") == "resnet50"
  assert bench.backbone_of("gcresnet50") == "resnet50"
  assert bench.backbone_of("sa_resnet50") == "resnet50"
  assert bench.backbone_of("ecaresnet50d") == "resnet50d"
  assert bench.backbone_of("se_resnet20") == "resnet20"
  assert bench.backbone_of("cbam_resnet18") == "resnet18"
  assert bench.backbone_of("test_resnet_tiny_cbam") == "test_resnet_tiny"
  for plain in ("resnet50", "resnet50d", "resnet20", "attention56", "test_resnet_tiny"):
    assert bench.backbone_of(plain) is None


def test_json_rows_and_fields(tiny_run):
  rc, rows = tiny_run
  assert rc == 0
  assert [r["kind"] for r in rows] == ["environment", "model", "model", "sampler", "pipeline"]
  env = rows[0]
  assert env["backend"] == "cpu" and env["cpu_count"] >= 1 and env["jax_version"]
  assert env["torch_version"] is None and env["batch"] == 2 and env["repeats"] == 2
  # The backbone is added ahead of the attention model that needs it.
  base, se = rows[1], rows[2]
  assert (base["model"], se["model"]) == ("test_resnet_tiny", "test_resnet_tiny_se")
  for row in (base, se):
    for key in MODEL_FIELDS:
      assert key in row, key
    assert row["step_time_min_s"] <= row["step_time_median_s"] <= row["step_time_max_s"]
    assert math.isclose(row["images_per_second"], 2 / row["step_time_median_s"])
    assert row["compile_time_s"] > 0 and row["peak_memory_bytes"] > 0
    assert row["peak_memory_source"] in ("device_peak_bytes_in_use", "process_peak_rss")
    assert row["image_shape"] == [32, 32, 3] and row["num_classes"] == 10
  assert base["overhead_vs_backbone"] is None and base["backbone"] is None
  assert se["backbone"] == "test_resnet_tiny"
  assert math.isclose(se["overhead_vs_backbone"],
                      se["step_time_median_s"] / base["step_time_median_s"])
  # SE adds two 1x1 convolutions with biases per block.
  assert se["params"] > base["params"]


def test_environment_names_the_compiler_options(tiny_run):
  # On CPU every step compiles with the trainer's options; --xla_defaults drops them.
  from attention_flax import conv
  _, rows = tiny_run
  assert rows[0]["compiler_options"] == conv.cpu_compiler_options() != {}
  assert bench.compiler_options(xla_defaults=True) == {}


def test_tiny_param_count_by_hand(tiny_run):
  _, rows = tiny_run
  # test_resnet_tiny: classic 7x7 stem to 8 channels, a BasicBlock of 8, a BasicBlock of 16
  # with a 1x1 projection, fc to 10 classes; BN has scale and bias.
  stem = 7 * 7 * 3 * 8 + 2 * 8
  block1 = 2 * (3 * 3 * 8 * 8 + 2 * 8)
  block2 = 3 * 3 * 8 * 16 + 2 * 16 + 3 * 3 * 16 * 16 + 2 * 16 + 8 * 16 + 2 * 16
  fc = 16 * 10 + 10
  assert rows[1]["params"] == stem + block1 + block2 + fc


def test_sampler_and_pipeline_rows(tiny_run):
  _, rows = tiny_run
  sampler, pipeline = rows[3], rows[4]
  assert sampler["shape"] == [2, 6, 5, 3] and sampler["model"] == "grid_sample"
  assert sampler["step_time_min_s"] <= sampler["step_time_median_s"]
  assert pipeline["data"] == "digits" and pipeline["image_shape"] == [32, 32, 3]
  assert pipeline["workers"] == 0 and pipeline["image_dtype"] == "float32"
  fastest = max(rows[1:3], key=lambda r: r["images_per_second"])
  assert pipeline["model"] == fastest["model"]
  assert math.isclose(pipeline["ratio_vs_model"],
                      pipeline["images_per_second"] / fastest["images_per_second"])


def test_markdown_lists_every_model(tiny_run):
  _, rows = tiny_run
  text = bench.markdown(rows)
  assert "| test_resnet_tiny | 2 | 32x32x3 |" in text
  assert "| test_resnet_tiny_se | 2 | 32x32x3 |" in text
  assert "(2, 6, 5, 3)" in text and "Input pipeline (digits" in text


def test_unknown_model_is_a_clear_error(capsys):
  assert bench.main(["--models=resnet5O", "--repeats=1"]) != 0
  err = capsys.readouterr().err
  assert "Unknown model 'resnet5O'" in err and "list_models()" in err


def test_folds_gate_names_the_se_and_eca_resnets():
  for name in ("seresnet50", "ecaresnet50d", "se_resnet20", "test_resnet_tiny_se"):
    assert bench.folds_gate(name), name
  for name in ("resnet50", "cbam_resnet50", "gcresnet50", "attention56", "test_resnet_tiny"):
    assert not bench.folds_gate(name), name


def test_unfolded_adds_a_layer_by_layer_row(tmp_path):
  out = tmp_path / "unfolded.json"
  rc = bench.main(["--models=test_resnet_tiny_se", "--batch=2", "--warmup=0", "--repeats=1",
                   "--unfolded", f"--out={out}"])
  assert rc == 0
  rows = [r for r in json.loads(out.read_text()) if r["kind"] == "model"]
  assert [(r["model"], r["model_kwargs"]) for r in rows] == [
      ("test_resnet_tiny", {}), ("test_resnet_tiny_se", {}),
      ("test_resnet_tiny_se", {"fold_gate": False})]
  base = rows[0]["step_time_median_s"]
  for row in rows[1:]:
    assert row["backbone"] == "test_resnet_tiny"
    assert math.isclose(row["overhead_vs_backbone"], row["step_time_median_s"] / base)


def test_bad_flags_are_clear_errors(capsys):
  assert bench.main(["--models=test_resnet_tiny", "--batch=0"]) != 0
  assert "--batch must be >= 1" in capsys.readouterr().err
  assert bench.main(["--models=test_resnet_tiny", "--pipeline", "--data=imagenet"]) != 0
  assert "--data" in capsys.readouterr().err
  assert bench.main(["--models=test_resnet_tiny", "--convs", "--conv_shapes=2,6,3"]) != 0
  assert "N,H,C_in,C_out,kernel,stride" in capsys.readouterr().err
  assert bench.main(["--models=test_resnet_tiny", "--pipeline", "--pipeline_workers=-1"]) != 0
  assert "--pipeline_workers must be >= 0" in capsys.readouterr().err


def test_pipeline_with_worker_processes():
  row = bench.bench_pipeline("digits", batch=4, image_shape=(16, 16, 3), warmup=1, batches=2,
                             model_row=None, workers=1)
  assert row["workers"] == 1 and row["images_per_second"] > 0
  # The worker's buffered batch and the prefetch are read before the clock starts.
  assert row["warmup_batches"] == 1 + 1 + 4 and row["batches"] == 2
  assert row["model"] is None and row["ratio_vs_model"] is None
  assert row["image_dtype"] == "float32"  # the embedded digits are float images


def test_pipeline_of_uint8_images_stays_uint8():
  row = bench.bench_pipeline("cifar10_mock", batch=4, image_shape=(16, 16, 3), warmup=1,
                             batches=2, model_row=None)
  assert row["image_dtype"] == "uint8" and row["images_per_second"] > 0


def test_against_torch_tiny(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  out = tmp_path / "torch.json"
  rc = bench.main([*TINY, "--against=torch", "--sampler", "--sampler_shapes=2,4,4,1",
                   "--convs", "--conv_shapes=2,6,3,4,3,2;2,6,2,1,3,1", f"--out={out}"])
  assert rc == 0
  rows = json.loads(out.read_text())
  assert rows[0]["torch_version"] and rows[0]["torch_threads"] >= 1
  for row in rows[1:3]:
    assert row["torch_model"] and row["torch_note"] is None
    assert row["torch_step_time_min_s"] <= row["torch_step_time_median_s"]
    assert math.isclose(row["throughput_ratio_vs_torch"],
                        row["torch_step_time_median_s"] / row["step_time_median_s"])
  sampler = rows[3]
  assert math.isclose(sampler["throughput_ratio_vs_torch"],
                      sampler["torch_step_time_median_s"] / sampler["step_time_median_s"])
  conv, spatial = rows[4:6]
  assert conv["kind"] == "conv" and conv["shape"] == [2, 6, 6, 3, 4, 3, 2]
  # A small strided 3x3 layer keeps XLA's kernel gradient; a CBAM-like 2 -> 1 map takes
  # the banded convolution.
  assert conv["route"] == "xla" and spatial["route"] == "banded"
  # 2 images x 3x3 outputs x 3x3x3 taps x 4 filters x 2 FLOPs.
  assert math.isclose(conv["gflop"], 2 * 9 * 27 * 4 * 2 / 1e9)
  assert math.isclose(conv["speedup_vs_lax"], conv["lax_step_s"] / conv["ours_step_s"])
  assert math.isclose(conv["throughput_ratio_vs_torch"],
                      conv["torch_step_s"] / conv["ours_step_s"])
  assert "| (2, 6, 6, 3, 4, 3, 2) | xla | 0.000 |" in bench.markdown(rows)
  assert "| (2, 6, 6, 2, 1, 3, 1) | banded | 0.000 |" in bench.markdown(rows)


def test_torch_twin_has_the_same_parameter_count():
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from attention_flax import models
  import jax
  for name in ("test_resnet_tiny", "test_resnet_tiny_se", "test_resnet_cifar_tiny"):
    module, _ = bench.torch_model(name, 10, 3)
    theirs = sum(p.numel() for p in module.parameters())
    entry = models.model_info(name)
    shape = (1, entry.input_size, entry.input_size, 3)
    variables = jax.eval_shape(models.create_model(name, num_classes=10).init,
                               jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, "float32"))
    assert models.count_params(variables) == theirs, name
    assert isinstance(module, torch.nn.Module)
