"""Learned transforms at every site: function preservation with random non-identity rotations and
scales (quantizers off), OSTQuant's three non-equivalent pairs done right, and the fitting-time
forward (folded on the fly) equal to the deployed forward (folded in place) with quantizers on."""
import pytest
import torch

from orthoquant.config import FitSpec, QuantSpec, Recipe, TransformSpec
from orthoquant.fitting.step import LayerMajorStep
from orthoquant.models.layout import to_layout_
from orthoquant.models.generic import spec_for
from orthoquant.models.surgery import fold_all_norms
from orthoquant.models.tiny import FAMILIES, tiny_model
from orthoquant.transforms import plan as plan_module
from orthoquant.transforms.base import Diagonal

from helpers import deployed_logits, random_fit_session, random_learned, token_windows

CPU = torch.device("cpu")
IDS = token_windows(2, 19)
CALIB = token_windows(4, 12, 1)
OST = ("R_res", "R_ov", "S_attn", "S_ffn", "S_ov", "S_qk", "S_up_down")
ONLINE = (TransformSpec("qk"), TransformSpec("down_input"))


def deployed(model, recipe, transforms):
    return deployed_logits(model, recipe, transforms, CALIB, IDS)


def reference(family, dtype=torch.float32, **overrides):
    model = tiny_model(family, dtype=dtype, **overrides)
    to_layout_(model, spec_for(model.config))  # Phi-3's fused linears held as their parts (same function)
    with torch.no_grad():
        return model, model(IDS).logits


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family,names", [("llama", OST), ("qwen2", OST), ("qwen3", OST),
                                          ("llama", ("R_res", "R2", "S_ov"))])
def test_random_transforms_at_every_site_preserve_the_function(family, names):
    model, ref = reference(family)
    learned = random_learned(model, names).frozen()
    assert {site for site, _ in learned} >= {"residual", "attn_value"}
    out = deployed(model, Recipe(transforms=ONLINE), learned)
    assert rel_err(out, ref) < 1e-4
    # guard: the transforms really moved the weights (a silent no-op would pass the check above)
    if "S_attn" in names:
        assert (model.model.layers[0].input_layernorm.weight - 1).abs().max() > 0.1


def test_s_qk_is_tied_across_each_rope_pair():
    """OSTQuant bug 1: a key scale before RoPE preserves q·k only if channels i and i + d/2 share it."""
    model, ref = reference("llama", dtype=torch.float64)
    folded = tiny_model("llama", dtype=torch.float64)
    fold_all_norms(folded, spec_for(folded.config))
    out = deployed(model, Recipe(), random_learned(model, ("S_qk",)).frozen())
    assert rel_err(out, ref) < 1e-10
    s = (model.model.layers[0].self_attn.k_proj.weight / folded.model.layers[0].self_attn.k_proj.weight)[:, 0]
    s = s.reshape(2, 2, 8)  # (kv heads, RoPE halves, head_dim / 2)
    assert torch.allclose(s[:, 0], s[:, 1]) and (s - 1).abs().max() > 0.1
    # the bug: independent scales per channel change the function
    untied = {("qk_scale", 0): Diagonal(torch.rand(32, dtype=torch.float64) + 0.5)}
    model, ref = reference("llama", dtype=torch.float64)
    assert rel_err(deployed(model, Recipe(), untied), ref) > 1e-3


def test_s_qk_of_qwen3_is_shared_and_folded_into_the_qk_norms():
    model, ref = reference("qwen3", dtype=torch.float64)
    gamma = model.model.layers[1].self_attn.k_norm.weight.detach().clone()
    out = deployed(model, Recipe(), random_learned(model, ("S_qk",)).frozen())
    assert rel_err(out, ref) < 1e-10
    s = model.model.layers[1].self_attn.k_norm.weight / gamma
    assert torch.allclose(s[:8], s[8:]) and (s - 1).abs().max() > 0.1


def test_s_ov_scales_o_columns():
    """OSTQuant bug 2: trained with S_ov on o_proj rows, deployed on columns. Columns are right."""
    model, ref = reference("llama", dtype=torch.float64, num_key_value_heads=4)  # MHA: rows fit too
    folded = tiny_model("llama", dtype=torch.float64, num_key_value_heads=4)
    fold_all_norms(folded, spec_for(folded.config))
    learned = random_learned(model, ("S_ov",)).frozen()
    out = deployed(model, Recipe(), learned)
    assert rel_err(out, ref) < 1e-10
    s = learned[("attn_value", 0)].scale
    o, o0 = model.model.layers[0].self_attn.o_proj.weight, folded.model.layers[0].self_attn.o_proj.weight
    torch.testing.assert_close(o, o0 / s, rtol=1e-12, atol=0)  # x·s reaches o, so its columns take 1/s
    with torch.no_grad():  # the bug: the same scale on o_proj's rows
        model.model.layers[0].self_attn.o_proj.weight.copy_(o0 / s.unsqueeze(1))
        assert rel_err(model(IDS).logits, ref) > 1e-3


def test_s_up_down_folds_before_the_down_hadamard(monkeypatch):
    """OSTQuant bug 3: the activation is (m ⊙ s) H, so down_proj needs W diag(1/s) H, not W H diag(1/s)."""
    learned_of = lambda model: random_learned(model, ("S_up_down",)).frozen()  # noqa: E731
    recipe = Recipe(transforms=(TransformSpec("down_input", "random_hadamard", seed=1),))
    model, ref = reference("llama", dtype=torch.float64)
    assert rel_err(deployed(model, recipe, learned_of(model)), ref) < 1e-10
    order = list(plan_module.SITE_ORDER)
    order.remove("up_down")
    order.insert(order.index("down_input") + 1, "up_down")  # the bug: scale folded after H
    monkeypatch.setattr(plan_module, "SITE_ORDER", tuple(order))
    model, ref = reference("llama", dtype=torch.float64)
    assert rel_err(deployed(model, recipe, learned_of(model)), ref) > 1e-3


QUANTIZED = dict(weights=QuantSpec(bits=4, clip_search=True), activations=QuantSpec(bits=4, symmetric=False),
                 kv_cache=QuantSpec(bits=4, symmetric=False), transforms=ONLINE)


@pytest.mark.parametrize("offload", ["none", "cpu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fitting_time_forward_equals_the_deployed_forward(family, offload):
    """The fit's forward (one weight copy, each layer folded on the fly, offloaded or not) is the
    deployed model's forward, in float64 on every family."""
    recipe = Recipe(**QUANTIZED, fitting=FitSpec(train_weights=True, qsur_samples=0, offload=offload))
    session = random_fit_session(reference(family, dtype=torch.float64)[0], recipe, OST)
    fitting = LayerMajorStep(session, [IDS]).logits(quantized=True)[0]
    clean = LayerMajorStep(session, [IDS]).logits(quantized=False)[0]
    transforms = session.learned.frozen()
    model, ref = reference(family, dtype=torch.float64)
    out = deployed(model, recipe, transforms)
    assert rel_err(out, fitting) < 1e-6  # fake-quant rounds in float32
    assert rel_err(clean, ref) < 1e-6  # float32 masters: orthogonal to ~1e-7
    assert rel_err(out, ref) > 1e-3  # the quantizers really act
    model, _ = reference(family, dtype=torch.float64)  # quantizers off: both sides are float64 end to end
    assert rel_err(clean, deployed(model, Recipe(transforms=ONLINE), transforms)) < 1e-12
