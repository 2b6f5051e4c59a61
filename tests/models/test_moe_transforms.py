"""Qwen3-MoE and Mixtral in full: the router reads the residual stream (R1, the norm's γ and S_ffn fold into
it, and it stays in full precision), every expert's gate/up reads it and its down writes it, R4 and S_up_down
act per expert; KV quantization, the rotation presets end to end and a learned fit."""
from __future__ import annotations

import json
import math

import pytest
import torch

from orthoquant import open_run
from orthoquant.cli import main
from orthoquant.config import FitSpec, QuantSpec, Recipe, TransformSpec
from orthoquant.recipes import load_recipe
from orthoquant.errors import UserError
from orthoquant.evaluate.run_eval import evaluate
from orthoquant.export import export_run
from orthoquant.fakequant.inputs import input_pipeline
from orthoquant.fitting.step import LayerMajorStep
from orthoquant.models.layout import to_layout_
from orthoquant.models.generic import spec_for
from orthoquant.models.tiny import tiny_model
from orthoquant.pipeline import quantize, quantize_pretrained
from orthoquant.transforms.base import Diagonal
from orthoquant.transforms.sites import Dims, site_of

from helpers import deployed_logits, random_fit_session, random_learned, relative, token_windows

CPU = torch.device("cpu")
MOE = ("qwen3-moe", "mixtral")
BIASES = {"qwen3-moe": {"attention_bias": True}, "mixtral": {}}  # Mixtral's linears have no bias option
SITES = ("residual", "attn_value", "o_input", "down_input", "qk")
OST = ("R_res", "R_ov", "S_attn", "S_ffn", "S_ov", "S_qk", "S_up_down")
ONLINE = (TransformSpec("qk"), TransformSpec("down_input"))
IDS = token_windows(2, 21)
CALIB = token_windows(4, 12, 1)
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def reference(family, dtype=torch.float32):
    """A tiny MoE with randomized norms (and biases), its experts held per expert (the stock stacked
    experts run no float64), and its logits."""
    model = tiny_model(family, dtype=dtype, **BIASES[family])
    to_layout_(model, spec_for(model.config))
    with torch.no_grad():
        return model, model(IDS).logits


@torch.no_grad()
def transformed(family, sites, dtype):
    model, ref = reference(family, dtype)
    specs = tuple(TransformSpec(s, "random_hadamard" if s == "residual" else "hadamard", seed=2) for s in sites)
    quantize(model, Recipe(transforms=specs), CALIB)
    return relative(ref, model(IDS).logits)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", MOE)
def test_each_site_preserves_the_function(family, site):
    assert transformed(family, [site], torch.float32) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", MOE)
def test_all_sites_together_preserve_the_function(family, dtype):
    assert transformed(family, SITES, dtype) < TOL[dtype]


@pytest.mark.parametrize("site, moved", [("residual", ("gate_proj", "up_proj", "down_proj", "router")),
                                         ("mlp_norm", ("gate_proj", "up_proj", "router")),
                                         ("up_down", ("up_proj", "down_proj")), ("down_input", ("down_proj",))])
def test_the_mlp_sites_fold_into_every_expert_and_the_router(site, moved):
    """Function preservation cannot see an expert the fold skipped (its own pair, or nothing, is as exact)."""
    model, _ = reference("qwen3-moe")
    arch, dims, layer = spec_for(model.config), Dims.of(model.config), model.model.layers[0]
    before = {n: p.detach().clone() for n, p in layer.named_parameters() if n.startswith("mlp.")}
    scale = torch.rand(site_of(site).width(dims), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    site_of(site).fuse(layer, arch, dims, Diagonal(scale + 0.5))
    changed = {n for n, p in layer.named_parameters() if n in before and not torch.equal(p, before[n])}
    experts = {f"mlp.experts.{e}.{leaf}.weight" for e in range(len(layer.mlp.experts)) for leaf in moved}
    assert changed == {n for n in experts if "router" not in n} | ({"mlp.gate.weight"} if "router" in moved else set())


def deployed(model, recipe, transforms):
    return deployed_logits(model, recipe, transforms, CALIB, IDS)


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("dtype, names", [(torch.float32, OST),  # float32 rotations: orthogonal to ~1e-7
                                          (torch.float64, tuple(n for n in OST if n.startswith("S_")))])
def test_learned_rotations_and_scales_at_every_site_preserve_the_function(family, dtype, names):
    model, ref = reference(family, dtype)
    learned = random_learned(model, names).frozen()
    assert {site for site, _ in learned} >= {"mlp_norm", "up_down"}  # S_ffn (router too), S_up_down per expert
    assert relative(ref, deployed(model, Recipe(transforms=ONLINE), learned)) < TOL[dtype]


QUANTIZED = dict(weights=QuantSpec(bits=4, clip_search=True), activations=QuantSpec(bits=4, symmetric=False),
                 kv_cache=QuantSpec(bits=4, symmetric=False), transforms=ONLINE)


@pytest.mark.parametrize("family", MOE)
def test_fitting_time_forward_equals_the_deployed_forward(family):
    """The fit folds every expert and the router on the fly, as deployment folds them in place."""
    recipe = Recipe(**QUANTIZED, fitting=FitSpec(train_weights=True, qsur_samples=0))
    session = random_fit_session(reference(family, torch.float64)[0], recipe, OST)
    fitting = LayerMajorStep(session, [IDS]).logits(quantized=True)[0]
    transforms = session.learned.frozen()
    model, ref = reference(family, torch.float64)
    out = deployed(model, recipe, transforms)
    assert relative(fitting, out) < 1e-6  # fake-quant rounds in float32
    assert relative(ref, out) > 1e-3  # the quantizers really act


def run_recipe(name, text_file, *sets):
    return load_recipe(name, [f"calibration.source={text_file}", "calibration.nsamples=8", "calibration.seqlen=32",
                              "calibration.batch_size=4", *sets])


@pytest.mark.parametrize("family, preset", [("qwen3-moe", "quarot-w4a4kv4"), ("mixtral", "spinquant-had-w4a4kv4")])
def test_rotation_presets_run_end_to_end(family, preset, saved_model, text_file, tmp_path):
    folder = saved_model(family, **BIASES[family])
    run = quantize_pretrained(str(folder), run_recipe(preset, text_file), tmp_path / "run", CPU)
    result = evaluate(str(run.path), [str(text_file)], 32, CPU, max_windows=4)
    assert math.isfinite(result["ppl"][text_file.name])
    assert export_run(run.path, tmp_path / "native", "native")["checks"]["load_quantized"]["bit_exact"]
    model, *_ = open_run(run.path, CPU)
    for layer in model.model.layers:
        assert layer.self_attn.orthoquant_kv is not None  # KV cache quantized
        for expert in layer.mlp.experts:  # R4 online on every expert, then its A4 quantizer
            stages = input_pipeline(expert.down_proj)
            assert len(stages.stages["plan"]) == 1 and stages.quantizer is not None
    # the router is kept in full precision: exactly the weight the recipe's transforms alone give it
    alone = Recipe(transforms=load_recipe(preset).transforms).with_overrides(
        [f"calibration.source={text_file}", "calibration.nsamples=2", "calibration.seqlen=32"])
    fp = quantize_pretrained(str(folder), alone, tmp_path / "fp", CPU)
    rotated, *_ = open_run(fp.path, CPU)
    for layer, reference_layer in zip(model.model.layers, rotated.model.layers):
        assert torch.equal(layer.mlp.gate.weight, reference_layer.mlp.gate.weight)


def test_a_learned_fit_runs_and_reports_its_metrics(tmp_path):
    sets = ["fitting.steps=2", "fitting.batch_size=2", "fitting.grad_accum=1", "fitting.top_k=20",
            "fitting.qsur_samples=2", "fitting.eval_samples=1", "overrides=[]", "calibration.nsamples=4",
            "calibration.seqlen=16"]
    windows = token_windows(8, 16, 2)
    quantize(tiny_model("qwen3-moe"), load_recipe("ostquant-w4a4kv4", sets), windows, out=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "run.json").read_text())["metrics"]["fitting"]
    assert len(metrics["losses"]) == 2 and metrics["orthogonality_error"] < 1e-5
    assert set(metrics["qsur_after"]) == {"qkv", "o", "gate_up", "down"}  # the experts' inputs, pooled


@pytest.mark.parametrize("family", MOE)
def test_fitted_transforms_fold_exactly(family):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(IDS).logits
    fit = FitSpec(params=OST, steps=2, batch_size=2, grad_accum=1, top_k=20, qsur_samples=0, eval_samples=0)
    quantize(model, Recipe(fitting=fit), CALIB)  # no quantizer: the learned transforms alone
    with torch.no_grad():
        assert relative(ref, model(IDS).logits) < 1e-4


def test_a_moe_with_dense_mlp_layers_is_generic_and_a_transform_is_refused_saying_why(saved_model, text_file,
                                                                                      tmp_path, capsys):
    folder = saved_model("qwen3-moe", mlp_only_layers=[1])
    capsys.readouterr()
    args = ["quantize", str(folder), "--recipe", "quarot-w4a16", "--calib", str(text_file), "--nsamples", "2",
            "--seqlen", "16", "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dense MLP layers" in err[0] and "mlp_only_layers" in err[0]
    assert not (tmp_path / "run" / "run.json").exists()


def test_fused_rotations_export_to_compressed_tensors_and_an_online_r4_is_refused(tmp_path):
    windows = token_windows(8, 16, 2)
    sets = ["calibration.nsamples=4", "calibration.seqlen=16", "weights.group_size=32"]
    quantize(tiny_model("qwen3-moe"), load_recipe("quarot-w4a16", sets), windows, out=tmp_path / "fused")
    report = export_run(tmp_path / "fused", tmp_path / "ct", "compressed-tensors", verify="stock")
    assert report["checks"]["stock_transformers"]["bit_exact"]  # R1 in the router and experts, stock loader
    online = sets + ["transforms=[{site: residual, kind: random_hadamard}, {site: down_input, kind: hadamard}]"]
    quantize(tiny_model("qwen3-moe"), load_recipe("quarot-w4a16", online), windows, out=tmp_path / "online")
    with pytest.raises(UserError, match="every expert's down_proj.*--format native"):
        export_run(tmp_path / "online", tmp_path / "ct-online", "compressed-tensors")
    assert not (tmp_path / "ct-online").exists()
