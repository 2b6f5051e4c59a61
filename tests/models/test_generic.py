"""The generic path: causal LMs without an ArchSpec (tiny GPT-2, OPT and Phi-1 with randomized norms and
biases) quantize with RTN and GPTQ, stream, resume, evaluate and export; transforms are refused."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from orthoquant import open_run
from orthoquant.cli import main
from orthoquant.recipes import load_recipe
from orthoquant.evaluate.ppl import perplexity, streamed_perplexity
from orthoquant.export import export_run
from orthoquant.models.generic import discover_input_groups, linearize_conv1d_
from orthoquant.models.generic import spec_for
from orthoquant.models.surgery import layers_of, linears_of
from orthoquant.models.tiny import GENERIC_FAMILIES, tiny_model
from orthoquant.pipeline import quantize_pretrained

from helpers import assert_same_run_files, interrupt_then_resume, token_windows

CPU = torch.device("cpu")


def recipe(name, text_file, *sets):
    return load_recipe(name, [f"calibration.source={text_file}", "calibration.nsamples=8",
                              "calibration.seqlen=32", "calibration.batch_size=4", *sets])



@pytest.mark.parametrize("family, layers", [("gpt2", "transformer.h"), ("opt", "model.decoder.layers"),
                                            ("phi", "model.layers")])
def test_layers_and_model_parts_are_found_from_the_module_tree(family, layers):
    model = tiny_model(family)
    arch = spec_for(model.config)
    assert arch.generic and arch.layers == layers
    assert model.get_submodule(arch.embed) is model.get_input_embeddings()
    assert model.get_submodule(arch.lm_head) is model.get_output_embeddings()
    linearize_conv1d_(model)
    every = {n for n, m in layers_of(model, arch)[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(dict(arch.linears)) == every and every


@torch.no_grad()
def test_conv1d_becomes_an_exact_linear():
    model = tiny_model("gpt2", dtype=torch.float64)
    tokens = token_windows(4, 32, 3)
    before = model(tokens).logits
    assert linearize_conv1d_(model)
    assert torch.equal(model(tokens).logits, before)


@pytest.mark.parametrize("family, shared", [
    ("opt", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),
    ("phi", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"}),  # parallel block
    ("gpt2", {"attn.c_attn"}),
])
def test_linears_reading_one_tensor_share_a_group(family, shared):
    model = tiny_model(family)
    linearize_conv1d_(model)
    arch = spec_for(model.config)
    groups = discover_input_groups(linears_of(layers_of(model, arch)[0], arch), lambda: model(token_windows(4, 32, 3)))
    assert shared in [set(g) for g in groups]
    assert sorted(n for g in groups for n in g) == sorted(dict(arch.linears))  # each linear once


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_rtn_and_gptq_quantize_evaluate_and_export(family, saved_model, text_file, tmp_path, tokenizer):
    folder = saved_model(family)
    tokens = token_windows(4, 32, 3, vocab=len(tokenizer))
    fp = perplexity(AutoModelForCausalLM.from_pretrained(folder), tokens, CPU, batch_size=4)
    losses = {}
    for solver in ("rtn", "gptq"):
        run = quantize_pretrained(str(folder), recipe(f"{solver}-w4a16", text_file), tmp_path / solver, CPU)
        losses[solver] = {k: v["loss"] for k, v in run.info()["metrics"]["0"]["linears"].items()}
        model, _, arch, _ = open_run(run.path, CPU)
        in_memory = perplexity(model, tokens, CPU, batch_size=4)
        assert in_memory != fp and in_memory < 2 * fp  # quantized, and still the model
        skeleton, _, arch, source = open_run(run.path, CPU, stream=True)
        assert streamed_perplexity(skeleton, arch, source, tokens, CPU, batch_size=4) == pytest.approx(in_memory, rel=1e-6)
        assert export_run(run.path, tmp_path / f"{solver}-native", "native")["checks"]["load_quantized"]["bit_exact"]
    assert losses["gptq"].keys() == losses["rtn"].keys()  # layer 0: both solved on the same inputs
    assert all(losses["gptq"][k] < losses["rtn"][k] for k in losses["rtn"]), losses


@pytest.mark.parametrize("family", ["opt", "phi"])
def test_compressed_tensors_reloads_in_stock_transformers(family, saved_model, text_file, tmp_path, tokenizer):
    run = quantize_pretrained(str(saved_model(family)), recipe("gptq-w4a16", text_file), tmp_path / "run", CPU)
    export_run(run.path, tmp_path / "ct", "compressed-tensors", verify="stock")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    model, *_ = open_run(run.path, CPU)
    tokens = token_windows(4, 32, 3, vocab=len(tokenizer))
    with torch.no_grad():
        a, b = model(tokens).logits, stock(tokens).logits
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5


def test_gpt2_conv1d_exports_only_natively(saved_model, text_file, tmp_path):
    run = quantize_pretrained(str(saved_model("gpt2")), recipe("rtn-w4a16", text_file), tmp_path / "run", CPU)
    assert main(["export", str(run.path), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("preset, lacks", [("quarot-w4a16", "transforms"), ("rtn-w4a4kv4", "KV-cache"),
                                           ("round-w4a16-g128", "learned rounding"),
                                           ("quip-e8p-2bit", "QuIP# fine-tuning")])
def test_transform_or_kv_recipe_names_the_missing_spec(preset, lacks, saved_model, text_file, tmp_path, capsys):
    folder = saved_model("opt")
    code = main(["quantize", str(folder), "--recipe", preset, "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "32", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and lacks in err and "no arch spec" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "run").exists()


def test_eval_command_reads_a_generic_run(saved_model, text_file, tmp_path):
    run = quantize_pretrained(str(saved_model("phi")), recipe("rtn-w8a8", text_file), tmp_path / "run", CPU)
    out = tmp_path / "eval.json"
    assert main(["eval", str(run.path), "--ppl", str(text_file), "--seqlen", "32", "--max-windows", "4",
                 "--json", str(out)]) == 0
    assert out.is_file()


def test_resume_equals_uninterrupted(saved_model, text_file, tmp_path, monkeypatch):
    folder, r = saved_model("gpt2", n_layer=3), recipe("gptq-w4a16", text_file)
    quantize_pretrained(str(folder), r, tmp_path / "full", CPU)
    interrupt_then_resume(lambda: quantize_pretrained(str(folder), r, tmp_path / "resumed", CPU), monkeypatch)
    assert_same_run_files(tmp_path / "full", tmp_path / "resumed", 3)

