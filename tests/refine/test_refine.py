"""Learned rounding by block reconstruction (``refine``): it lowers each layer's output error below the
solver's, keeps every weight on the format's grid, is off bit-exactly at ``iters: 0``, trains with the
recipe's activation quantizers in place, and resumes per layer."""
import json

import pytest
import torch

from orthoquant import open_run, quantize
from orthoquant.config import QuantSpec, SolverSpec
from orthoquant.recipes import load_recipe
from orthoquant.errors import ConfigError
from orthoquant.formats import make_format
from orthoquant.models.tiny import tiny_model
from orthoquant.refine import reconstruct as reconstruct_module
from orthoquant.refine.rounding import LinearRounding
from orthoquant.refine.stage import RefineStage
from orthoquant.solvers.gptq import solve_gptq

from helpers import tiny_run, token_windows

CPU = torch.device("cpu")
ITERS = 40
FORMATS = {  # weight settings over the rtn-w4a16 preset
    "int4-g32": ["weights.group_size=32"],
    "int3": ["weights.bits=3"],
    "mxfp4": ["weights.format=mxfp4", "weights.group_size=32", "weights.clip_search=false", "weights.scale_rule=spec"],
}



def trained(trained_data, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    folder, calib, _ = trained_data
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), calib[:16]


def layer_metrics(run):
    metrics = json.loads((run / "run.json").read_text())["metrics"]
    return [metrics[k]["refine"] for k in sorted(metrics) if k.isdigit()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_refinement_lowers_each_layers_reconstruction_loss(trained_data, tmp_path, fmt):
    model, calib = trained(trained_data)
    recipe = load_recipe("rtn-w4a16", [*FORMATS[fmt], f"refine.iters={ITERS}", "calibration.batch_size=8"])
    quantize(model, recipe, calib, out=tmp_path / "run")
    for m in layer_metrics(tmp_path / "run"):
        # the start is the RTN solution; steps against the gradient never beat it, and then the
        # solver's codes are kept (kept False)
        assert m["kept"] and m["best"] < 0.9 * m["start"], m


def test_adam_lowers_the_loss_too(trained_data, tmp_path):
    model, calib = trained(trained_data)
    recipe = load_recipe("rtn-w4a16", [f"refine.iters={ITERS}", "refine.optimizer=adam", "refine.lr=0.005"])
    quantize(model, recipe, calib, out=tmp_path / "run")
    assert all(m["kept"] and m["best"] < m["start"] for m in layer_metrics(tmp_path / "run"))


GRID_SPECS = [
    QuantSpec(bits=4, group_size=16),
    QuantSpec(bits=3, symmetric=False, group_size=-1),
    QuantSpec(bits=2, symmetric=False, group_size=16, clip_search=True),
    QuantSpec(bits=4, group_size=16, scale_dtype="float16"),
    QuantSpec(bits=4, group_size=16, scale_dtype="bfloat16"),
    QuantSpec(bits=3, symmetric=False, group_size=16, scale_dtype="bfloat16"),
    QuantSpec(format="mxfp4", bits=4, group_size=32),
    QuantSpec(format="mxfp4", bits=4, group_size=32, scale_rule="three_quarters"),
    QuantSpec(format="nvfp4", bits=4, group_size=16),
]


@pytest.mark.parametrize("spec", GRID_SPECS,
                         ids=lambda s: f"{s.format}{s.bits}-{s.symmetric}-{s.group_size}-{s.scale_dtype}")
def test_learned_weights_are_exactly_what_their_codes_decode_to(spec):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 64, generator=g)
    fmt = make_format(spec)
    q = fmt.quantize(W)
    r = LinearRounding(fmt, q, W)
    assert torch.equal(r().detach(), fmt.dequantize(q))  # the start is the solver's
    with torch.no_grad():  # anywhere inside the bounds
        r.offset.uniform_(-0.7, 0.7, generator=g)
        for a in r.alphas:
            a.uniform_(0.3, 1.7, generator=g)
    r.project_()
    learned, stored = r().detach(), r.quantized()
    assert torch.equal(learned, fmt.dequantize(stored))
    assert not torch.equal(stored.codes, q.codes)
    # every weight is one of the two grid points around its anchor: at most one step from the solver's
    # code at the solver's scale (the anchor lies in that code's cell)
    same_scale = LinearRounding(fmt, q, W)
    with torch.no_grad():
        same_scale.offset.copy_(r.offset)
    moved = same_scale.grid.indices(same_scale.quantized().codes) - same_scale.grid.indices(q.codes)
    assert moved.abs().max() <= 1


def test_act_order_groups_are_followed():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    fmt = make_format(QuantSpec(bits=4, group_size=16))
    X = torch.randn(256, 64, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 64)
    res = solve_gptq(W, (X.T @ X / 256).double(), fmt, SolverSpec(name="gptq", act_order=True))
    assert res.qweight.g_idx is not None
    r = LinearRounding(fmt, res.qweight, W)
    assert torch.equal(r().detach(), res.weight)
    with torch.no_grad():
        r.offset.fill_(0.5)
        r.alphas[0].fill_(0.8)
    assert torch.equal(r().detach(), fmt.dequantize(r.quantized()))


def test_refined_run_reloads_bit_exactly_and_differs_from_the_solver(tmp_path):
    r = load_recipe("gptq-w4a16", ["calibration.batch_size=4", "weights.group_size=16", "refine.iters=20"])
    model = quantize(tiny_model("qwen2"), r, token_windows(8, 24), out=tmp_path / "run")
    plain = quantize(tiny_model("qwen2"), r.with_overrides(["refine.iters=0"]), token_windows(8, 24))
    loaded = open_run(tmp_path / "run", CPU)[0]
    a, b, c = model.state_dict(), loaded.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("proj.weight"))
    with torch.no_grad():
        assert torch.equal(model(token_windows(8, 24, 4)).logits, loaded(token_windows(8, 24, 4)).logits)


def test_zero_iterations_is_the_unrefined_run_bit_exactly(tmp_path):
    base = load_recipe("gptq-w4a16", ["calibration.batch_size=4"])
    off = base.with_overrides(["refine.iters=0"])
    assert "refine" not in base.to_dict()  # recipes and fingerprints without the section are unchanged
    quantize(tiny_model("llama", num_hidden_layers=3), base, token_windows(8, 24), out=tmp_path / "base")
    quantize(tiny_model("llama", num_hidden_layers=3), off, token_windows(8, 24), out=tmp_path / "off")
    for i in range(3):
        name = f"layers/{i:05d}.safetensors"
        assert (tmp_path / "base" / name).read_bytes() == (tmp_path / "off" / name).read_bytes()


def test_activations_are_fake_quantized_during_reconstruction(monkeypatch):
    seen = []
    original = reconstruct_module.reconstruct

    def watching(layer, *args, **kwargs):
        seen.append(all(m.orthoquant_inputs.quantizer is not None for n, m in layer.named_modules()
                        if n.endswith(("q_proj", "o_proj", "up_proj", "down_proj"))))
        return original(layer, *args, **kwargs)

    monkeypatch.setattr("orthoquant.refine.stage.reconstruct", watching)
    quantize(tiny_model("llama"), load_recipe("rtn-w4a4kv4", ["calibration.batch_size=4", "refine.iters=3"]),
             token_windows(8, 24))
    assert seen == [True, True]


class Interrupt(Exception):
    pass


def test_resume_after_an_interrupted_refinement_equals_uninterrupted(tmp_path, monkeypatch):
    r = load_recipe("gptq-w4a16", ["calibration.batch_size=4", "weights.group_size=16", "refine.iters=10"])
    full = quantize(tiny_model("llama", num_hidden_layers=3), r, token_windows(8, 24), out=tmp_path / "full")
    original = RefineStage.finish

    def stop_at_layer_one(self, layer, prefix, index, *args):
        if index == 1:
            raise Interrupt
        return original(self, layer, prefix, index, *args)

    monkeypatch.setattr(RefineStage, "finish", stop_at_layer_one)
    with pytest.raises(Interrupt):
        quantize(tiny_model("llama", num_hidden_layers=3), r, token_windows(8, 24), out=tmp_path / "resumed")
    assert [p.name for p in (tmp_path / "resumed/layers").iterdir()] == ["00000.safetensors"]
    monkeypatch.setattr(RefineStage, "finish", original)
    resumed = quantize(tiny_model("llama", num_hidden_layers=3), r, token_windows(8, 24), out=tmp_path / "resumed")
    for i in range(3):
        name = f"layers/{i:05d}.safetensors"
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    with torch.no_grad():
        assert torch.equal(full(token_windows(8, 24, 3)).logits, resumed(token_windows(8, 24, 3)).logits)


@pytest.mark.parametrize("sets, field", [
    (["solver.name=quip-ldlq"], "solver.name"),
    (["weights.format=fp8", "weights.bits=8", "weights.clip_search=false", "weights.scale_rule=spec"],
     "weights.format"),
    (["refine.optimizer=sgd"], "refine.optimizer"),
    (["refine.batch_size=0"], "refine.batch_size"),
    (["refine.lr=-1"], "refine.lr"),
])
def test_recipes_that_cannot_be_refined_are_refused(sets, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_recipe("gptq-w4a16", ["refine.iters=10", *sets])


class ToyWeight(torch.nn.Module):
    """A Learnable replacing a linear's whole weight (the mechanism knows nothing of rounding)."""

    def __init__(self, start, lr):
        super().__init__()
        self.weight, self.lr = torch.nn.Parameter(start.clone()), lr

    def param_groups(self):
        return [{"params": [self.weight], "lr": self.lr}]

    def substitutions(self):
        return {"weight": self.weight}

    def project_(self):
        pass


def toy_problem(lr):
    from orthoquant.layerwise import LayerInputs

    g = torch.Generator().manual_seed(0)
    layer, teacher = torch.nn.Linear(6, 5, bias=False), torch.randn(5, 6, generator=g)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 6, generator=g))  # not the global generator: same toy every run
    hidden = [torch.randn(4, 3, 6, generator=g) for _ in range(3)]
    targets = [h @ teacher.T for h in hidden]
    return layer, LayerInputs(hidden, [{} for _ in hidden]), targets, ToyWeight(layer.weight.detach(), lr)


@pytest.mark.parametrize("optimizer", ["signsgd", "adam"])
def test_the_mechanism_fits_a_toy_target(optimizer):
    layer, inputs, targets, learnable = toy_problem(lr=0.02)
    out = reconstruct_module.reconstruct(layer, inputs, targets, learnable,
                                         reconstruct_module.Settings(200, 5, optimizer), CPU)
    assert out.improved and out.best < 0.2 * out.start and out.iters == 200
    assert out.best == pytest.approx(reconstruct_module.total_loss(layer, learnable.substitutions(), inputs,
                                                                   targets, CPU))  # left at the selected step


def test_early_stop_after_patience_steps_without_progress_keeps_the_best_step():
    layer, inputs, targets, learnable = toy_problem(lr=1e4)  # every step overshoots by far
    out = reconstruct_module.reconstruct(layer, inputs, targets, learnable,
                                         reconstruct_module.Settings(100, 5, "signsgd", patience=3), CPU)
    assert out.iters == 4 and out.best_iter == 0
    assert torch.equal(learnable.weight.detach(), layer.weight.detach()) and not out.improved


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_a_refined_rotated_run_exports_like_any_other(tmp_path, tokenizer, fmt):
    from orthoquant.export import export_run

    r = load_recipe("quarot-round-w4a16", ["calibration.batch_size=4", "weights.group_size=32",
                                           "weights.scale_dtype=float16", "refine.iters=10"])
    tiny_run(tmp_path, r, tokenizer, nwindows=8)
    assert any(m["kept"] for m in layer_metrics(tmp_path / "run"))  # refined codes are what is exported
    report = export_run(tmp_path / "run", tmp_path / fmt, fmt)  # reloads and compares before returning
    assert report["checks"]


def test_starting_from_rtn_keeps_the_solvers_codes_where_they_reconstruct_better(trained_data, tmp_path):
    model, calib = trained(trained_data)
    sets = ["weights.group_size=32", "calibration.batch_size=8"]
    quantize(model, load_recipe("gptq-w4a16", sets), calib, out=tmp_path / "gptq")
    model, _ = trained(trained_data)
    quantize(model, load_recipe("gptq-w4a16", [*sets, "refine.iters=20", "refine.start=rtn"]), calib,
             out=tmp_path / "best")
    first = layer_metrics(tmp_path / "best")[0]
    same = (tmp_path / "gptq/layers/00000.safetensors").read_bytes() == (tmp_path / "best/layers/00000.safetensors").read_bytes()
    assert same != first["kept"]  # GPTQ's codes stay exactly when learning from RTN did not beat them
    assert first["best"] < first["start"] or not first["kept"]


def test_the_layers_own_parameters_get_no_gradients_while_learning_and_keep_their_flags():
    layer, inputs, targets, learnable = toy_problem(lr=0.02)
    norm = torch.nn.Parameter(torch.ones(6))  # a parameter of the layer that is not learned (a norm weight)
    layer.register_parameter("norm", norm)
    layer.register_forward_pre_hook(lambda mod, args: (args[0] * mod.norm,))
    seen = []
    original = learnable.project_
    learnable.project_ = lambda: (seen.append(norm.grad is None and learnable.weight.grad is not None), original())
    reconstruct_module.reconstruct(layer, inputs, targets, learnable, reconstruct_module.Settings(5, 5), CPU)
    assert seen == [True] * 5 and norm.requires_grad and layer.weight.requires_grad


def test_learning_in_bfloat16_computes_the_layer_in_it_and_keeps_float32_parameters():
    layer, inputs, targets, learnable = toy_problem(lr=0.02)
    seen = []
    layer.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    settings = reconstruct_module.Settings(200, 5, "signsgd", dtype=torch.bfloat16)
    out = reconstruct_module.reconstruct(layer, inputs, targets, learnable, settings, CPU)
    steps = seen[len(inputs.hidden):-len(inputs.hidden)]  # between the two full-precision loss passes
    assert len(steps) == 200 and set(steps) == {(torch.bfloat16, torch.bfloat16)}
    assert set(seen[:len(inputs.hidden)]) == {(torch.float32, torch.float32)}  # the judged losses
    assert learnable.weight.dtype == torch.float32 and layer.weight.dtype == torch.float32
    assert out.improved and out.best < 0.2 * out.start


def test_a_float32_attention_mask_stays_finite_in_bfloat16():
    mask = torch.tensor([[0.0, torch.finfo(torch.float32).min]])
    assert torch.isinf(mask.to(torch.bfloat16)).any()  # what a plain cast would give
    cast = reconstruct_module._cast({"mask": mask, "ids": torch.tensor([3])}, torch.bfloat16)
    assert cast["mask"].dtype == torch.bfloat16 and torch.isfinite(cast["mask"]).all()
    assert cast["ids"].dtype == torch.int64


@pytest.mark.parametrize("preset", ["rtn-w4a4kv4", "quarot-round-w4a16"])
def test_a_run_learning_in_bfloat16_refines_with_its_quantizers_and_transforms(preset, tmp_path):
    sets = ["calibration.batch_size=4", "weights.group_size=16", "refine.iters=20", "refine.start=rtn"]
    run = {}
    for dtype in ("model", "bfloat16"):
        quantize(tiny_model("llama"), load_recipe(preset, [*sets, f"refine.compute_dtype={dtype}"]),
                 token_windows(8, 24), out=tmp_path / dtype)
        run[dtype] = layer_metrics(tmp_path / dtype)
    assert all(m["best"] < m["start"] for m in run["bfloat16"])
    first, first_bf16 = run["model"][0], run["bfloat16"][0]  # the same start, judged in float32 both times
    assert first["start"] == first_bf16["start"] and first["best"] != first_bf16["best"]
