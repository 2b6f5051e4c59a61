"""Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj held as their parts, partial rotary (Phi-4-mini).
Phi-3 itself is in FAMILIES, so every site alone and together is also checked by test_transforms.py."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from orthoquant import open_run
from orthoquant.cli import main
from orthoquant.config import Recipe, TransformSpec
from orthoquant.recipes import load_recipe
from orthoquant.export import export_run
from orthoquant.formats import make_format
from orthoquant.models.fused import FusedLinear, split_fused_
from orthoquant.models.generic import spec_for
from orthoquant.models.tiny import tiny_model
from orthoquant.pipeline import quantize, quantize_pretrained
from orthoquant.solvers import SOLVERS

from helpers import assert_same_run_files, interrupt_then_resume, relative, token_windows

CPU = torch.device("cpu")
SITES = ("residual", "attn_value", "o_input", "down_input", "qk")
IDS = token_windows(2, 21)
CALIB = token_windows(2, 8, 1)
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def recipe(name, text_file, *sets):
    return load_recipe(name, [f"calibration.source={text_file}", "calibration.nsamples=8",
                              "calibration.seqlen=32", "calibration.batch_size=4", *sets])


@torch.no_grad()
def transformed(family, sites, dtype):
    model = tiny_model(family, dtype=dtype)
    ref = model(IDS).logits
    specs = tuple(TransformSpec(s, "random_hadamard" if s == "residual" else "hadamard", seed=2) for s in sites)
    quantize(model, Recipe(transforms=specs), CALIB)
    return relative(ref, model(IDS).logits)


@pytest.mark.parametrize("site", SITES)
def test_each_site_preserves_phi4_mini(site):
    assert transformed("phi4-mini", [site], torch.float32) < TOL[torch.float32]


@pytest.mark.parametrize("family", ["phi3", "phi4-mini"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_sites_together_preserve_the_function(family, dtype):
    assert transformed(family, SITES, dtype) < TOL[dtype]


def test_fused_linears_are_held_as_their_rows():
    model = tiny_model("phi4-mini")
    qkv, gate_up = model.model.layers[0].self_attn.qkv_proj.weight.clone(), model.model.layers[0].mlp.gate_up_proj.weight.clone()
    split_fused_(model, spec_for(model.config))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, FusedLinear)
    assert [attn.qkv_proj.q_proj.out_features, attn.qkv_proj.k_proj.out_features] == [64, 32]  # GQA: 4 and 2 heads
    assert torch.equal(torch.cat([attn.qkv_proj.q_proj.weight, attn.qkv_proj.k_proj.weight, attn.qkv_proj.v_proj.weight]), qkv)
    assert torch.equal(torch.cat([mlp.gate_up_proj.gate_proj.weight, mlp.gate_up_proj.up_proj.weight]), gate_up)


@pytest.mark.parametrize("solver", ["gptq", "rtn"])
def test_solving_the_parts_with_one_hessian_is_solving_the_fused_weight(solver):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3, 64)
    H, W = (x.T @ x).double() / 256, torch.randn(128, 64, generator=g)
    r = load_recipe(f"{solver}-w4a16", ["weights.group_size=32", "weights.scale_dtype=float32"]
                    + (["solver.act_order=true"] if solver == "gptq" else []))
    solve = lambda w: SOLVERS.get(r.solver.name).solve(w, H, make_format(r.weights), r.solver).weight  # noqa: E731
    assert torch.equal(solve(W), torch.cat([solve(W[:64]), solve(W[64:96]), solve(W[96:])]))


def test_streamed_checkpoint_reads_the_fused_rows(saved_model, text_file, tmp_path, tokenizer):
    folder = saved_model("phi4-mini")
    run = quantize_pretrained(str(folder), recipe("fp16", text_file), tmp_path / "run", CPU)
    model, *_ = open_run(run.path, CPU)
    stock = AutoModelForCausalLM.from_pretrained(folder)
    ids = token_windows(2, 32, 3, vocab=len(tokenizer))
    with torch.no_grad():
        assert relative(stock(ids).logits, model(ids).logits) < 1e-5


def test_gptq_beats_rtn_and_native_export_round_trips(saved_model, text_file, tmp_path):
    folder, losses = saved_model("phi4-mini"), {}
    for solver in ("rtn", "gptq"):
        run = quantize_pretrained(str(folder), recipe(f"quarot-w4a16", text_file, f"solver.name={solver}"),
                                  tmp_path / solver, CPU)
        losses[solver] = {k: v["loss"] for k, v in run.info()["metrics"]["0"]["linears"].items()}
        report = export_run(run.path, tmp_path / f"{solver}-native", "native")
        assert report["checks"]["load_quantized"]["bit_exact"]
    assert set(losses["gptq"]) == {"self_attn.qkv_proj.q_proj", "self_attn.qkv_proj.k_proj", "self_attn.qkv_proj.v_proj",
                                   "self_attn.o_proj", "mlp.gate_up_proj.gate_proj", "mlp.gate_up_proj.up_proj",
                                   "mlp.down_proj"}
    assert all(losses["gptq"][k] < losses["rtn"][k] for k in losses["rtn"]), losses


def test_resume_equals_uninterrupted(saved_model, text_file, tmp_path, monkeypatch):
    folder, r = saved_model("phi3", num_hidden_layers=3), recipe("quarot-w4a4kv4", text_file)
    quantize_pretrained(str(folder), r, tmp_path / "full", CPU)
    interrupt_then_resume(lambda: quantize_pretrained(str(folder), r, tmp_path / "resumed", CPU), monkeypatch)
    assert_same_run_files(tmp_path / "full", tmp_path / "resumed", 3)


def test_w4a16_compressed_tensors_reloads_in_stock_transformers(saved_model, text_file, tmp_path, tokenizer):
    run = quantize_pretrained(str(saved_model("phi4-mini")), recipe("gptq-w4a16-g128", text_file, "weights.group_size=32"),
                              tmp_path / "run", CPU)
    report = export_run(run.path, tmp_path / "ct", "compressed-tensors", verify="stock")
    assert report["checks"]["stock_transformers"]["bit_exact"]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert type(stock.model.layers[0].self_attn.qkv_proj).__name__ != "FusedLinear"  # the stock, fused module
    model, *_ = open_run(run.path, CPU)
    ids = token_windows(2, 32, 3, vocab=len(tokenizer))
    with torch.no_grad():
        assert relative(model(ids).logits, stock(ids).logits) <= 1e-5
    assert main(["export", str(run.path), "--format", "gptq", "--out", str(tmp_path / "gptq")]) == 2
