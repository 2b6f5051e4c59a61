"""QuIP#'s fine-tuning on the small model trained in the session: in-layer fine-tuning lowers the 2-bit
E8P layer output error and the held-out KL from the same first codes, each stage's own loss goes down
(it would not if the loss were negated), fine-tuning off is today's run bit for bit, and the learned
signs and norms survive the run folder and the native export exactly."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from orthoquant import load_recipe, quantize
from orthoquant.config import Recipe
from orthoquant.errors import ConfigError
from orthoquant.export import export_run, load_quantized
from orthoquant.layerfile import read_module
from orthoquant.runfolder import RunFolder

from helpers import assert_same_run_files, interrupt_then_resume, kl_to, token_windows

BASE = ["calibration.batch_size=8", "solver.true_sequential=true"]  # the same group order with and without
CASES = {
    "off": ["finetune.layer_epochs=0", "finetune.e2e_epochs=0"],
    "layer": ["finetune.layer_epochs=5", "finetune.e2e_epochs=0"],
    "layer+e2e": ["finetune.layer_epochs=5", "finetune.e2e_epochs=2"],
}


@torch.no_grad()
def layer_error(model, reference, windows) -> float:
    """Relative MSE of the first decoder layer's output against the FP model's, on held-out windows."""
    a = model(windows, output_hidden_states=True).hidden_states[1]
    b = reference(windows, output_hidden_states=True).hidden_states[1]
    return float((a - b).square().sum() / b.square().sum())


@pytest.fixture(scope="module")
def runs(trained_data, tmp_path_factory):
    folder, calib, held_out = trained_data
    held_out = held_out[:200]
    fp = AutoModelForCausalLM.from_pretrained(folder)
    out = {}
    for name, sets in CASES.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        path = tmp_path_factory.mktemp(name) / "run"
        quantize(model, load_recipe("quip-e8p-2bit", BASE + sets), calib, out=path)
        out[name] = {"model": model, "path": path, "kl": kl_to(model, fp, held_out),
                     "layer": layer_error(model, fp, held_out), "metrics": RunFolder(path).info()["metrics"]}
    return out


def test_in_layer_finetuning_lowers_the_2bit_layer_output_error_and_the_held_out_kl(runs):
    """Same q/k/v codes (calibrated before any tuning), then tuned o/up/gate/down inputs."""
    assert runs["layer"]["layer"] < runs["off"]["layer"], {k: v["layer"] for k, v in runs.items()}
    assert runs["layer"]["kl"] < 0.9 * runs["off"]["kl"], {k: v["kl"] for k, v in runs.items()}
    first_codes = [read_module(r["path"] / "layers" / "00000.safetensors")[0]["self_attn.q_proj.qcodes"]
                   for r in (runs["off"], runs["layer"])]
    assert torch.equal(*first_codes)


def test_end_to_end_finetuning_lowers_its_held_out_loss_and_the_kl(runs):
    e2e = runs["layer+e2e"]["metrics"]["finetune_e2e"]
    assert e2e["best"] < e2e["start"] and e2e["best_epoch"] > 0, e2e
    assert runs["layer+e2e"]["kl"] < runs["layer"]["kl"], {k: v["kl"] for k, v in runs.items()}


def test_each_in_layer_stage_lowers_its_held_out_loss(runs):
    """Fails when the loss is negated: training then only raises it and the selection keeps the start."""
    stages = [s for layer in ("0", "1") for s in runs["layer"]["metrics"][layer]["finetune"].values()]
    assert len(stages) == 2 * 3  # after q/k/v, o and gate/up; not after down
    assert all(s["best"] < s["start"] for s in stages), stages
    norm = stored(runs["layer"]["path"])["00000.safetensors"][0]["post_attention_layernorm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm))  # folded to 1, then tuned (and stored)


def stored(path):
    return {f.name: read_module(f)[:2] for f in sorted((path / "layers").iterdir())}


def test_finetuning_off_is_todays_run_bit_for_bit(trained_data, tmp_path):
    """The preset with both stages at 0 against the same recipe without a finetune section (as written
    before it existed), in the preset's own single solve step."""
    folder, calib, _ = trained_data
    off = load_recipe("quip-e8p-2bit", ["calibration.batch_size=8", *CASES["off"]])
    today = off.to_dict()
    del today["finetune"]
    for name, recipe in (("off", off), ("today", Recipe.from_dict(today))):
        quantize(AutoModelForCausalLM.from_pretrained(folder), recipe, calib, out=tmp_path / name)
    mine, theirs = stored(tmp_path / "off"), stored(tmp_path / "today")
    assert mine.keys() == theirs.keys()
    for name in mine:
        (a, meta_a), (b, meta_b) = mine[name], theirs[name]
        assert meta_a == meta_b and a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_finetuned_signs_and_norms_are_stored_and_reload_bit_exactly(runs, trained_data, tmp_path):
    run = runs["layer+e2e"]
    tensors, _ = stored(run["path"])["00000.safetensors"]
    su = tensors["mlp.down_proj.input_transform.signs"]
    assert not torch.equal(su.abs(), torch.ones_like(su))  # real-valued now
    assert not torch.equal(tensors["input_layernorm.weight"], torch.ones_like(tensors["input_layernorm.weight"]))
    export_run(run["path"], tmp_path / "native", "native")
    ids = trained_data[2][:4]
    with torch.no_grad():
        assert torch.equal(run["model"](ids).logits, load_quantized(tmp_path / "native")(ids).logits)


@pytest.mark.parametrize("sets, field", [
    (["solver.name=ldlq"], "solver"),
    (["finetune.holdout=1.0"], "holdout"),
    (["finetune.lr=0"], "finetune.lr"),
    (["calibration.nsamples=1"], "nsamples"),
])
def test_finetune_settings_are_checked(sets, field):
    with pytest.raises(ConfigError, match=field):
        load_recipe("quip-e8p-2bit", sets)


def test_resume_with_finetuning_equals_uninterrupted(tmp_path, monkeypatch):
    """A resumed layer's FP outputs are recomputed from its FP weights, so the FP stream, the tuning of
    later layers and the end-to-end stage (over resumed and fresh layers alike) are the same."""
    from orthoquant.models.tiny import tiny_model

    r = load_recipe("quip-e8p-2bit", ["calibration.batch_size=4", "finetune.layer_epochs=2", "finetune.e2e_epochs=1"])
    tokens = token_windows(8, 24)
    quantize(tiny_model("llama", num_hidden_layers=3), r, tokens, out=tmp_path / "full")
    interrupt_then_resume(lambda: quantize(tiny_model("llama", num_hidden_layers=3), r, tokens,
                                           out=tmp_path / "resumed"), monkeypatch)
    assert_same_run_files(tmp_path / "full", tmp_path / "resumed", 3, rest=False)


@pytest.mark.parametrize("tune_head", [False, True])
def test_end_to_end_trains_lm_head_only_when_asked_and_stores_it(tune_head, tmp_path):
    from safetensors.torch import load_file

    from orthoquant.models.tiny import tiny_model

    r = load_recipe("quip-e8p-2bit", ["calibration.batch_size=4", "finetune.layer_epochs=0", "finetune.e2e_epochs=2",
                                      f"finetune.tune_lm_head={str(tune_head).lower()}", "finetune.e2e_lr=0.001"])
    tokens = token_windows(8, 24)
    untuned = quantize(tiny_model("llama"), r.with_overrides(["finetune.e2e_epochs=0"]), tokens).lm_head.weight
    model = quantize(tiny_model("llama"), r, tokens, out=tmp_path / "run")
    assert torch.equal(model.lm_head.weight, untuned) != tune_head  # (the final norm is folded into both)
    assert torch.equal(load_file(tmp_path / "run" / "rest.safetensors")["lm_head.weight"], model.lm_head.weight)


def finetune_cli(model, calib, out, *sets):
    args = ["quantize", str(model), "--recipe", "quip-e8p-2bit", "--calib", str(calib), "--nsamples", "6",
            "--seqlen", "32", "--out", str(out), "--device", "cpu"]
    for s in ("calibration.batch_size=3", "finetune.layer_epochs=1", "finetune.e2e_epochs=1", *sets):
        args += ["--set", s]
    return args


def test_finetune_source_is_the_data_fine_tuning_trains_on(saved_model, text_file, tmp_path, monkeypatch):
    """finetune.source/nsamples/seqlen: the in-layer FP stream and the end-to-end stage start from those
    windows (here 9 of 24 tokens), while GPTQ's calibration keeps its own (6 of 32)."""
    from orthoquant.cli import main
    from orthoquant.finetune.layer import LayerFinetune
    import orthoquant.runner as runner

    other = tmp_path / "devset.txt"
    other.write_text(" ".join(f"tune{i % 97}" for i in range(4000)))
    seen = {}
    init, e2e = LayerFinetune.__init__, runner.finetune_end_to_end

    def record_init(self, recipe, arch, device, inputs):
        seen["layer"] = [tuple(h.shape[:2]) for h in inputs.hidden]
        init(self, recipe, arch, device, inputs)

    def record_e2e(model, arch, layers, inputs, *rest):
        seen["e2e"] = [tuple(h.shape[:2]) for h in inputs.hidden]
        return e2e(model, arch, layers, inputs, *rest)

    monkeypatch.setattr(LayerFinetune, "__init__", record_init)
    monkeypatch.setattr(runner, "finetune_end_to_end", record_e2e)
    sets = (f"finetune.source={other}", "finetune.nsamples=9", "finetune.seqlen=24")
    assert main(finetune_cli(saved_model("llama"), text_file, tmp_path / "run", *sets)) == 0
    assert seen["layer"] == seen["e2e"] == [(3, 24), (3, 24), (3, 24)]
    seen.clear()
    assert main(finetune_cli(saved_model("llama"), text_file, tmp_path / "run-calib")) == 0
    assert seen["layer"] == seen["e2e"] == [(3, 32), (3, 32)]  # default: the calibration windows


def test_a_finetune_source_too_short_is_exit_2_before_anything_is_written(saved_model, text_file, tmp_path, capsys):
    from orthoquant.cli import main

    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    sets = (f"finetune.source={short}", "finetune.nsamples=9", "finetune.seqlen=24")
    assert main(finetune_cli(saved_model("llama"), text_file, tmp_path / "run", *sets)) == 2
    assert "short.txt" in capsys.readouterr().err and not (tmp_path / "run").exists()
