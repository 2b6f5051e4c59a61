"""Fitted transforms on the small model trained in the session: the fit brings the deployed W4A4KV4
model closer to full precision (held-out KL), and — the issue's criterion — OSTQuant against QuaRot in
perplexity on the same calibration.

The step count is cut to 30 (global batch 8) to fit the test budget; the o_proj input group is the
model's head_dim (16) as the preset's 128 is on Llama."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from orthoquant import load_recipe, quantize
from orthoquant.evaluate.ppl import perplexity
from orthoquant.fitting import loop
from orthoquant.fitting.losses import LOSSES, Objective

from helpers import kl_to

CPU = torch.device("cpu")
FIT = ["fitting.grad_accum=2", "fitting.top_k=100", "fitting.qsur_samples=0",
       "overrides=[{pattern: 'self_attn\\.o_proj$', activations: {group_size: 16}}]"]
SPIN = ["fitting.grad_accum=8", "fitting.qsur_samples=0",
        "overrides=[{pattern: 'self_attn\\.o_proj$', activations: {group_size: 16}}]"]


@pytest.fixture(scope="module")
def setup(trained_data):
    return trained_data


def quantized(setup, preset, *sets):
    folder, calib, _ = setup
    model = AutoModelForCausalLM.from_pretrained(folder)
    if preset is not None:
        quantize(model, load_recipe(preset, ["calibration.batch_size=8", *sets]), calib)
    return model


class Ascent:
    """The fitting losses negated: a fit with it climbs the loss (gradient ascent)."""

    def get(self, name):
        objective = LOSSES.get(name)
        return Objective(lambda *args: -objective.fn(*args), objective.needs_teacher)


@pytest.fixture(scope="module")
def results(setup):
    held_out = setup[2]
    fp = quantized(setup, None)
    out = {}
    for name, preset, sets in (("ascent", "ostquant-w4a4kv4", ["fitting.steps=30", *FIT]),
                               ("spin_ascent", "spinquant-w4a4kv4", ["fitting.steps=30", *SPIN])):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(loop, "LOSSES", Ascent())
            model = quantized(setup, preset, *sets)
        out[name] = (perplexity(model, held_out, CPU, batch_size=40), kl_to(model, fp, held_out))
    for name, preset, sets in (("quarot", "quarot-w4a4kv4", []),
                               ("init", "ostquant-w4a4kv4", ["fitting.steps=0", *FIT]),
                               ("fitted", "ostquant-w4a4kv4", ["fitting.steps=30", *FIT]),
                               ("spin_init", "spinquant-w4a4kv4", ["fitting.steps=0", *SPIN]),
                               ("spin_fitted", "spinquant-w4a4kv4", ["fitting.steps=30", *SPIN])):
        model = quantized(setup, preset, *sets)
        out[name] = (perplexity(model, held_out, CPU, batch_size=40), kl_to(model, fp, held_out))
    return out


def test_fitting_brings_the_deployed_model_closer_to_full_precision(results):
    """Fitted OSTQuant against its own initialisation (same KLT init, steps=0). Gradient ascent (the
    loss negated) fails it: checked by negating the step's loss once (KL 0.00857 -> 0.00888)."""
    (_, kl_init), (_, kl_fitted) = results["init"], results["fitted"]
    assert kl_fitted < 0.99 * kl_init, results


def test_fitted_spinquant_is_closer_to_full_precision_than_its_initialisation(results):
    """SpinQuant trains on next-token cross-entropy, not on the KL it is judged by here."""
    (_, kl_init), (_, kl_fitted) = results["spin_init"], results["spin_fitted"]
    assert kl_fitted < 0.99 * kl_init, results


@pytest.mark.parametrize("fitted,ascent,judged", [("fitted", "ascent", 1), ("spin_fitted", "spin_ascent", 0)])
def test_descending_the_loss_beats_climbing_it(results, fitted, ascent, judged):
    """The same fit with its loss negated (gradient ascent) ends worse on the fit's own objective: the
    test that fails if the fit's sign were wrong. OSTQuant descends KL-Top (judged by the held-out KL),
    SpinQuant next-token cross-entropy (judged by the held-out perplexity: its KL moves within noise)."""
    assert results[fitted][judged] < results[ascent][judged], results


def test_fitted_ostquant_is_closer_to_full_precision_than_quarot(results):
    assert results["fitted"][1] < results["quarot"][1], results


# Measured on seed 0: FP 53.386, QuaRot 53.945 (KL 0.0124), OSTQuant init 53.824, fitted 53.728 (KL 0.0081).
# Over rotation/fit seeds 0-7 the fitted model was below QuaRot at every seed (margins 0.05-0.53).
# On the earlier, overfitted test model (300k characters, 120 held-out windows) this comparison was
# decided by how the quantization noise happened to correct the model's held-out overconfidence, not
# by fidelity (see TEST_CORPUS_CHARS in orthoquant/demo.py).
def test_fitted_ostquant_is_no_worse_than_quarot_at_w4a4kv4(results):
    assert results["fitted"][0] <= results["quarot"][0], results
