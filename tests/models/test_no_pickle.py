"""No file from a run folder, export or model folder is ever unpickled: a pickle payload planted in
every slot that is loaded (fit checkpoint, released transforms, a quantized model folder's weights)
is refused with a clear error, and the payload never runs."""
import json
import pathlib

import pytest
import torch
from test_trust_loading import WEIGHTS, error_line, eval_args, quantize_args

from orthoquant.cli import main
from orthoquant.config import FitSpec, QuantSpec, Recipe, TransformSpec
from orthoquant.errors import UserError
from orthoquant.fitting import loop, prepare_session
from orthoquant.fitting.fit import CHECKPOINT
from orthoquant.models.loading import InMemorySource
from orthoquant.models.generic import spec_for
from orthoquant.models.tiny import tiny_model
from orthoquant.pipeline import make_plan, prepare_model

from helpers import token_windows


class Payload:
    """Unpickling this creates ``marker``: the code a planted file would run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def plant(path: pathlib.Path, marker: pathlib.Path) -> None:
    torch.save({"step": Payload(marker), "R1": torch.eye(4)}, path)
    with open(path, "rb") as f:  # the payload is live: an unsafe load runs it
        torch.load(f, weights_only=False)
    assert marker.exists()
    marker.unlink()


def fit_session(fit: FitSpec):
    model = tiny_model("llama", num_hidden_layers=1)
    recipe = Recipe(activations=QuantSpec(bits=4, symmetric=False), transforms=(TransformSpec("qk"),), fitting=fit)
    arch = spec_for(model.config)
    plan = make_plan(model, arch, recipe)
    prepare_model(model, arch, InMemorySource(), torch.device("cpu"), plan)
    return prepare_session(model, arch, recipe, plan, torch.device("cpu"))


def test_a_planted_pickle_fit_checkpoint_is_refused_and_never_runs(tmp_path):
    fit = FitSpec(steps=2, batch_size=2, grad_accum=1, top_k=20, qsur_samples=0, eval_samples=0)
    checkpoint, marker = tmp_path / CHECKPOINT, tmp_path / "pwned"
    plant(checkpoint, marker)
    windows = token_windows(2, 16)
    with pytest.raises(UserError, match=f"{checkpoint} is not a valid fit checkpoint"):
        loop.train(fit_session(fit), windows, checkpoint)
    assert not marker.exists()


def test_a_planted_pickle_released_file_is_refused_and_never_runs(saved_model, text_file, tmp_path, capsys):
    released, marker = tmp_path / "R.bin", tmp_path / "pwned"
    plant(released, marker)
    args = quantize_args(saved_model("llama"), text_file, tmp_path / "run")
    args[args.index("rtn-w4a16")] = "spinquant-had-w4a4kv4"
    assert main([*args, "--set", f"fitting.released={released}", "--set", "fitting.params=[R_res,R2]"]) == 2
    assert f"{released} is not a plain tensor file; refused" in error_line(capsys)
    assert not marker.exists()


def test_a_planted_pickle_in_a_quantized_hf_folder_is_never_read(saved_model, text_file, tmp_path, capsys):
    folder, marker = saved_model("llama"), tmp_path / "pwned"
    (folder / WEIGHTS).unlink()
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (folder / "config.json").write_text(json.dumps(config))
    plant(folder / "pytorch_model.bin", marker)
    assert main(eval_args(folder, text_file, tmp_path / "eval.json")) == 2
    line = error_line(capsys)  # transformers is asked for safetensors only
    assert str(folder) in line and "model.safetensors" in line and not marker.exists()


@pytest.mark.parametrize("slot", ["layers/00000.safetensors", "rest.safetensors"])
def test_a_planted_pickle_in_a_run_folder_is_refused_and_never_runs(slot, saved_model, text_file, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert main(quantize_args(saved_model("llama"), text_file, run)) == 0
    plant(run / slot, marker)
    assert main(eval_args(run, text_file, tmp_path / "eval.json")) == 2
    assert slot in error_line(capsys) and not marker.exists()
