"""Quality on a small model trained inside the session: quantizers are really attached and the
methods rank as they should. Margins are on the perplexity *increase over FP* (what quantization
costs), which is deterministic for the presets' seeds."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from orthoquant import load_recipe, quantize
from orthoquant.autoscale import resolve_auto_scales
from orthoquant.evaluate.ppl import perplexity
from orthoquant.formats import make_format

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(trained_data):
    return trained_data


def run(setup, recipe=None, *sets):
    folder, calib, held_out = setup
    model = AutoModelForCausalLM.from_pretrained(folder)
    if recipe is not None:
        quantize(model, load_recipe(recipe, ["calibration.batch_size=8", *sets]), calib)
    return model, perplexity(model, held_out, CPU, batch_size=16)


@pytest.fixture(scope="module")
def fp(setup):
    return run(setup)


def test_rtn_w8_is_within_one_percent_but_really_quantized(setup, fp):
    fp_model, fp_ppl = fp
    model, ppl = run(setup, "rtn-w4a16", "weights.bits=8", "weights.clip_search=false")
    assert abs(ppl / fp_ppl - 1) < 0.01
    ids = setup[2][:2]
    with torch.no_grad():
        assert (model(ids).logits - fp_model(ids).logits).abs().max() > 1e-4  # not a no-op
    recipe = load_recipe("rtn-w4a16", ["weights.bits=8", "weights.clip_search=false"])
    fmt = make_format(resolve_auto_scales(recipe, torch.float32).weights)  # scale_dtype: auto, as quantized
    for layer in model.model.layers:
        w = layer.mlp.down_proj.weight.detach()
        assert torch.equal(fmt.quantize_dequantize(w), w)  # on the INT8 grid


def test_quarot_costs_far_less_than_rtn_at_w4a4kv4(setup, fp):
    _, fp_ppl = fp
    _, rtn = run(setup, "rtn-w4a4kv4")
    _, quarot = run(setup, "quarot-w4a4kv4")
    assert rtn > fp_ppl * 1.004  # W4A4KV4 without rotations measurably hurts
    assert quarot - fp_ppl < 0.5 * (rtn - fp_ppl)


def total_layer_loss(folder, calib, recipe, out, *sets):
    """Sum over layers and linears of tr(ΔW H ΔWᵀ) as the runner recorded it."""
    import json

    model = AutoModelForCausalLM.from_pretrained(folder)
    quantize(model, load_recipe(recipe, ["calibration.batch_size=8", *sets]), calib, out=out)
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    return sum(v["loss"] for layer in metrics.values() for v in layer["linears"].values())


def test_gptq_lowers_the_layer_loss_it_optimizes_at_3_bits(setup, fp, tmp_path):
    # Held-out perplexity of this 64-wide model barely separates GPTQ from RTN at W3 g32 (measured
    # +0.256 vs +0.308 over FP 53.386): assert GPTQ's own objective on real activations, and that its
    # perplexity stays close to FP.
    folder, calib, _ = setup
    sets = ("weights.bits=3", "weights.group_size=32")
    rtn = total_layer_loss(folder, calib, "rtn-w4a16", tmp_path / "rtn", *sets)
    gptq = total_layer_loss(folder, calib, "gptq-w4a16", tmp_path / "gptq", *sets)
    assert gptq < 0.7 * rtn
    _, ppl = run(setup, "gptq-w4a16", *sets)
    assert ppl < fp[1] * 1.03
