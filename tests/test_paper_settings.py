"""The rotation presets' solver settings as the papers run them: GPTQ true-sequential, the next layer
calibrated on outputs with activations unquantized (``solver.propagate: fp``), and the o_proj input
grouped by head_dim."""
import pytest
import torch

from orthoquant import load_recipe, quantize, runner
from orthoquant.config import QuantSpec, Recipe, SolverSpec, TransformSpec
from orthoquant.models.tiny import tiny_model

CALIB = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(3))
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
