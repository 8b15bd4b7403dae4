"""Tests of ``python -m train.bench`` (the ``train.bench`` package) on tiny models (no timing
assertions)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from train.bench import cli, common, models, pipeline, profile, torch_ref

TINY = ["--models=test_resnet_tiny_se", "--batch=2", "--warmup=1", "--repeats=2"]
MODEL_FIELDS = ("model", "step_time_median_s", "step_time_min_s", "step_time_max_s",
                "images_per_second", "compile_time_s", "peak_memory_bytes",
                "peak_memory_source", "overhead_vs_backbone", "xla_memory_bytes", "params")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  rc = cli.main([*TINY, "--sampler", "--sampler_shapes=2,6,5,3", "--pipeline",
                 "--pipeline_batches=2", f"--out={out}"])
  return rc, json.loads(out.read_text())


def test_backbone_mapping():
  assert models.backbone_of("seresnet50") == "resnet50"
  assert models.backbone_of("cbam_resnet50") == "resnet50"
  assert models.backbone_of("gcresnet50") == "resnet50"
  assert models.backbone_of("sa_resnet50") == "resnet50"
  assert models.backbone_of("ecaresnet50d") == "resnet50d"
  assert models.backbone_of("se_resnet20") == "resnet20"
  assert models.backbone_of("cbam_resnet18") == "resnet18"
  assert models.backbone_of("test_resnet_tiny_cbam") == "test_resnet_tiny"
  for plain in ("resnet50", "resnet50d", "resnet20", "attention56", "test_resnet_tiny"):
    assert models.backbone_of(plain) is None


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
  from attention_flax import ops
  _, rows = tiny_run
  assert rows[0]["compiler_options"] == ops.compiler_options() == ops.cpu_compiler_options() != {}
  assert cli.compiler_options(xla_defaults=True) == {}


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
  assert sampler["mode"] == "bilinear"  # the default of --sampler_modes
  assert sampler["step_time_min_s"] <= sampler["step_time_median_s"]
  assert pipeline["data"] == "digits" and pipeline["image_shape"] == [32, 32, 3]
  assert pipeline["workers"] == 0 and pipeline["image_dtype"] == "float32"
  fastest = max(rows[1:3], key=lambda r: r["images_per_second"])
  assert pipeline["model"] == fastest["model"]
  assert math.isclose(pipeline["ratio_vs_model"],
                      pipeline["images_per_second"] / fastest["images_per_second"])


def test_markdown_lists_every_model(tiny_run):
  _, rows = tiny_run
  text = cli.markdown(rows)
  assert "| test_resnet_tiny | 2 | 32x32x3 |" in text
  assert "| test_resnet_tiny_se | 2 | 32x32x3 |" in text
  assert "(2, 6, 5, 3)" in text and "Input pipeline (digits" in text


def test_unknown_model_is_a_clear_error(capsys):
  assert cli.main(["--models=resnet5O", "--repeats=1"]) != 0
  err = capsys.readouterr().err
  assert "Unknown model 'resnet5O'" in err and "list_models()" in err


def test_unknown_sampler_mode_is_a_clear_error(capsys):
  assert cli.main(["--models=test_resnet_tiny", "--sampler", "--sampler_modes=bicubic"]) != 0
  err = capsys.readouterr().err
  assert "--sampler_modes takes bilinear, nearest" in err and "'bicubic'" in err


def test_folds_gate_names_the_se_eca_and_cbam_resnets():
  for name in ("seresnet50", "ecaresnet50d", "se_resnet20", "test_resnet_tiny_se",
               "cbam_resnet50", "cbam_resnet20"):
    assert models.folds_gate(name), name
  for name in ("resnet50", "sa_resnet50", "gcresnet50", "attention56", "test_resnet_tiny"):
    assert not models.folds_gate(name), name


@pytest.mark.parametrize("flag, model, kwargs", [
    ("--unfolded", "test_resnet_tiny_se", {"tail": "attention_flax.models.common.plain_tail"}),
    ("--xla_spatial_conv", "test_resnet_tiny_spatial",
     {"attn_kwargs": {"conv": "flax.linen.linear.Conv"}}),
    ("--gate_float32 --dtype=bfloat16", "test_resnet_tiny_se",
     {"attn_kwargs": {"dtype": "float32"}})])
def test_variant_flags_add_a_row_after_the_model(tmp_path, flag, model, kwargs):
  out = tmp_path / "variant.json"
  rc = cli.main([f"--models={model}", "--batch=2", "--warmup=0", "--repeats=1",
                 *flag.split(), f"--out={out}"])
  assert rc == 0
  rows = [r for r in json.loads(out.read_text()) if r["kind"] == "model"]
  assert [(r["model"], r["model_kwargs"]) for r in rows] == [
      ("test_resnet_tiny", {}), (model, {}), (model, kwargs)]
  assert rows[2]["params"] == rows[1]["params"]  # the same model, computed another way
  base = rows[0]["step_time_median_s"]
  for row in rows[1:]:
    assert row["backbone"] == "test_resnet_tiny"
    assert math.isclose(row["overhead_vs_backbone"], row["step_time_median_s"] / base)


def test_gate_float32_adds_no_row_under_float32(tmp_path):
  out = tmp_path / "f32.json"
  assert cli.main(["--models=test_resnet_tiny_se", "--batch=2", "--warmup=0",
                   "--repeats=1", "--gate_float32", f"--out={out}"]) == 0
  rows = [r for r in json.loads(out.read_text()) if r["kind"] == "model"]
  assert [r["model_kwargs"] for r in rows] == [{}, {}]


def test_gate_float32_kwargs_keep_the_models_attention_fields():
  for name in ("seresnet50", "cbam_resnet50", "ecaresnet50d", "gcresnet50",
               "test_resnet_tiny_coord"):
    assert models.gate_float32_kwargs(name) == {"attn_kwargs": {"dtype": "float32"}}, name
  for name in ("resnet50", "resnet50d", "attention56", "test_resnet_tiny"):
    assert models.gate_float32_kwargs(name) is None, name


def test_gate_float32_variant_computes_the_gates_in_float32():
  """Under bfloat16 the variant's SE layers (folded into the batch norm) take float32
  parameters as they are and return float32 gates; the default's are bfloat16. Both
  gates are the same function of the same parameters, up to bfloat16 rounding."""
  from attention_flax.models import create_model
  kwargs = models.gate_float32_kwargs("test_resnet_tiny_se")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  gates = {}
  for label, extra in (("default", {}), ("float32", kwargs)):
    model = create_model("test_resnet_tiny_se", num_classes=10, dtype=jnp.bfloat16, **extra)
    variables = model.init(jax.random.PRNGKey(1), x)
    variables = {"params": jax.tree.map(lambda p: p + 0.1, variables["params"]),
                 "batch_stats": variables["batch_stats"]}
    _, state = model.apply(variables, x, train=True, mutable=["intermediates", "batch_stats"])
    gates[label] = [g for path, g in jax.tree_util.tree_leaves_with_path(
        state["intermediates"]) if "channel_gate" in jax.tree_util.keystr(path)]
  assert gates["default"] and len(gates["default"]) == len(gates["float32"])
  for low, high in zip(gates["default"], gates["float32"]):
    assert low.dtype == jnp.bfloat16 and high.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low, np.float32), high, atol=2e-2)
    assert not np.array_equal(np.asarray(low, np.float32), np.asarray(high))


def test_spatial_conv_kwargs_name_the_models_with_a_spatial_gate():
  for name in ("cbam_resnet50", "cbam_resnet20", "sa_resnet50", "test_resnet_tiny_spatial"):
    assert models.spatial_conv_kwargs(name) == {"attn_kwargs": {"conv": nn.Conv}}, name
  for name in ("resnet50", "seresnet50", "gcresnet50", "attention56", "test_resnet_tiny_coord"):
    assert models.spatial_conv_kwargs(name) is None, name


def test_profile_sums_the_traced_operations(tmp_path):
  out = tmp_path / "profile.json"
  assert cli.main([*TINY, "--profile", "--profile_steps=2", f"--out={out}"]) == 0
  rows = [r for r in json.loads(out.read_text()) if r["kind"] == "model"]
  assert [r["model"] for r in rows] == ["test_resnet_tiny", "test_resnet_tiny_se"]
  for row in rows:
    p = row["profile"]
    assert p["steps"] == 2 and p["ops"] > 10 and p["busy_s"] > 0
    assert p["idle_s"] is None  # CPU: operations overlap on threads
    assert set(p["by_kind"]) <= set(profile.KINDS) and "convolution" in p["by_kind"]
    assert math.isclose(sum(k["s"] for k in p["by_kind"].values()), p["busy_s"], rel_tol=1e-9)
    assert sum(k["ops"] for k in p["by_kind"].values()) == p["ops"]
    assert [t["s"] for t in p["top"]] == sorted((t["s"] for t in p["top"]), reverse=True)
    assert p["untraced_s"] >= 0
    assert math.isclose(sum(p["untraced_after"].values()), p["untraced_s"], rel_tol=1e-9)
    assert set(p["untraced_after"]) <= set(profile.KINDS)
  # The SE gate's dense layers add matrix products to the backbone's.
  assert (rows[1]["profile"]["by_kind"]["matmul"]["ops"]
          > rows[0]["profile"]["by_kind"]["matmul"]["ops"])


def test_profile_table_names_each_variant():
  traced = {"busy_s": 0.002, "idle_s": None, "untraced_s": 0.0, "untraced_after": {},
            "ops": 3, "by_kind": {"matmul": {"s": 0.002, "ops": 3}}}
  rows = [{"kind": "model", "model": "seresnet50", "model_kwargs": {}, "profile": traced},
          {"kind": "model", "model": "seresnet50", "profile": traced,
           "model_kwargs": {"attn_kwargs": {"dtype": "float32"}}}]
  table = profile.markdown(rows)
  assert table[3].startswith("| seresnet50 | 2.00 / - | 0.00 (0.00) | 3 |")
  assert table[4].startswith("| seresnet50 (attn_kwargs={'dtype': 'float32'}) | 2.00 / - |")


def test_untraced_gaps_by_the_kind_that_ended_last():
  # (name, start ns, duration ns) on two threads: a convolution whose work is not traced
  # leaves 30 ns with nothing running; a fusion overlapping a dot, then 5 ns after the dot.
  events = [("conv_general_dilated.3", 0, 10), ("loop_add_fusion.1", 40, 20),
            ("dot.2", 45, 30), ("wrapped_copy", 80, 5), ("copy.9", 82, 1)]
  assert profile.untraced_gaps(events) == {"convolution": 30, "matmul": 5}
  assert profile.untraced_gaps(list(reversed(events))) == {"convolution": 30,
                                                                 "matmul": 5}
  assert profile.untraced_gaps([("dot", 0, 5)]) == {}
  assert profile.untraced_gaps([]) == {}


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32", "convolution"),
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop>", "convolution"),
    ("void nhwcAddPaddingKernel<__nv_bfloat16>", "convolution"),
    ("conv_general_dilated.169", "convolution"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_ssched_bx_coopA_bias_TNT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s16816gemm_bf16_64x128>", "matmul"),
    ("gemm_fusion_dot.12", "matmul"), ("dot.3", "matmul"),
    ("input_reduce_select_fusion_7", "fusion"), ("wrapped_transpose", "fusion"),
    ("Memset 3", "memset"), ("MemcpyD2D", "copy"), ("copy.4", "copy"), ("while", "other")])
def test_profile_kinds_of_gpu_and_cpu_names(name, kind):
  assert profile.kind_of(name) == kind


def test_profile_stems_drop_the_instance_number():
  assert profile.stem("loop_add_fusion.12") == "loop_add_fusion"
  assert profile.stem("input_reduce_fusion_7") == "input_reduce_fusion"
  assert profile.stem("Memset 3") == "Memset 3"


def test_bad_flags_are_clear_errors(capsys):
  assert cli.main(["--models=test_resnet_tiny", "--batch=0"]) != 0
  assert "--batch must be >= 1" in capsys.readouterr().err
  assert cli.main(["--models=test_resnet_tiny", "--profile", "--profile_steps=0"]) != 0
  assert "--profile_steps must be >= 1" in capsys.readouterr().err
  assert cli.main(["--models=test_resnet_tiny", "--pipeline", "--data=imagenet"]) != 0
  assert ("--data='imagenet'; choose one of digits, cifar10_mock, png_folder"
          in capsys.readouterr().err)
  assert cli.main(["--models=test_resnet_tiny", "--convs", "--conv_shapes=2,6,3"]) != 0
  assert "N,H,C_in,C_out,kernel,stride" in capsys.readouterr().err
  assert cli.main(["--models=test_resnet_tiny", "--pipeline", "--pipeline_workers=-1"]) != 0
  assert "--pipeline_workers must be >= 0" in capsys.readouterr().err


def test_pipeline_with_worker_processes():
  row = pipeline.bench_pipeline("digits", batch=4, image_shape=(16, 16, 3), warmup=1,
                                batches=2, model_row=None, workers=1)
  assert row["workers"] == 1 and row["images_per_second"] > 0
  # The worker's buffered batch and the prefetch are read before the clock starts.
  assert row["warmup_batches"] == 1 + 1 + 4 and row["batches"] == 2
  assert row["model"] is None and row["ratio_vs_model"] is None
  assert row["image_dtype"] == "float32"  # the embedded digits are float images


@pytest.mark.parametrize("data", ["cifar10_mock", "png_folder"])
def test_pipeline_of_uint8_images_stays_uint8(data):
  row = pipeline.bench_pipeline(data, batch=4, image_shape=(16, 16, 3), warmup=1,
                                batches=2, model_row={"model": "m", "images_per_second": 8.0})
  assert row["image_dtype"] == "uint8" and row["images_per_second"] > 0
  assert row["data"] == data and row["ratio_vs_model"] == row["images_per_second"] / 8.0


def test_pipeline_augmented_on_the_device_charges_the_model(tmp_path, capsys):
  row = pipeline.bench_pipeline("cifar10_mock", batch=4, image_shape=(24, 24, 3), warmup=1,
                                batches=2, model_row={"model": "m", "images_per_second": 8.0},
                                augment_on_device=True)
  # The pipeline ships the stored 32 x 32 pixels; the device's resize to 24 x 24 is timed
  # and added to the model's time per batch.
  assert row["augment_on_device"] and row["stored_image_shape"] == [32, 32, 3]
  assert row["image_dtype"] == "uint8" and row["device_augment_s"] > 0
  model_ips = 4 / (4 / 8.0 + row["device_augment_s"])
  assert math.isclose(row["model_images_per_second"], model_ips)
  assert math.isclose(row["ratio_vs_model"], row["images_per_second"] / model_ips)
  host = pipeline.bench_pipeline("cifar10_mock", batch=4, image_shape=(24, 24, 3),
                                 warmup=1, batches=2, model_row=None)
  assert not host["augment_on_device"] and host["device_augment_s"] is None
  assert host["stored_image_shape"] == [24, 24, 3]
  out = tmp_path / "bench.json"
  assert cli.main([*TINY, "--pipeline", "--pipeline_batches=2", "--augment_on_device",
                   f"--out={out}"]) == 0
  host, on_device = json.loads(out.read_text())[-2:]
  assert host["kind"] == "pipeline" and not host["augment_on_device"]
  # The digits source makes its images at the model's size: the device only crops them.
  assert on_device["augment_on_device"] and on_device["device_augment_s"] > 0
  assert on_device["stored_image_shape"] == on_device["image_shape"]
  assert "augmented on the device" in capsys.readouterr().out


def test_png_folder_is_read_back_pixel_for_pixel(tmp_path):
  from train import datasets
  pipeline.write_png_folder(str(tmp_path), 23, side=5, classes=4, seed=3)
  source = datasets.ImageFolderSource(str(tmp_path), "train", 3)
  assert len(source) == 23 and source.classes == [f"class{k:02d}" for k in range(4)]
  assert np.bincount(source.labels).tolist() == [6, 6, 6, 5]
  rng = np.random.default_rng(3)
  written = [rng.integers(0, 256, (5, 5, 3), dtype=np.uint8) for _ in range(23)]
  # Files are listed class by class; image i went to class i % 4 as file i.
  order = sorted(range(23), key=lambda i: (i % 4, i))
  for index, i in enumerate(order):
    np.testing.assert_array_equal(source[index]["image"], written[i])
    assert source[index]["label"] == i % 4


def test_against_torch_tiny(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  out = tmp_path / "torch.json"
  rc = cli.main([*TINY, "--against=torch", "--sampler", "--sampler_shapes=2,4,4,1",
                 "--sampler_modes=bilinear,nearest", "--convs",
                 "--conv_shapes=2,6,3,4,3,2;2,6,2,1,3,1", f"--out={out}"])
  assert rc == 0
  rows = json.loads(out.read_text())
  assert rows[0]["torch_version"] and rows[0]["torch_threads"] >= 1
  for row in rows[1:3]:
    assert row["torch_model"] and row["torch_note"] is None
    assert row["torch_step_time_min_s"] <= row["torch_step_time_median_s"]
    assert math.isclose(row["throughput_ratio_vs_torch"],
                        row["torch_step_time_median_s"] / row["step_time_median_s"])
  assert [(r["kind"], r["mode"]) for r in rows[3:5]] == [("sampler", "bilinear"),
                                                         ("sampler", "nearest")]
  for sampler in rows[3:5]:
    assert math.isclose(sampler["throughput_ratio_vs_torch"],
                        sampler["torch_step_time_median_s"] / sampler["step_time_median_s"])
  assert "| (2, 4, 4, 1) | nearest |" in cli.markdown(rows)
  conv, spatial = rows[5:7]
  assert conv["kind"] == "conv" and conv["shape"] == [2, 6, 6, 3, 4, 3, 2]
  # A small strided 3x3 layer keeps XLA's kernel gradient; a CBAM-like 2 -> 1 map takes
  # the banded convolution.
  assert conv["route"] == "xla" and spatial["route"] == "banded"
  # 2 images x 3x3 outputs x 3x3x3 taps x 4 filters x 2 FLOPs.
  assert math.isclose(conv["gflop"], 2 * 9 * 27 * 4 * 2 / 1e9)
  assert math.isclose(conv["speedup_vs_lax"], conv["lax_step_s"] / conv["ours_step_s"])
  assert math.isclose(conv["throughput_ratio_vs_torch"],
                      conv["torch_step_s"] / conv["ours_step_s"])
  assert "| (2, 6, 6, 3, 4, 3, 2) | xla | 0.000 |" in cli.markdown(rows)
  assert "| (2, 6, 6, 2, 1, 3, 1) | banded | 0.000 |" in cli.markdown(rows)


def test_torch_twin_has_the_same_parameter_count():
  """The twins are built from the attention's registry name alone (timm's get_attn takes
  the same names): timm's ResNet where it has the stem and shortcut (the ResNet-D tiny),
  timm's blocks in our stem and widths otherwise."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from attention_flax import models as registry
  for name in ("test_resnet_tiny", "test_resnet_tiny_se", "test_resnet_cifar_tiny",
               "test_resnetd_tiny", "test_resnet_tiny_ese", "test_resnet_tiny_eca",
               "test_resnet_tiny_cbam", "test_resnet_tiny_gc", "test_resnet_tiny_coord"):
    module, description = torch_ref.torch_model(name, 10, 3)
    theirs = sum(p.numel() for p in module.parameters())
    entry = registry.model_info(name)
    shape = (1, entry.input_size, entry.input_size, 3)
    variables = jax.eval_shape(registry.create_model(name, num_classes=10).init,
                               jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, "float32"))
    assert registry.count_params(variables) == theirs, name
    assert isinstance(module, torch.nn.Module)
    attn = name.rsplit("_", 1)[-1] if "tiny_" in name else None
    assert f"attn_layer={attn}" in description, (name, description)
  assert torch_ref.torch_model("test_resnetd_tiny", 10, 3)[1].startswith("timm ResNet ")


def test_models_without_a_torch_twin_are_skipped_with_a_note():
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  # timm has no layer called "spatial"; attention56 is no ResNet; timm has no model of
  # either name.
  for name, why in (("test_resnet_tiny_spatial", "timm has no attention layer 'spatial'"),
                    ("sa_resnet50", "timm has no attention layer 'spatial'"),
                    ("attention56", "is not a ResNet")):
    with pytest.raises(torch_ref.NoTwin, match="no torch twin") as err:
      torch_ref.torch_model(name, 10, 3)
    assert why in str(err.value), (name, str(err.value))
  with pytest.raises(torch_ref.NoTwin, match="not a registered name"):
    torch_ref.timm_attention(lambda **kwargs: None)
  assert torch_ref.timm_attention(None) is None
  assert torch_ref.timm_attention("CBAM") == "cbam"


def test_unfolded_kwargs_give_the_plain_tail():
  from attention_flax.models.common import plain_tail
  for name in ("seresnet50", "cbam_resnet20", "test_resnet_tiny_se"):
    assert models.unfolded_kwargs(name) == {"tail": plain_tail}, name
  for name in ("resnet50", "sa_resnet50", "gcresnet50", "attention56"):
    assert models.unfolded_kwargs(name) is None, name


def test_common_summaries_rounds_and_formats():
  assert common.summary([3.0, 1.0, 2.0, 10.0], "torch_") == {
      "torch_step_time_median_s": 2.5, "torch_step_time_min_s": 1.0,
      "torch_step_time_max_s": 10.0}
  calls = []

  class Step:
    def __init__(self, name):
      self.name, self.times = name, []

    def step(self):
      calls.append(self.name)
      return float(len(calls))

  a, b = Step("a"), Step("b")
  common.interleave([a, b], warmup=1, repeats=2)
  assert calls == ["a", "b"] * 3  # round by round, never all of one model first
  assert a.times == [3.0, 5.0] and b.times == [4.0, 6.0]
  assert common.fmt(None) == "-" and common.fmt(1.23456, ".2f") == "1.23"
  assert common.mib(3 * 2**20) == 3.0 and common.mib(None) is None
  assert common.table(["a", "b"], []) == []
  assert common.table(["a", "b"], [["1", "2"]]) == ["", "| a | b |", "|---|---|", "| 1 | 2 |"]
  from attention_flax.models.common import plain_tail
  kwargs = {"tail": plain_tail, "attn_kwargs": {"conv": nn.Conv, "dtype": "float32"}}
  assert common.describe(kwargs) == {
      "tail": "attention_flax.models.common.plain_tail",
      "attn_kwargs": {"conv": "flax.linen.linear.Conv", "dtype": "float32"}}
  assert json.loads(json.dumps(common.describe(kwargs))) == common.describe(kwargs)
  assert common.variant_name("m", {"tail": plain_tail}) == (
      "m:tail=attention_flax.models.common.plain_tail")
  assert common.model_label({"model": "m", "model_kwargs": {"b": 2, "a": 1}}) == "m (a=1) (b=2)"


def test_bench_modules_import_each_other_without_a_cycle():
  """Every leaf imports common (and the PyTorch twins at most); only cli imports the
  leaves; the graph of train.bench.* imports has no cycle."""
  import ast
  import pathlib
  import train.bench
  folder = pathlib.Path(train.bench.__file__).parent
  graph = {}
  for path in sorted(folder.glob("*.py")):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module == "train.bench":
          found |= {f"train.bench.{a.name}" for a in node.names}
        elif node.module.startswith("train.bench."):
          found.add(node.module)
      elif isinstance(node, ast.Import):
        found |= {a.name for a in node.names if a.name.startswith("train.bench.")}
    graph[f"train.bench.{path.stem}"] = found
  assert graph["train.bench.__init__"] == set() and graph["train.bench.common"] == set()
  assert graph["train.bench.torch_ref"] == {"train.bench.common"}
  for leaf in ("conv", "sampler", "models", "pipeline", "profile"):
    assert graph[f"train.bench.{leaf}"] <= {"train.bench.common", "train.bench.torch_ref",
                                            "train.bench.profile"}, leaf
  done: set[str] = set()

  def visit(module, path):
    assert module not in path, " -> ".join([*path, module])
    if module not in done:
      for dep in graph.get(module, ()):
        visit(dep, [*path, module])
      done.add(module)

  for module in graph:
    visit(module, [])
