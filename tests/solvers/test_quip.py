"""QuIP#: the E8P12 codebook against quip-sharp's definition and brute force, the RHT's invariances,
BlockLDLQ against GPTQ, the 2-bit loss ranking, exact code round trips, and the presets end to end."""
from __future__ import annotations

import pytest
import torch

from orthoquant import open_run, quantize
from orthoquant.config import QuantSpec, SolverSpec
from orthoquant.recipes import load_recipe
from orthoquant.errors import ConfigError
from orthoquant.fakequant.inputs import input_pipeline, output_pipeline
from orthoquant.formats import make_format
from orthoquant.formats.e8 import abs_patterns, e81b_encode, e81b_points, e8p_encode, e8p_points
from orthoquant.models.tiny import tiny_model
from orthoquant.layerfile import decoded_state
from orthoquant.runfolder import RunFolder
from orthoquant.solvers import SOLVERS
from orthoquant.solvers.gptq import solve_gptq
from orthoquant.solvers.ldlq import block_ldlq
from orthoquant.solvers.quip import rht_transforms, rotate_hessian, rotate_weight, unrotate_weight

from helpers import synthetic_layer, token_windows

CPU = torch.device("cpu")
# preset -> bound on the relative logit error of a random tiny model (INT2/INT3 GPTQ: 0.57 / 0.31)
PRESETS = {"quip-e8p-2bit": 0.55, "quip-e8p-3bit": 0.3, "quip-e8p-4bit": 0.2, "quip-int4": 0.2}
# quip-sharp lib/codebook/latticee8_padded12.py get_norm12(), current revision, in units of 1/2
REFERENCE_NORM12 = {
    (3, 1, 1, 1, 3, 3, 3, 3), (1, 3, 1, 1, 3, 3, 3, 3), (1, 1, 3, 1, 3, 3, 3, 3), (1, 1, 1, 3, 3, 3, 3, 3),
    (3, 3, 3, 1, 3, 3, 1, 1), (3, 3, 3, 1, 3, 1, 3, 1), (3, 3, 3, 1, 1, 3, 3, 1), (3, 3, 3, 1, 3, 1, 1, 3),
    (3, 3, 3, 1, 1, 3, 1, 3), (3, 3, 3, 1, 1, 1, 3, 3), (3, 3, 1, 3, 3, 3, 1, 1), (3, 3, 1, 3, 3, 1, 3, 1),
    (3, 3, 1, 3, 1, 3, 3, 1), (3, 3, 1, 3, 3, 1, 1, 3), (3, 3, 1, 3, 1, 3, 1, 3), (3, 3, 1, 3, 1, 1, 3, 3),
    (3, 1, 3, 3, 3, 3, 1, 1), (3, 1, 3, 3, 3, 1, 3, 1), (3, 1, 3, 3, 1, 3, 3, 1), (3, 1, 3, 3, 3, 1, 1, 3),
    (3, 1, 3, 3, 1, 3, 1, 3), (1, 3, 3, 3, 1, 1, 3, 3), (1, 3, 3, 3, 3, 3, 1, 1), (1, 3, 3, 3, 3, 1, 3, 1),
    (1, 3, 3, 3, 1, 3, 3, 1), (1, 3, 3, 3, 3, 1, 1, 3), (1, 3, 3, 3, 1, 3, 1, 3), (1, 1, 3, 3, 1, 3, 3, 3),
    (3, 3, 1, 1, 3, 3, 3, 1),
}


def trace_loss(dW, H):
    """tr(ΔW H ΔWᵀ) in float64 (the library's proxy_loss runs its GEMM in float32)."""
    return float(((dW @ H) * dW).sum())


def e8p(bits, group_size=0):
    return make_format(QuantSpec(format="e8p", bits=bits, group_size=group_size))


# --- codebooks -------------------------------------------------------------------------------------
def test_e8p_has_2_16_distinct_points_of_e8_plus_a_quarter_and_the_reference_norm12_patterns():
    points = e8p_points().double()
    assert points.shape == (1 << 16, 8) and len(torch.unique(points, dim=0)) == 1 << 16
    shift = torch.where(torch.arange(1 << 16) & 1 == 1, 0.25, -0.25).double()[:, None]
    unshifted = points - shift  # D8 + 1/2 with an even coordinate sum: E8's odd coset
    assert torch.equal(unshifted - unshifted.floor(), torch.full_like(unshifted, 0.5))
    assert torch.equal(unshifted.sum(-1) % 2, torch.zeros(1 << 16, dtype=torch.float64))
    a = abs_patterns()
    norms = (a * a).sum(-1)
    assert len(torch.unique(a, dim=0)) == 256 and int((norms <= 10).sum()) == 227
    assert {tuple(int(v) for v in 2 * p) for p in a[norms == 12]} == REFERENCE_NORM12
    assert int((norms == 12).sum()) == 29 and int((norms > 12).sum()) == 0


def test_e8p_search_equals_brute_force_over_all_points():
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64).repeat_interleave(400)[:, None]  # in, at, past the edge
    x = torch.randn(1200, 8, generator=g, dtype=torch.float64) * spread
    points = e8p_points().double()
    brute = (2 * x @ points.T - (points * points).sum(-1)).argmax(-1)
    assert torch.equal(e8p_encode(x), brute)
    assert torch.equal(e8p_encode(x.float()), brute)  # float32 search: same points on these inputs
    assert torch.equal(e8p_points()[e8p_encode(points.float())], points.float())  # every point is its own code


def test_e81b_is_zero_the_240_roots_and_15_norm4_vectors():
    g = e81b_points()
    norms = (g * g).sum(-1)
    assert len(torch.unique(g, dim=0)) == 256
    assert [int((norms == v).sum()) for v in (0, 2, 4)] == [1, 240, 15]
    assert torch.equal(e81b_encode(g), torch.arange(256))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [0, -1])
def test_lattice_codes_round_trip_exactly_and_residual_stages_help(bits, group_size):
    fmt = e8p(bits, group_size)
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits))
    q = fmt.quantize(x)
    assert q.codes.shape == (24, 8) and int(q.codes.max()) < 1 << (8 * bits)
    packed = fmt.pack(q.codes)
    assert packed.dtype == torch.int32 and packed.numel() * 32 == x.numel() * bits
    assert torch.equal(fmt.unpack(packed, q.codes.shape[-1]), q.codes)
    assert torch.equal(fmt.dequantize(q), fmt.quantize_dequantize(x))
    err = ((fmt.dequantize(q) - x) ** 2).mean() / (x**2).mean()
    assert err < {2: 0.12, 3: 0.04, 4: 0.011}[bits]  # N(0, 1): 0.091, 0.030, 0.0083


def test_lattice_format_rejects_what_it_cannot_do():
    with pytest.raises(ConfigError, match="bits in"):
        QuantSpec(format="e8p", bits=5)
    with pytest.raises(ConfigError, match="group_size"):
        QuantSpec(format="e8p", bits=2, group_size=32)
    W, H = synthetic_layer(8, 64)
    with pytest.raises(ConfigError, match="8 weights at a time"):
        solve_gptq(W, H, e8p(2), SolverSpec(name="gptq"))


# --- RHT and solvers ---------------------------------------------------------------------------------
def test_rht_is_orthogonal_and_preserves_the_proxy_loss():
    W, H = synthetic_layer(96, 64)
    t_in, t_out = rht_transforms(W)
    for t in (t_in, t_out):
        M = t.matrix()
        assert torch.allclose(M @ M.T, torch.eye(t.dim, dtype=torch.float64), atol=1e-12)
    Wr, Hr = rotate_weight(W, t_in, t_out), rotate_hessian(H, t_in)
    assert (Wr - t_out.matrix() @ W.double() @ t_in.matrix()).abs().max() < 1e-12  # Had_mᵀ SV W SU Had_n
    dW = torch.randn(W.shape, dtype=torch.float64)
    dWr = rotate_weight(dW, t_in, t_out)
    assert trace_loss(dWr, Hr) == pytest.approx(trace_loss(dW, H), rel=1e-12)
    assert torch.allclose(unrotate_weight(Wr, t_in, t_out), W.double(), atol=1e-6)
    assert rht_transforms(W)[0].signs.equal(t_in.signs)  # deterministic
    assert not rht_transforms(W + 1)[0].signs.equal(t_in.signs)  # a different matrix draws other signs


@pytest.mark.parametrize("blocksize", [128, 24])
def test_block_ldlq_with_blocks_of_one_is_gptq_on_the_reversed_columns(blocksize):
    W, H = synthetic_layer(48, 96)
    fmt = make_format(QuantSpec(bits=3, symmetric=False))
    q = block_ldlq(W, H, fmt, blocksize=blocksize)
    ref = solve_gptq(W.flip(1).contiguous(), H.flip(0, 1).contiguous(), fmt, SolverSpec(blocksize=blocksize))
    assert torch.equal(q.codes, ref.qweight.codes.flip(1))


def test_two_bit_proxy_loss_ranks_e8p_ldlq_below_int2_gptq_below_int2_rtn():
    W, H = synthetic_layer(128, 256, seed=1)
    spec = SolverSpec()
    int2 = make_format(QuantSpec(bits=2, symmetric=False, clip_search=True))
    loss = {"e8p-ldlq": SOLVERS.get("quip-ldlq").solve(W, H, e8p(2), spec).loss,
            "e8p-ldlq-tune": SOLVERS.get("quip-ldlq-tune").solve(W, H, e8p(2), spec).loss,
            "int2-gptq": solve_gptq(W, H, int2, spec).loss,
            "int2-rtn": SOLVERS.get("rtn").solve(W, H, int2, spec).loss}
    assert loss["e8p-ldlq"] < 0.75 * loss["int2-gptq"]
    assert loss["int2-gptq"] < 0.75 * loss["int2-rtn"]
    assert loss["e8p-ldlq-tune"] < 0.97 * loss["e8p-ldlq"]  # refinement passes never hurt, here they help


# --- presets end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_preset_saves_reloads_bit_exactly_and_equals_the_unrotated_fake_quant_model(preset, tmp_path):
    base = tiny_model("llama", num_hidden_layers=1)
    recipe = load_recipe(preset, ["calibration.batch_size=4"])
    model = quantize(tiny_model("llama", num_hidden_layers=1), recipe, token_windows(8, 24), out=tmp_path / "run")
    w = token_windows(8, 24, 1)
    with torch.no_grad():
        ref, out = base(w).logits, model(w).logits
    assert (out - ref).norm() < PRESETS[preset] * ref.norm()
    loaded, *_ = open_run(tmp_path / "run", CPU)
    with torch.no_grad():
        assert torch.equal(loaded(w).logits, out)
    # the same model with Ŵ = diag(SV) Had_m Ŵr Had_nᵀ diag(SU) and no online transforms
    run = RunFolder(tmp_path / "run")
    for i, layer in enumerate(loaded.model.layers):
        _, transforms = decoded_state(run.layer_path(i))
        assert len(transforms) == 7
        for path, sides in transforms.items():
            lin = layer.get_submodule(path)
            lin.weight.data = unrotate_weight(lin.weight.data, sides["input_transform"],
                                              sides["output_transform"]).float()
            input_pipeline(lin).set("solver", [])
            output_pipeline(lin).ops = []
    with torch.no_grad():
        plain = loaded(w).logits
    assert (plain - out).abs().max() < 1e-4 * out.abs().max()

