"""The model registry: lookup errors, listing, parameter and FLOP counting, the table
printer, and a coverage suite that builds every registered model abstractly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.core import FrozenDict

from attention_flax.models import (
    MODELS, ModelEntry, count_params, create_model, flops, list_models, model_info,
    residual_attention, resnet, stn)
from attention_flax.models import resnest
from attention_flax.models import bam_resnet
from attention_flax.models import sknet
from attention_flax.models import byoanet
from attention_flax.models import ram
from attention_flax.models.__main__ import main

KEY = jax.random.key(0, impl="rbg")


def test_registry_merges_every_family_without_overwriting():
  families = (resnet.MODELS, residual_attention.MODELS, stn.MODELS, resnest.MODELS,
              bam_resnet.MODELS, sknet.MODELS, byoanet.MODELS, ram.MODELS)
  for family in families:
    assert set(family) <= set(MODELS)
  assert len(MODELS) == sum(len(family) for family in families)
  for name, entry in MODELS.items():
    assert isinstance(entry, ModelEntry), name
    assert entry.input_size > 0 and entry.in_channels >= 1, name
    assert entry.test_only or entry.paper, f"{name} needs a paper string"


@pytest.mark.parametrize("typo, suggestion", [
    ("seresnet5", "seresnet50"), ("resnet_50", "resnet50"), ("cbam_resnet19", "cbam_resnet18")])
def test_unknown_name_lists_close_matches(typo, suggestion):
  with pytest.raises(ValueError, match="list_models()") as error:
    create_model(typo)
  assert suggestion in str(error.value)
  with pytest.raises(ValueError, match=suggestion):
    model_info(typo)


def test_list_models_filters_and_sorts():
  assert list_models("seresnet*") == [
      "seresnet101", "seresnet152", "seresnet18", "seresnet34", "seresnet50"]
  assert list_models("*resnet50d") == ["ecaresnet50d", "resnet50d"]
  assert list_models("se_resnet*") == [f"se_resnet{d}" for d in (110, 20, 32, 44, 56)]
  assert list_models("no_such_*") == []
  everything = list_models()
  assert everything == sorted(everything)
  assert "test_resnet_tiny" not in everything
  assert "test_resnet_tiny" in list_models(include_test=True)
  assert not any(MODELS[n].test_only for n in everything)


def test_model_info_returns_the_entry():
  entry = model_info("resnet20")
  assert entry is MODELS["resnet20"]
  assert (entry.input_size, entry.in_channels) == (32, 3)
  assert model_info("resnet50").input_size == 224


def test_create_model_passes_num_classes_and_overrides():
  model = create_model("resnet18", num_classes=10, dtype=jnp.bfloat16, attn="se")
  assert (model.num_classes, model.dtype, model.attn) == (10, jnp.bfloat16, "se")
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  count = count_params(jax.eval_shape(create_model("seresnet18", num_classes=10).init, KEY, x))
  # timm's 11,779,624 with the 512 x 1000 (+ bias) head swapped for a 512 x 10 one.
  assert count == 11_779_624 - (512 * 1000 + 1000) + (512 * 10 + 10)


def test_count_params_prefers_the_params_collection():
  variables = {"params": {"a": np.zeros((2, 3)), "b": {"c": np.zeros(4)}},
               "batch_stats": {"mean": np.zeros(100)}}
  assert count_params(variables) == 10
  assert count_params(FrozenDict(variables)) == 10
  assert count_params(variables["batch_stats"]) == 100
  assert count_params({"w": jax.ShapeDtypeStruct((3, 5), jnp.float32)}) == 15
  assert count_params({}) == 0


class Affine(nn.Module):
  """x @ W + b over the channels: 2*3*10 multiply-add FLOPs + 10 bias additions."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(x)


def test_flops_by_hand_on_a_dense_layer():
  gflops = flops(Affine(), (1, 1, 1, 3))
  assert gflops is not None and 60 <= gflops * 1e9 <= 80


def test_resnet50_flops_match_the_papers():
  """4.1 G multiply-adds (He et al.; timm 4.1 GMACs) = about 8.2 G XLA FLOPs; SENet
  reports SE-ResNet-50 at 3.87 vs 3.86 GMACs, a rise well under 1%."""
  base = flops(create_model("resnet50"), (1, 224, 224, 3))
  se = flops(create_model("seresnet50"), (1, 224, 224, 3))
  assert 7.6 <= base <= 8.6
  assert 0.0 < (se - base) / base < 0.01


def test_flops_rejects_a_bad_shape():
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    flops(create_model("resnet18"), (224, 224, 3))


def test_table_printer(capsys):
  assert main(["--pattern=test_resnet_tiny", "--include_test"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("| model | params (1000 classes) | GFLOPs |")
  assert len(lines) == 3
  cells = [c.strip() for c in lines[2].strip("|").split("|")]
  # stem 7*7*3*8 + 16; block 1: 2 * 9*8*8 + 32; block 2: 9*8*16 + 9*16*16 + 64
  # + shortcut 8*16 + 32; fc 16*1000 + 1000.
  assert cells[:2] == ["test_resnet_tiny", f"{1192 + 1184 + 3680 + 17000:,}"]
  assert float(cells[2]) > 0
  assert main(["--pattern=resnet18", "--no_flops", "--num_classes=10"]) == 0
  row = capsys.readouterr().out.strip().splitlines()[2]
  assert f"| resnet18 | {11_689_512 - 512 * 990 - 990:,} | - |" in row
  assert main(["--pattern=nothing*"]) == 1


def test_parameterised_suite_covers_the_registry():
  test_only = {n for n, e in MODELS.items() if e.test_only}
  assert set(list_models()) | test_only == set(MODELS)


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_abstractly(name):
  """Init and forward under jax.eval_shape: shapes only, no compute."""
  entry = MODELS[name]
  model = create_model(name, num_classes=7)
  x = jax.ShapeDtypeStruct((2, entry.input_size, entry.input_size, entry.in_channels),
                           jnp.float32)
  logits, variables = jax.eval_shape(model.init_with_output, KEY, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert count_params(variables) > 0


@pytest.mark.parametrize("name", list_models())
def test_every_model_refuses_channels_first_images(name):
  """A PyTorch-layout batch is refused before the first layer, with the transpose to
  make; read as NHWC it would build a model of H input channels without complaint."""
  entry = MODELS[name]
  model = create_model(name, num_classes=7)
  side = entry.input_size
  nchw = jax.ShapeDtypeStruct((2, entry.in_channels, side, side), jnp.float32)
  with pytest.raises(ValueError, match=r"channels-first.*transpose\(0, 2, 3, 1\)"):
    jax.eval_shape(model.init, KEY, nchw)
  # The same batch in NHWC builds (test_every_model_builds_abstractly checks the rest).
  nhwc = jax.ShapeDtypeStruct((2, side, side, entry.in_channels), jnp.float32)
  jax.eval_shape(model.init, KEY, nhwc)


@pytest.mark.parametrize("shape, refused", [
    ((2, 3, 32, 32), True), ((2, 1, 8, 8), True), ((2, 4, 64, 48), True),
    ((2, 3, 240, 320), True),
    ((2, 32, 32, 3), False), ((2, 8, 8, 1), False), ((2, 3, 4, 8), False),
    ((2, 2, 32, 32), False), ((2, 3, 32, 4), False), ((1, 5, 5, 16), False)])
def test_channels_first_check_by_shape(shape, refused):
  from attention_flax.models.common import check_model_images
  x = jnp.zeros(shape)
  if refused:
    with pytest.raises(ValueError, match=rf"got shape \({shape[0]}, {shape[1]},"):
      check_model_images(x, "Model")
  else:
    check_model_images(x, "Model")
