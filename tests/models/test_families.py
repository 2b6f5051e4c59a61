"""Across the new families: which presets each accepts (the README's table), and learned fitting with the
learnable parameters each family allows, folded exactly."""
from __future__ import annotations

import pytest
import torch

from orthoquant import quantize
from orthoquant.config import FitSpec, Recipe
from orthoquant.recipes import load_recipe, preset_names
from orthoquant.errors import UserError
from orthoquant.models.generic import spec_for
from orthoquant.models.support import check_support
from orthoquant.models.tiny import tiny_config, tiny_model

from helpers import token_windows

IDS = token_windows(2, 21)
WINDOWS = token_windows(4, 16, 2)


def refused(family: str) -> set[str]:
    config = tiny_config(family)
    out = set()
    for name in preset_names():
        try:
            check_support(spec_for(config), config, load_recipe(name))
        except UserError:
            out.add(name)
    return out


def uses(name: str, what: str) -> bool:
    r = load_recipe(name)
    return {"transforms": bool(r.transforms), "kv": r.kv_cache is not None, "fitting": r.fitting is not None,
            "residual": any(t.site == "residual" for t in r.transforms) or (r.fitting is not None and "R_res" in r.fitting.params),
            "S_qk": r.fitting is not None and "S_qk" in r.fitting.params,
            "refine": r.refine is not None and r.refine.iters > 0,
            "finetune": r.finetune is not None and r.finetune.active}[what]


@pytest.mark.parametrize("family, rule", [
    ("llama", lambda n: False),
    ("phi3", lambda n: False),
    ("phi4-mini", lambda n: uses(n, "S_qk")),  # partial rotary
    ("gemma2", lambda n: uses(n, "residual")),  # sandwich norms
    ("gemma3", lambda n: uses(n, "residual")),
    ("qwen3-moe", lambda n: False),  # mixture of experts: an arch spec with per-expert sites
    ("mixtral", lambda n: False),
    ("opt", lambda n: any(uses(n, w) for w in ("transforms", "kv", "fitting", "refine", "finetune"))),  # no arch spec
])
def test_presets_are_refused_exactly_where_the_family_cannot_run_them(family, rule):
    assert refused(family) == {n for n in preset_names() if rule(n)}


@pytest.mark.parametrize("family, params", [
    ("phi3", ("R_res", "R_ov", "S_attn", "S_ffn", "S_ov", "S_qk", "S_up_down")),
    ("phi4-mini", ("R_res", "R_ov", "S_attn", "S_ffn", "S_ov", "S_up_down")),
    ("gemma2", ("R_ov", "S_attn", "S_ffn", "S_ov", "S_qk", "S_up_down")),
    ("gemma3", ("R_ov", "S_attn", "S_ffn", "S_ov", "S_qk", "S_up_down")),
])
def test_fitted_transforms_fold_exactly(family, params):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(IDS).logits
    fit = FitSpec(params=params, steps=2, batch_size=2, grad_accum=1, top_k=20, qsur_samples=0, eval_samples=0)
    quantize(model, Recipe(fitting=fit), WINDOWS)  # no quantizer: the learned transforms alone
    with torch.no_grad():
        out = model(IDS).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
