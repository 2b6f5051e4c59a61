"""The layer-wise runner: weights on the grid, fake-quant attached, resume equals uninterrupted,
streamed evaluation equals in-memory evaluation, run folders reload bit-exactly."""
import pytest
import torch

from orthoquant import open_run, quantize
from orthoquant.autoscale import resolve_auto_scales
from orthoquant.config import QuantSpec, Recipe
from orthoquant.recipes import load_recipe
from orthoquant.evaluate.ppl import perplexity, streamed_perplexity
from orthoquant.formats import make_format
from orthoquant.models.tiny import FAMILIES, tiny_model

from helpers import assert_same_run_files, interrupt_then_resume, token_windows

CPU = torch.device("cpu")



def recipe(name="rtn-w4a4kv4", *sets):
    return load_recipe(name, ["calibration.batch_size=4", *sets])


def on_grid(weight, spec):
    fmt = make_format(spec)
    return torch.equal(fmt.quantize_dequantize(weight.float()), weight.float())


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_weights_lie_on_the_grid_and_quantizers_are_attached(family):
    model = tiny_model(family)
    ref = model(token_windows(8, 24)).logits
    # without clip search the row max sits on the grid, so a second quantization is the identity
    r = recipe("rtn-w4a4kv4", "weights.clip_search=false")
    quantize(model, r, token_windows(8, 24))
    spec = resolve_auto_scales(r, torch.float32).weights  # scale_dtype: auto, as quantize resolved it
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            assert on_grid(module.weight.detach(), spec), name
            assert module.orthoquant_inputs.quantizer is not None, name
    assert not on_grid(model.lm_head.weight.detach(), spec)  # lm_head stays in full precision
    assert model.model.layers[0].self_attn.orthoquant_kv is not None
    with torch.no_grad():
        out = model(token_windows(8, 24)).logits
    assert 1e-3 < (out - ref).abs().max() < 10 * ref.abs().max()


def test_fp16_recipe_only_folds_and_keeps_the_function():
    model = tiny_model("qwen3")
    with torch.no_grad():
        ref = model(token_windows(8, 24)).logits
        quantize(model, recipe("fp16"), token_windows(8, 24))
        out = model(token_windows(8, 24)).logits
    assert (out - ref).abs().max() < 1e-4


def test_activation_quantizer_changes_outputs_only_where_targeted():
    base = tiny_model("llama")
    a_only = Recipe(activations=QuantSpec(bits=4), calibration=recipe().calibration)
    model = quantize(tiny_model("llama"), a_only, token_windows(8, 24))
    with torch.no_grad():
        assert (model(token_windows(8, 24)).logits - base(token_windows(8, 24)).logits).abs().max() > 1e-3
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight,
                       base.model.layers[1].mlp.down_proj.weight)  # weights untouched


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    # GPTQ depends on each layer's calibration inputs, so a resume that propagates differently shows
    r = recipe("rtn-w4a4kv4", "solver.name=gptq")
    full = quantize(tiny_model("qwen2", num_hidden_layers=4), r, token_windows(8, 24), out=tmp_path / "full")

    def two_layers_stored():
        stored = sorted(p.name for p in (tmp_path / "resumed" / "layers").iterdir())
        assert stored == ["00000.safetensors", "00001.safetensors"]

    resumed = interrupt_then_resume(
        lambda: quantize(tiny_model("qwen2", num_hidden_layers=4), r, token_windows(8, 24), out=tmp_path / "resumed"),
        monkeypatch, check_interrupted=two_layers_stored)
    with torch.no_grad():  # quantizer hooks are not in the state dict: compare the function too
        assert torch.equal(full(token_windows(8, 24, 3)).logits, resumed(token_windows(8, 24, 3)).logits)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert_same_run_files(tmp_path / "full", tmp_path / "resumed", 4)


def test_run_folder_reloads_bit_exactly_and_streams_the_same_numbers(tmp_path):
    model = quantize(tiny_model("qwen3", num_hidden_layers=3), recipe(), token_windows(8, 24), out=tmp_path / "run")
    w = token_windows(8, 24, 1)
    with torch.no_grad():
        ref = model(w).logits
    loaded, _, arch, source = open_run(tmp_path / "run", CPU)
    with torch.no_grad():
        assert torch.equal(loaded(w).logits, ref)
    in_memory = perplexity(loaded, w, CPU, batch_size=4)
    skeleton, _, arch, source = open_run(tmp_path / "run", CPU, stream=True)
    assert all(p.is_meta for p in skeleton.model.layers.parameters())
    streamed = streamed_perplexity(skeleton, arch, source, w, CPU, batch_size=4)
    assert streamed == pytest.approx(in_memory, rel=1e-6)


@pytest.fixture
def blockdense_solver():
    """A solver that moves each linear into a random block-dense basis before RTN, as WUSH does."""
    from orthoquant.solvers import SOLVERS, SolveResult, Solver
    from orthoquant.transforms.base import BlockDense

    def solve(W, H, fmt, spec):
        d = 16
        g = torch.Generator().manual_seed(W.shape[0] * 7 + W.shape[1])
        noise = torch.randn(W.shape[1] // d, d, d, generator=g, dtype=torch.float64)
        blocks = torch.eye(d, dtype=torch.float64) + 0.5 * noise / d**0.5  # well conditioned, far from I
        t = BlockDense(blocks)
        q = fmt.quantize(t.consumer(W.double()).float())
        return SolveResult(fmt.dequantize(q), q, 0.0, input_transform=t)

    SOLVERS.add("test-blockdense", Solver(solve, needs_hessian=False))
    yield "test-blockdense"
    SOLVERS._entries.pop("test-blockdense")


def test_solver_transforms_are_attached_saved_and_reloaded(tmp_path, blockdense_solver):
    base = tiny_model("qwen2")
    r = Recipe(weights=QuantSpec(bits=8), solver=recipe().solver.__class__(name=blockdense_solver),
               calibration=recipe().calibration)
    model = quantize(tiny_model("qwen2"), r, token_windows(8, 24), out=tmp_path / "run")
    w = token_windows(8, 24, 2)
    with torch.no_grad():
        ref, out = base(w).logits, model(w).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # INT8 in the transformed basis ≈ FP
    lin = model.model.layers[0].mlp.down_proj
    assert lin.orthoquant_inputs.stages["solver"]
    lin.orthoquant_inputs.set("solver", [])  # without the online half the function breaks
    with torch.no_grad():
        assert (model(w).logits - ref).abs().max() > 0.5
    loaded, *_ = open_run(tmp_path / "run", CPU)
    model = quantize(tiny_model("qwen2"), r, token_windows(8, 24), out=tmp_path / "run")  # resume: all layers stored
    with torch.no_grad():
        assert torch.equal(loaded(w).logits, out) and torch.equal(model(w).logits, out)


@pytest.mark.parametrize("preset", ["quarot-w4a16", "gptq-w4a16"])
def test_per_layer_relative_errors_are_measured_against_the_original_weights(preset, tmp_path):
    """Fused rotations leave v_proj and down_proj column-major; the error reference tr(W H Wᵀ) must
    still be the unquantized weight's (it read 1.0 when a solver wrote into W)."""
    import json

    quantize(tiny_model("llama"), recipe(preset), token_windows(8, 24), out=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "run.json").read_text())["metrics"]
    errors = {f"{i}.{name}": m["relative"] for i, layer in metrics.items() if i.isdigit()
              for name, m in layer["linears"].items()}
    assert any("v_proj" in n for n in errors) and any("down_proj" in n for n in errors)
    assert all(0 < e < 0.5 for e in errors.values()), errors
