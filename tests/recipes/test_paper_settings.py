"""The rotation presets' solver settings as the papers run them: GPTQ true-sequential, the next layer
calibrated on outputs with activations unquantized (``solver.propagate: fp``), and the o_proj input
grouped by head_dim."""
import pytest
import torch

from orthoquant import load_recipe, quantize, runner
from orthoquant.config import QuantSpec, Recipe, SolverSpec, TransformSpec
from orthoquant.models.tiny import tiny_model

from helpers import token_windows

CALIB = token_windows(4, 16, 3)
ROTATION_PRESETS = ["quarot-w4a4kv4", "spinquant-had-w4a4kv4", "spinquant-w4a4kv4", "ostquant-w4a4kv4"]


@pytest.mark.parametrize("propagate", ["fp", "quantized"])
def test_the_next_layer_is_calibrated_on_what_propagate_says(propagate, monkeypatch):
    seen = []
    real = runner.run_layer

    def recording(layer, inputs, device, keep=True):
        if keep:  # the propagation to the next layer (calibration passes do not keep outputs)
            seen.append((layer.self_attn.q_proj.orthoquant_inputs.quantizer is None,
                         getattr(layer.self_attn, "orthoquant_kv", None) is None))
        return real(layer, inputs, device, keep)

    monkeypatch.setattr(runner, "run_layer", recording)
    recipe = Recipe(weights=QuantSpec(bits=4), activations=QuantSpec(bits=4, symmetric=False),
                    kv_cache=QuantSpec(bits=4, symmetric=False), transforms=(TransformSpec("down_input"),),
                    solver=SolverSpec(name="gptq", propagate=propagate))
    model = quantize(tiny_model("llama"), recipe, CALIB)
    assert seen == [(propagate == "fp", propagate == "fp")] * 2
    # the quantizers are back on for inference after the propagation
    assert model.model.layers[0].self_attn.q_proj.orthoquant_inputs.quantizer is not None


@pytest.mark.parametrize("preset", ROTATION_PRESETS)
def test_rotation_presets_solve_true_sequentially_with_fp_propagation(preset):
    solver = load_recipe(preset).solver
    assert solver.true_sequential and solver.propagate == "fp"


@pytest.mark.parametrize("preset", ["spinquant-had-w4a4kv4", "spinquant-w4a4kv4", "ostquant-w4a4kv4"])
def test_the_o_proj_input_is_grouped_by_the_models_head_dim(preset):
    """The presets quantize o_proj's input per head: groups of head_dim (16 here, 128 on Llama), in
    the deployed model and in the fit alike."""
    from orthoquant.fitting import prepare_session
    from orthoquant.models.loading import InMemorySource
    from orthoquant.models.generic import spec_for
    from orthoquant.pipeline import make_plan, prepare_model

    recipe = load_recipe(preset, ["fitting.steps=0", "fitting.qsur_samples=0", "fitting.eval_samples=0"]
                         if load_recipe(preset).fitting else [])
    assert recipe.activations_for("model.layers.0.self_attn.o_proj").per_head
    model = quantize(tiny_model("llama"), recipe.with_overrides(["calibration.nsamples=4"]), CALIB)
    o_proj = model.model.layers[1].self_attn.o_proj
    assert o_proj.orthoquant_inputs.quantizer.op.__self__.group_size == 16  # the format under the SharedQuantizer
    assert model.model.layers[1].self_attn.q_proj.orthoquant_inputs.quantizer.op.__self__.group_size == -1
    if recipe.fitting is not None:
        fresh = tiny_model("llama")
        arch = spec_for(fresh.config)
        plan = make_plan(fresh, arch, recipe)
        prepare_model(fresh, arch, InMemorySource(), torch.device("cpu"), plan)
        session = prepare_session(fresh, arch, recipe, plan, torch.device("cpu"))
        assert session.layers[0].self_attn.o_proj.orthoquant_inputs.quantizer.args[0].group_size == 16


def test_per_head_takes_no_group_size_of_its_own():
    from orthoquant.errors import ConfigError

    with pytest.raises(ConfigError, match="per_head=true with group_size=64"):
        QuantSpec(bits=4, per_head=True, group_size=64)
