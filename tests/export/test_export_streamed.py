"""Streamed export verification: one decoder layer of the run and one of the export resident at a time,
weights / layer outputs / logits compared, a difference caught and named, --verify modes recorded."""
import json
import logging

import pytest

from orthoquant import quantize
from orthoquant.cli import main
from orthoquant.recipes import load_recipe
from orthoquant.errors import UserError
from orthoquant.export import export_run, load_quantized, streamed
from orthoquant.export.verify import FAILED_MANIFEST, MANIFEST, ExportCheckError
from orthoquant.models.tiny import tiny_model

from helpers import token_windows


@pytest.fixture
def run(tmp_path):
    recipe = load_recipe("rtn-w4a16").with_overrides(["calibration.batch_size=4", "weights.group_size=32"])
    windows = token_windows(4, 24, vocab=300)
    quantize(tiny_model("llama", vocab_size=300, num_hidden_layers=3), recipe, windows, out=tmp_path / "run")
    return tmp_path / "run"


def resident(layers):
    return sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers)


@pytest.mark.parametrize("fmt", ["native", "compressed-tensors", "gptq"])
def test_full_verification_holds_one_layer_of_each_model(fmt, run, tmp_path, monkeypatch):
    seen, most = [], []
    real_layers_of, real_run_layer = streamed.layers_of, streamed.run_layer

    def layers_of(model, arch):
        seen.append(real_layers_of(model, arch))
        return seen[-1]

    def run_layer(layer, inputs, device, keep=True):
        most.append(max(resident(layers) for layers in seen))
        return real_run_layer(layer, inputs, device, keep)

    monkeypatch.setattr(streamed, "layers_of", layers_of)
    monkeypatch.setattr(streamed, "run_layer", run_layer)
    report = export_run(run, tmp_path / "out", fmt)
    assert len(seen) == 2 and most and max(most) == 1  # the run's and the export's: one layer each
    checks = report["checks"]
    assert checks["layer_weights"]["compared"] > 3 * 7 and checks["layer_weights"]["bit_exact"]
    assert checks["layer_outputs"]["compared"] == 3 * 2 and checks["load_quantized"]["bit_exact"]


@pytest.mark.parametrize("mode", ["full", "weights"])
def test_a_wrong_weight_in_one_layer_is_caught_and_named(mode, run, tmp_path, monkeypatch):
    from orthoquant.export import gptq

    real = gptq.gptq_tensors

    def off_by_one_scale(lin):
        tensors = real(lin)
        if lin.name == "model.layers.1.mlp.down_proj":
            tensors["scales"] = tensors["scales"] * 1.01
        return tensors

    monkeypatch.setattr(gptq, "gptq_tensors", off_by_one_scale)
    with pytest.raises(ExportCheckError, match="model.layers.1.mlp.down_proj"):
        export_run(run, tmp_path / "out", "gptq", verify=mode)
    assert (tmp_path / "out" / FAILED_MANIFEST).is_file() and not (tmp_path / "out" / MANIFEST).exists()


def test_verify_none_is_recorded_and_loads_with_a_warning(run, tmp_path, caplog):
    report = export_run(run, tmp_path / "out", "compressed-tensors", verify="none")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["verification"] == "none" and "load_quantized" not in report["checks"]
    with caplog.at_level(logging.WARNING):
        load_quantized(tmp_path / "out")
    assert "--verify none" in caplog.text


def test_cli_verify_weights_and_bad_values(run, tmp_path, capsys):
    assert main(["export", str(run), "--format", "native", "--out", str(tmp_path / "w"), "--verify", "weights"]) == 0
    out = capsys.readouterr().out
    assert "layer_weights" in out and "layer_outputs" not in out
    manifest = json.loads((tmp_path / "w" / MANIFEST).read_text())
    assert manifest["verification"] == "weights"
    assert main(["export", str(run), "--format", "native", "--out", str(tmp_path / "d"), "--device", "tpu"]) == 2
    assert not (tmp_path / "d").exists()
    with pytest.raises(UserError, match="--verify 'some'"):
        export_run(run, tmp_path / "s", "native", verify="some")


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_only_stock_verification_loads_whole_models(fmt, run, tmp_path, monkeypatch):
    """The default (full) opens the run streamed only; --verify stock adds the stock runtimes' reloads,
    which hold whole models (the run's and the stock one)."""
    from orthoquant.export.contents import RunContents

    streams, real = [], RunContents.open_model

    def open_model(self, device, dtype, stream=False):
        streams.append(stream)
        return real(self, device, dtype, stream=stream)

    monkeypatch.setattr(RunContents, "open_model", open_model)
    full = export_run(run, tmp_path / "full", fmt)
    assert all(streams) and not {"stock_transformers", "gptqmodel"} & set(full["checks"])
    streams.clear()
    stock = export_run(run, tmp_path / "stock", fmt, verify="stock")
    assert False in streams and {"stock_transformers", "gptqmodel"} & set(stock["checks"])
