"""Exportable by default: ``scale_dtype: auto`` resolves from the model's dtype when quantizing, the run
records the resolved recipe and which exports it serves, and ``export`` refuses what it cannot serve
before writing, naming what the run does serve."""
import json

import pytest
import torch

from orthoquant import quantize
from orthoquant.autoscale import auto_scale_dtype, resolve_auto_scales
from orthoquant.config import ConfigError, QuantSpec, Recipe
from orthoquant.recipes import load_recipe, preset_names
from orthoquant.errors import UserError
from orthoquant.export import export_run
from orthoquant.export.contents import exact_in
from orthoquant.formats import make_format
from orthoquant.models.tiny import tiny_model

from helpers import token_windows


def preset_run(tmp_path, preset, dtype, tokenizer=None):
    recipe = load_recipe(preset).with_overrides(["calibration.batch_size=4"])
    model = tiny_model("llama", vocab_size=300, dtype=dtype)
    windows = token_windows(4, 24, vocab=300)
    quantize(model, recipe, windows, out=tmp_path / "run")
    return tmp_path / "run"


def exports(run):
    return json.loads((run / "run.json").read_text())["exports"]


def test_every_preset_with_weights_says_auto():
    for name in preset_names():
        recipe = load_recipe(name)
        if recipe.weights is not None:
            assert recipe.weights.scale_dtype == "auto", name
        if recipe.kv_cache is not None and recipe.kv_cache.static:  # stored and exported, like weight scales
            assert recipe.kv_cache.scale_dtype == "auto", name


@pytest.mark.parametrize("model_dtype, expected", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
                                                   (torch.float32, "bfloat16"), (torch.float64, "bfloat16")])
def test_auto_resolves_from_the_model_dtype_everywhere_in_the_recipe(model_dtype, expected):
    recipe = load_recipe("spinquant-w4a4kv4")  # overrides inherit weights: auto
    resolved = resolve_auto_scales(recipe, model_dtype)
    assert auto_scale_dtype(model_dtype) == expected
    assert resolved.weights.scale_dtype == expected
    assert all(o.weights.scale_dtype == expected for o in resolved.overrides if o.weights is not None)
    assert resolved.activations.scale_dtype == recipe.activations.scale_dtype == "float32"  # not auto: untouched
    assert "scale_dtype: auto" not in resolved.to_yaml()
    assert recipe.weights.scale_dtype == "auto"  # the argument is not mutated


def test_an_unresolved_auto_never_reaches_a_format():
    with pytest.raises(ConfigError, match="auto"):
        make_format(QuantSpec(scale_dtype="auto"))


def test_bfloat16_values_in_float16_normal_range_are_float16_exact_and_the_edge_is_not():
    """The reasoning behind bf16 scales serving fp16 exports (GPTQ), and where it stops."""
    tiny = torch.finfo(torch.float16).tiny  # 6.1e-5, float16's smallest normal
    g = torch.Generator().manual_seed(0)
    values = torch.exp(torch.empty(100_000).uniform_(-9.7, 11.0, generator=g)).to(torch.bfloat16).float()
    assert values.min() >= tiny and values.max() <= torch.finfo(torch.float16).max
    assert exact_in(values, torch.float16) and exact_in(values, torch.float32)
    below = torch.tensor([2.0 ** -20 * (1 + 2.0 ** -7)]).to(torch.bfloat16).float()  # 8 bits, below fp16 normals
    assert not exact_in(below, torch.float16)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32])
def test_an_int_preset_run_exports_to_gptq_and_compressed_tensors_in_its_dtype(model_dtype, tmp_path):
    run = preset_run(tmp_path, "gptq-w4a16", model_dtype)
    recipe = Recipe.from_yaml((run / "recipe.yaml").read_text())
    assert recipe.weights.scale_dtype == "bfloat16"  # the run records the resolved value
    record = exports(run)
    assert set(record["compressed-tensors"]["dtypes"]) == {"bfloat16", "float16", "float32"}
    assert set(record["gptq"]["dtypes"]) == {"bfloat16", "float16", "float32"}
    export_run(run, tmp_path / "gptq", "gptq")
    export_run(run, tmp_path / "ct", "compressed-tensors")  # in the run's own dtype


def test_a_float16_run_records_and_refuses_bfloat16_compressed_tensors_before_writing(tmp_path):
    run = preset_run(tmp_path, "rtn-w4a16", torch.float16)
    record = exports(run)
    assert record["compressed-tensors"]["dtypes"] == ["float32", "float16"]
    assert "not exactly representable in bfloat16" in record["compressed-tensors"]["refused"]["bfloat16"]
    assert record["native"]["dtypes"] == ["float32", "bfloat16", "float16"]
    with pytest.raises(UserError, match="bfloat16.*this run serves .*compressed-tensors \\(float32, float16\\)"):
        export_run(run, tmp_path / "ct", "compressed-tensors", torch.bfloat16)
    assert not (tmp_path / "ct").exists()
    export_run(run, tmp_path / "ct16", "compressed-tensors", torch.float16)


def test_a_weight_and_activation_preset_is_refused_by_gptq_with_its_reason_recorded(tmp_path):
    run = preset_run(tmp_path, "rtn-nvfp4", torch.bfloat16)
    record = exports(run)
    assert record["gptq"]["dtypes"] == []
    assert all("weight-only" in reason for reason in record["gptq"]["refused"].values())
    assert set(record["compressed-tensors"]["dtypes"]) == {"bfloat16", "float16", "float32"}
