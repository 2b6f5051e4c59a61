"""Deployment details of #20.7: the library's top-level names, quantize(tokenizer=) and calibration paths
that survive a change of working directory."""
import json

import torch

import orthoquant
from orthoquant.config import Recipe
from orthoquant.recipes import load_recipe
from orthoquant.models.tiny import tiny_model

from helpers import token_windows


def test_top_level_names():
    from orthoquant.data import calibration_windows
    from orthoquant.export import export_run

    assert orthoquant.export_run is export_run and orthoquant.calibration_windows is calibration_windows
    assert {"export_run", "calibration_windows"} <= set(orthoquant.__all__)


def test_quantize_saves_the_tokenizer_into_the_run(tmp_path, tokenizer, text_file):
    windows = orthoquant.calibration_windows(tokenizer, str(text_file), 4, 24)
    recipe = load_recipe("rtn-w4a16").with_overrides(["calibration.batch_size=4", "weights.group_size=32"])
    orthoquant.quantize(tiny_model("llama", vocab_size=len(tokenizer)), recipe, windows, out=tmp_path / "run",
                        tokenizer=tokenizer)
    assert (tmp_path / "run" / "tokenizer_config.json").is_file()
    assert "tokenizer_config.json" in json.loads((tmp_path / "run" / "run.json").read_text())["files"]
    _, loaded, *_ = orthoquant.open_run(tmp_path / "run", torch.device("cpu"))
    assert loaded is not None and loaded("alpha beta")["input_ids"] == tokenizer("alpha beta")["input_ids"]


def test_a_relative_calibration_path_is_recorded_absolute(tmp_path, saved_model, text_file, monkeypatch):
    folder = saved_model("llama")
    monkeypatch.chdir(text_file.parent)
    recipe = load_recipe("rtn-w4a16").with_overrides(
        ["calibration.batch_size=4", "weights.group_size=32", f"calibration.source={text_file.name}",
         "calibration.nsamples=4", "calibration.seqlen=24"])
    orthoquant.quantize_pretrained(str(folder), recipe, tmp_path / "run", torch.device("cpu"))
    recorded = Recipe.from_yaml((tmp_path / "run" / "recipe.yaml").read_text())
    assert recorded.calibration.source == str(text_file.resolve())


def test_a_fused_group_split_across_schemes_is_refused_unless_forced(tmp_path, caplog):
    import logging

    import pytest

    from orthoquant.errors import UserError

    weights = {"format": "int", "bits": 4, "symmetric": True, "group_size": 32}
    recipe = Recipe.from_dict({"name": "split", "weights": weights, "calibration": {"batch_size": 4},
                               "overrides": [{"pattern": "k_proj", "weights": {**weights, "bits": 8}}]})
    windows = token_windows(4, 24, vocab=300)
    orthoquant.quantize(tiny_model("llama", vocab_size=300), recipe, windows, out=tmp_path / "run")
    with pytest.raises(UserError, match=r"q_proj, .*k_proj, .*v_proj are fused by vLLM.*--force"):
        orthoquant.export_run(tmp_path / "run", tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()
    orthoquant.export_run(tmp_path / "run", tmp_path / "native", "native")  # native runs each linear alone
    with caplog.at_level(logging.WARNING):
        orthoquant.export_run(tmp_path / "run", tmp_path / "ct", "compressed-tensors", force=True, verify="weights")
    assert "fused by vLLM" in caplog.text
