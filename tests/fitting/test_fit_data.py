"""The fit's own data: packed windows of ``fitting.source`` (separate from GPTQ's calibration windows),
a clear error when the source is too short, and the held-out loss logged per step."""
import pytest
import torch

from orthoquant import pipeline, quantize_pretrained
from orthoquant.cli import main
from orthoquant.config import FitSpec
from orthoquant.data import calibration_windows, fitting_windows
from orthoquant.data.windows import encode
from orthoquant.errors import ConfigError
from orthoquant.fitting import loop
from test_fitting import QUANT, SMALL, session_for

from conftest import make_text
from helpers import token_windows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def other_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "fit.txt"
    path.write_text(make_text(200, seed=7))
    return path


def test_fit_windows_are_the_packed_stream_or_a_seeded_subset_of_it(tokenizer, other_text):
    stream = encode(tokenizer, other_text.read_text())
    every = fitting_windows(tokenizer, str(other_text), 0, 16)
    n = stream.numel() // 16
    assert every.shape == (n, 16) and torch.equal(every.flatten(), stream[:n * 16])
    some = fitting_windows(tokenizer, str(other_text), 5, 16, seed=3)
    rows = [next(i for i in range(n) if torch.equal(every[i], w)) for w in some]
    assert len(set(rows)) == 5 and rows == sorted(rows)  # distinct packed windows, in stream order
    assert not torch.equal(some, fitting_windows(tokenizer, str(other_text), 5, 16, seed=4))


def test_a_fit_source_different_from_the_calibration_source_is_the_one_used(
        saved_model, tokenizer, text_file, other_text, tmp_path, monkeypatch):
    seen = []
    real = pipeline.fit_transforms
    monkeypatch.setattr(pipeline, "fit_transforms", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    recipe = pipeline.Recipe(**QUANT, fitting=FitSpec(steps=1, **SMALL)).with_overrides(
        [f"calibration.source={text_file}", "calibration.nsamples=4", "calibration.seqlen=16",
         f"fitting.source={other_text}", "fitting.nsamples=6", "fitting.seqlen=12"])
    quantize_pretrained(str(saved_model("llama")), recipe, tmp_path / "run", CPU)
    expected = fitting_windows(tokenizer, str(other_text), 6, 12, seed=0)
    assert len(seen) == 1 and torch.equal(seen[0], expected)
    calib = calibration_windows(tokenizer, str(text_file), 4, 16, 0)
    assert seen[0].shape != calib.shape  # the fit did not train on GPTQ's windows
    assert not torch.equal(expected, fitting_windows(tokenizer, str(text_file), 6, 12, seed=0))


def test_a_fit_source_too_short_for_its_windows_exits_2_before_anything_is_written(
        saved_model, text_file, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(make_text(2, seed=9))
    out, model = tmp_path / "run", saved_model("llama")
    capsys.readouterr()  # saving the model reports progress
    args = ["quantize", str(model), "--recipe", "ostquant-w4a4kv4", "--calib", str(text_file),
            "--nsamples", "4", "--seqlen", "16", "--out", str(out), "--device", "cpu",
            "--set", f"fitting.source={short}", "--set", "fitting.nsamples=50", "--set", "fitting.seqlen=16"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fitting source" in err[0] and "fitting.nsamples = 50" in err[0]
    assert not (out / "run.json").exists()


def test_the_held_out_loss_is_logged_after_every_step_on_windows_the_fit_never_trains_on(monkeypatch):
    windows = token_windows(5, 16, 5)
    trained_on = []
    real = loop.accumulate_gradients
    monkeypatch.setattr(loop, "accumulate_gradients", lambda s, w, step: trained_on.append(w) or real(s, w, step))
    fit = FitSpec(**{**SMALL, "eval_samples": 1}, steps=3, lr_rotation=0.05, schedule="constant")
    report = loop.train(session_for(fit), windows)
    assert len(report["eval_losses"]) == 3 and all(v > 0 for v in report["eval_losses"])
    assert all(torch.equal(w, windows[:4]) for w in trained_on)
    assert len(set(report["eval_losses"])) == 3  # measured anew after each step
    with pytest.raises(ConfigError, match="eval_samples=5"):
        loop.train(session_for(FitSpec(**{**SMALL, "eval_samples": 5}, steps=1)), windows)
