"""Gemma 2 / Gemma 3 (text): (1 + γ) norms, sandwich norms, √hidden embeddings, tied embeddings,
query_pre_attn_scalar, sliding windows shorter than the windows tested, soft-capping (Gemma 2), q/k
norms (Gemma 3). The residual rotation is refused; every other Hadamard site is exact."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from orthoquant import open_run
from orthoquant.cli import main
from orthoquant.config import Recipe, TransformSpec
from orthoquant.recipes import load_recipe
from orthoquant.errors import UserError
from orthoquant.evaluate.ppl import perplexity, streamed_perplexity
from orthoquant.export import export_run
from orthoquant.layerwise import capture_inputs
from orthoquant.models.layout import to_layout_
from orthoquant.models.generic import spec_for
from orthoquant.models.surgery import layers_of
from orthoquant.models.tiny import tiny_model
from orthoquant.pipeline import quantize, quantize_pretrained

from helpers import assert_same_run_files, interrupt_then_resume, relative, token_windows

CPU = torch.device("cpu")
FAMILIES = ("gemma2", "gemma3")
SITES = ("attn_value", "o_input", "down_input", "qk")
IDS = token_windows(2, 21)  # longer than the window (8)
CALIB = token_windows(2, 16, 1)
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# the strongest rotation recipe Gemma allows: QuaRot's R2, R3, R4 (and o_proj's input) without R1, GPTQ
ROTATED = [{"site": s, "kind": "hadamard"} for s in SITES]


def recipe(base, text_file):
    """A preset by name, or a recipe from a dict, calibrated on 8 windows of 32 tokens of ``text_file``."""
    cal = {"source": str(text_file), "nsamples": 8, "seqlen": 32, "batch_size": 4}
    if isinstance(base, str):
        return load_recipe(base, [f"calibration.{k}={v}" for k, v in cal.items()])
    return Recipe.from_dict({"name": "test", **base, "calibration": cal})


def rotated(solver, **extra):
    return {"transforms": ROTATED, "weights": {"format": "int", "bits": 4}, "solver": {"name": solver}, **extra}


@torch.no_grad()
def transformed(family, sites, dtype):
    model = tiny_model(family, dtype=dtype)
    ref = model(IDS).logits
    quantize(model, Recipe(transforms=tuple(TransformSpec(s, "hadamard") for s in sites)), CALIB)
    return relative(ref, model(IDS).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_each_allowed_site_preserves_the_function(family, site):
    assert transformed(family, [site], torch.float32) < TOL[torch.float32]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_allowed_sites_together_preserve_the_function(family, dtype):
    assert transformed(family, SITES, dtype) < TOL[dtype]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_plain_norms_hold_one_plus_gamma(family):
    model = tiny_model(family, dtype=torch.float64)
    gamma = model.model.layers[0].post_attention_layernorm.weight.clone()
    ref = model(IDS).logits
    to_layout_(model, spec_for(model.config))
    assert torch.equal(model.model.layers[0].post_attention_layernorm.weight, 1 + gamma)
    assert torch.equal(model(IDS).logits, ref)


def test_residual_rotation_is_refused_saying_why(saved_model, text_file, tmp_path, capsys):
    with pytest.raises(UserError, match="post-attention and post-feed-forward RMSNorms.*cannot fold exactly"):
        quantize(tiny_model("gemma3"), Recipe(transforms=(TransformSpec("residual", "hadamard"),)), CALIB)
    code = main(["quantize", str(saved_model("gemma2")), "--recipe", "quarot-w4a16", "--calib", str(text_file),
                 "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "run")])
    assert code == 2 and "residual" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_global_and_sliding_layers_keep_their_own_arguments():
    model = tiny_model("gemma3")
    to_layout_(model, spec_for(model.config))
    inputs = capture_inputs(model, spec_for(model.config), [IDS], CPU)
    layers = layers_of(model, spec_for(model.config))
    assert inputs.kwargs_for(layers[0]) is inputs.kwargs and layers[1] in inputs.by_layer
    local, full = inputs.kwargs_for(layers[0])[0], inputs.kwargs_for(layers[1])[0]
    full_mask = full["attention_mask"]  # causal (None: SDPA's is_causal) vs a window of 8 < 21 tokens
    assert local["attention_mask"] is not None and (full_mask is None or not torch.equal(local["attention_mask"], full_mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_checkpoint_and_perplexity_match_the_model(family, saved_model, text_file, tmp_path, tokenizer):
    folder = saved_model(family)
    stock = AutoModelForCausalLM.from_pretrained(folder)
    ids = token_windows(4, 32, 3, vocab=len(tokenizer))
    run = quantize_pretrained(str(folder), recipe("fp16", text_file), tmp_path / "fp", CPU)
    model, *_ = open_run(run.path, CPU)
    with torch.no_grad():
        assert relative(stock(ids).logits, model(ids).logits) < 1e-5  # (1 + γ) read, soft-caps, windows
    run = quantize_pretrained(str(folder), recipe(rotated("gptq"), text_file), tmp_path / "q", CPU)
    model, *_ = open_run(run.path, CPU)
    skeleton, _, arch, source = open_run(run.path, CPU, stream=True)
    assert streamed_perplexity(skeleton, arch, source, ids, CPU, 2) == pytest.approx(perplexity(model, ids, CPU, 2), rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_beats_rtn_and_native_export_round_trips(family, saved_model, text_file, tmp_path):
    folder, losses = saved_model(family), {}
    for solver in ("rtn", "gptq"):
        run = quantize_pretrained(str(folder), recipe(rotated(solver), text_file), tmp_path / solver, CPU)
        losses[solver] = {k: v["loss"] for k, v in run.info()["metrics"]["0"]["linears"].items()}
        assert export_run(run.path, tmp_path / f"{solver}-native", "native")["checks"]["load_quantized"]["bit_exact"]
    assert len(losses["gptq"]) == 7 and all(losses["gptq"][k] < losses["rtn"][k] for k in losses["rtn"]), losses


def test_resume_equals_uninterrupted(saved_model, text_file, tmp_path, monkeypatch):
    folder = saved_model("gemma3", num_hidden_layers=3,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    r = recipe(rotated("gptq", kv_cache={"format": "int", "bits": 8}), text_file)
    quantize_pretrained(str(folder), r, tmp_path / "full", CPU)
    interrupt_then_resume(lambda: quantize_pretrained(str(folder), r, tmp_path / "resumed", CPU), monkeypatch)
    assert_same_run_files(tmp_path / "full", tmp_path / "resumed", 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_w4a16_compressed_tensors_reloads_in_stock_transformers(family, saved_model, text_file, tmp_path, tokenizer):
    r = recipe({"transforms": [{"site": "attn_value", "kind": "hadamard"}], "solver": {"name": "gptq"},  # fused: no online part
                "weights": {"format": "int", "bits": 4, "group_size": 32}}, text_file)
    run = quantize_pretrained(str(saved_model(family)), r, tmp_path / "run", CPU)
    report = export_run(run.path, tmp_path / "ct", "compressed-tensors", verify="stock")
    assert report["checks"]["stock_transformers"]["bit_exact"]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")  # stock (1 + γ) norms read the stored γ
    model, *_ = open_run(run.path, CPU)
    ids = token_windows(2, 32, 3, vocab=len(tokenizer))
    with torch.no_grad():
        assert relative(model(ids).logits, stock(ids).logits) <= 1e-5


def test_a_multimodal_gemma3_checkpoint_quantizes_its_text_model(tokenizer, text_file, tmp_path):
    from transformers import Gemma3Config

    from orthoquant.models.tiny import tiny_config

    text = {k: v for k, v in tiny_config("gemma3", vocab_size=len(tokenizer)).to_dict().items()
            if k not in ("architectures", "model_type", "transformers_version")}
    config = Gemma3Config(text_config=text, mm_tokens_per_image=4, architectures=["Gemma3ForConditionalGeneration"],
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(0)
    multimodal = AutoModelForCausalLM.from_config(config).eval()  # as google/gemma-3-4b-it is laid out
    with torch.no_grad():
        for name, p in multimodal.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    multimodal.save_pretrained(tmp_path / "mm")
    tokenizer.save_pretrained(tmp_path / "mm")
    run = quantize_pretrained(str(tmp_path / "mm"), recipe("fp16", text_file), tmp_path / "run", CPU)
    model, *_ = open_run(run.path, CPU)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    ids = token_windows(2, 32, 3, vocab=len(tokenizer))
    with torch.no_grad():
        assert relative(multimodal(input_ids=ids).logits, model(ids).logits) < 1e-5
