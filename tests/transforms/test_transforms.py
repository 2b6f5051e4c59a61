"""Function preservation of every transform site (quantizers off), orthogonality and inverses."""
import pytest
import torch

from orthoquant import quantize
from orthoquant.config import Recipe, TransformSpec
from orthoquant.errors import ConfigError
from orthoquant.models.tiny import FAMILIES, tiny_model
from orthoquant.transforms.base import AcrossBlocks, Dense, Diagonal, Hadamard, PerBlock, fold_consumer, fold_producer
from orthoquant.transforms.plan import TransformPlan, build_transform
from orthoquant.transforms.sites import SITES, Dims
from orthoquant.hadamard import random_signs

from helpers import token_windows

SITE_NAMES = ("residual", "attn_value", "o_input", "down_input", "qk")
IDS = token_windows(2, 21)
CALIB = token_windows(2, 8, 1)
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def transformed_logits(family, specs, dtype, **overrides):
    model = tiny_model(family, dtype=dtype, **overrides)
    with torch.no_grad():
        ref = model(IDS).logits
    quantize(model, Recipe(transforms=tuple(specs)), CALIB)  # no quantizers: transforms only
    with torch.no_grad():
        return ref, model(IDS).logits


def assert_same(ref, out, dtype):
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("family", [*FAMILIES, "llama-tied"])
@pytest.mark.parametrize("site", SITE_NAMES)
def test_each_site_preserves_the_function(family, site):
    ref, out = transformed_logits(family, [TransformSpec(site, "random_hadamard", seed=3)], torch.float32)
    assert_same(ref, out, torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_sites_together_preserve_the_function(family, dtype):
    specs = [TransformSpec(s, "random_hadamard" if s == "residual" else "hadamard", seed=1) for s in SITE_NAMES]
    ref, out = transformed_logits(family, specs, dtype)
    assert_same(ref, out, dtype)


def test_non_power_of_two_widths_preserve_the_function():
    # hidden 96 = 12·8, head_dim 24 = 12·2, intermediate 160 = 20·8: every Had_K path
    specs = [TransformSpec(s, "random_hadamard", seed=2) for s in SITE_NAMES]
    ref, out = transformed_logits("qwen2", specs, torch.float64, hidden_size=96, intermediate_size=160)
    assert_same(ref, out, torch.float64)


def test_transforms_really_change_the_weights():
    """Guards the invariance tests: a site that silently did nothing would pass them too."""
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, Recipe(transforms=tuple(TransformSpec(s) for s in SITE_NAMES)), CALIB)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.v_proj.weight",
                "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        assert (model.state_dict()[key] - before[key]).abs().max() > 1e-3, key
    assert model.model.layers[0].self_attn.orthoquant_qk
    assert model.model.layers[0].mlp.down_proj.orthoquant_inputs.stages["plan"]


def test_a_missing_online_half_breaks_the_function():
    """Fusing R4 into down_proj without the online Hadamard must change the logits."""
    model = tiny_model("llama", dtype=torch.float64)
    with torch.no_grad():
        ref = model(IDS).logits
    quantize(model, Recipe(transforms=(TransformSpec("down_input"),)), CALIB)
    model.model.layers[0].mlp.down_proj.orthoquant_inputs.set("plan", [])
    with torch.no_grad():
        assert (model(IDS).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("t", [
    Hadamard(12), Hadamard(16, random_signs(16, 0).double()), PerBlock(Hadamard(4), 3),
    AcrossBlocks(Hadamard(4), 3), build_transform(TransformSpec("residual", "random_hadamard", 5, 8), 24, 5),
])
def test_orthogonal_transforms_are_orthogonal(t):
    M = t.matrix()
    torch.testing.assert_close(M @ M.T, torch.eye(t.dim, dtype=torch.float64), rtol=0, atol=1e-12)


def test_fold_pair_preserves_products_for_non_orthogonal_maps():
    g = torch.Generator().manual_seed(0)
    d = 6
    t = Dense(torch.randn(d, d, generator=g, dtype=torch.float64) + 3 * torch.eye(d, dtype=torch.float64))
    s = Diagonal(torch.rand(d, generator=g, dtype=torch.float64) + 0.5)
    x, w_in = torch.randn(5, d, generator=g, dtype=torch.float64), torch.randn(4, d, generator=g, dtype=torch.float64)
    w_out, b = torch.randn(d, 3, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    for m in (t, s):
        # a consumer reading x M reproduces x Wᵀ
        torch.testing.assert_close(m.forward(x) @ fold_consumer(w_in, m).T, x @ w_in.T, rtol=0, atol=1e-10)
        # a producer writes (h Wᵀ + b) M
        h = torch.randn(5, 3, generator=g, dtype=torch.float64)
        w2, b2 = fold_producer(w_out, b, m)
        torch.testing.assert_close(h @ w2.T + b2, m.forward(h @ w_out.T + b), rtol=0, atol=1e-10)


def test_seeds_reproduce_and_differ():
    spec = TransformSpec("residual", "random_hadamard", seed=7)
    a, b = build_transform(spec, 16, 7).matrix(), build_transform(spec, 16, 7).matrix()
    c = build_transform(spec, 16, 8).matrix()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_impossible_size_raises_naming_it():
    dims = Dims(hidden=64, intermediate=6 * 7, heads=4, kv_heads=2, head_dim=16)
    with pytest.raises(ConfigError, match="42"):
        TransformPlan((TransformSpec("down_input"),), dims, None)
    # a block-diagonal Hadamard is the way out when the block size divides the width
    TransformPlan((TransformSpec("down_input", block_size=2),), dims, None)


def test_every_site_is_in_the_table():
    assert set(SITES.names()) == set(SITE_NAMES)
