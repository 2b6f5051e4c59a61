"""Number formats: exact code round trips, values on the grid, error bounds, scale rules, STE, config checks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthoquant.config import QuantSpec
from orthoquant.errors import ConfigError
from orthoquant.formats import make_format
from orthoquant.formats.fp4 import E2M1_VALUES, e2m1_decode, e2m1_encode
from orthoquant.formats.integer import CLIP_NORM

FAST = settings(max_examples=25, deadline=None)

SPECS = {
    "int4-sym-row": dict(bits=4),
    "int3-asym-g32": dict(bits=3, symmetric=False, group_size=32),
    "int2-sym-tensor": dict(bits=2, group_size=0),
    "int8-asym-row-fp16": dict(bits=8, symmetric=False, scale_dtype="float16"),
    "int4-sym-g32-clip": dict(bits=4, group_size=32, clip_ratio=0.9),
    "int3-sym-g32-full": dict(bits=3, group_size=32, scale_rule="full_range", clip_search=True),
    "mxfp4-spec": dict(format="mxfp4", group_size=32),
    "mxfp4-34": dict(format="mxfp4", group_size=32, scale_rule="three_quarters"),
    "mxfp4-spec-clip": dict(format="mxfp4", group_size=32, clip_ratio=0.8),
    "nvfp4": dict(format="nvfp4", group_size=16),
    "fp8-row": dict(format="fp8", bits=8),
    "fp8-tensor-bf16": dict(format="fp8", bits=8, group_size=0, scale_dtype="bfloat16"),
    "fp8-g16-fp16": dict(format="fp8", bits=8, group_size=16, scale_dtype="float16"),
}
FP4 = ["mxfp4-spec", "mxfp4-34", "nvfp4"]
KINDS = ["normal", "heavy", "zero-block", "tiny", "ties"]


def fmt(name: str):
    return make_format(QuantSpec(**SPECS[name]))


def make_x(seed: int, rows: int, blocks: int, kind: str) -> torch.Tensor:
    """A (rows, 32·blocks) test tensor; the kinds stress outliers, empty blocks, underflow and ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 32 * blocks, generator=g)
    if kind == "heavy":
        x = x * torch.exp(1.5 * torch.randn(x.shape, generator=g))
    elif kind == "zero-block":
        x[:, :32] = 0
    elif kind == "tiny":
        x = x * 1e-9
    elif kind == "ties":  # multiples of 1/4 hit E2M1 and INT midpoints exactly
        x = torch.randint(-24, 25, x.shape, generator=g) / 4.0
    return x


tensors = st.builds(make_x, st.integers(0, 2**16), st.integers(1, 4), st.integers(1, 3), st.sampled_from(KINDS))


def total_scale(f, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column scale (times the global factor) and zero point of ``x`` under ``f``."""
    p = f.fit(x).columns(x.shape[-1])
    s = p.scale if p.global_scale is None else p.scale * p.global_scale
    return s.expand_as(x), (p.zero if p.zero is not None else torch.zeros(()))


@pytest.mark.parametrize("name", SPECS)
@FAST
@given(x=tensors)
def test_codes_round_trip_exactly(name, x):
    """Codes in range; dequantize then re-encode under the same scales gives the same codes."""
    f = fmt(name)
    q = f.quantize(x)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**f.bits
    signed = f.spec.scale_rule == "full_range"  # its scales carry the sign of each group's extreme
    assert torch.isfinite(q.params.scale).all() and ((q.params.scale != 0) if signed else (q.params.scale > 0)).all()
    params = q.params.columns(x.shape[-1])
    v = f.dequantize(q)
    assert torch.equal(f.encode(v, params), q.codes)
    assert torch.equal(v, f.quantize_dequantize(x))


@pytest.mark.parametrize("name", SPECS)
@FAST
@given(x=tensors)
def test_encode_decode_is_encode_then_decode(name, x):
    """GPTQ's fused per-column call gives exactly encode's codes and decode's values."""
    f = fmt(name)
    params = f.fit(x).columns(x.shape[-1])
    codes, values = f.encode_decode(x, params)
    assert torch.equal(codes, f.encode(x, params))
    assert torch.equal(values, f.decode(codes, params))


@pytest.mark.parametrize("name", SPECS)
@FAST
@given(x=tensors)
def test_values_lie_on_grid(name, x):
    f = fmt(name)
    q = f.quantize(x)
    p = q.params.columns(x.shape[-1])
    v = f.dequantize(q).double()
    s = p.scale.double() * (1.0 if p.global_scale is None else p.global_scale.double())
    y = v / s
    if f.name == "int":
        n = y + (p.zero.double() if p.zero is not None else 2.0 ** (f.bits - 1))
        assert ((n - n.round()).abs() < 1e-4).all()
        assert ((n.round() >= 0) & (n.round() <= 2**f.bits - 1)).all()
    elif f.name == "fp8":
        assert torch.allclose(y, y.float().to(torch.float8_e4m3fn).double(), rtol=1e-6, atol=0)
    else:
        nearest = E2M1_VALUES.double()[(y.unsqueeze(-1) - E2M1_VALUES.double()).abs().argmin(-1)]
        tol = 0 if p.global_scale is None else 1e-6  # a power-of-two scale alone is exact
        assert ((y - nearest).abs() <= tol * nearest.abs()).all()


@pytest.mark.parametrize("name", [n for n in SPECS if n.startswith("int")])
@FAST
@given(x=tensors)
def test_int_error_at_most_half_step(name, x):
    f = fmt(name)
    s, z = total_scale(f, x)
    if f.spec.symmetric:
        z = torch.full_like(s, 2.0 ** (f.bits - 1))
    ends = -z * s, (2**f.bits - 1 - z) * s  # a negative scale (full_range) swaps the ends
    lo, hi = torch.minimum(*ends), torch.maximum(*ends)
    inside = (x >= lo) & (x <= hi)
    err = (f.quantize_dequantize(x) - x).abs()
    assert (err[inside] <= s.abs()[inside] / 2 * (1 + 1e-5) + 1e-30).all()


def half_spacing(y: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 spacing around |y| <= 6: 0.25 below 2, 0.5 in [2, 4), 1 in [4, 6]."""
    a = y.abs()
    return torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))


@pytest.mark.parametrize("name", FP4)
@FAST
@given(x=tensors)
def test_fp4_error_at_most_half_local_spacing(name, x):
    f = fmt(name)
    s, _ = total_scale(f, x)
    y = x / s
    inside = y.abs() <= 6
    err = (f.quantize_dequantize(x) - x).abs()
    bound = half_spacing(y) * s * (1 + 1e-5)
    assert (err[inside] <= bound[inside]).all()


def test_fp4_encodes_every_representable_value_exactly():
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    grid = torch.cat([grid, -grid])  # written out here, independent of the module's table
    assert torch.equal(e2m1_encode(grid), torch.arange(16, dtype=torch.uint8))  # -0 is code 8
    assert torch.equal(e2m1_decode(torch.arange(16, dtype=torch.uint8)), grid)
    # Through MXFP4: blocks of grid values times 2^k with a 6 in each block come back unchanged.
    g = torch.Generator().manual_seed(0)
    vals = grid[torch.randint(0, 16, (6, 64), generator=g)]
    vals[:, 0], vals[:, 32] = 6.0, -6.0
    x = vals * 2.0 ** torch.randint(-20, 20, (6, 1), generator=g).float()
    assert torch.equal(fmt("mxfp4-spec").quantize_dequantize(x), x)


def test_e2m1_ties_go_to_even_codes():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 9.0, -0.1])
    expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0, 6.0, -0.0])
    got = e2m1_decode(e2m1_encode(ties))
    assert torch.equal(got, expect) and torch.equal(torch.signbit(got), torch.signbit(expect))


def block_amax(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, group).abs().amax(-1)


@FAST
@given(x=tensors)
def test_mxfp4_scale_rules(x):
    """spec: s = 2^(floor(log2 amax) - 2) exactly; 3/4: same s, and the block max maps into [3, 6]."""
    amax = block_amax(x, 32)
    nonzero = amax > 0
    expected = torch.tensor([[2.0 ** (math.floor(math.log2(a)) - 2) if a > 0 else 0.0 for a in r]
                             for r in amax.tolist()])
    for name in ("mxfp4-spec", "mxfp4-34"):
        p = fmt(name).fit(x)
        assert torch.equal(p.scale[nonzero], expected[nonzero])
    p = fmt("mxfp4-34").fit(x)
    y = amax / (p.scale * p.global_scale)
    assert ((y[nonzero] >= 3 * (1 - 1e-6)) & (y[nonzero] < 6)).all()


def test_three_quarters_rule_does_not_clip_where_spec_rule_does():
    x = torch.zeros(1, 32)
    x[0, 0] = 7.9  # 7.9 / 2^0 > 6: clipped to 6 under the spec rule
    assert fmt("mxfp4-spec").quantize_dequantize(x)[0, 0] == 6.0
    assert fmt("mxfp4-34").quantize_dequantize(x)[0, 0] == pytest.approx(8.0)


@FAST
@given(x=tensors)
def test_nvfp4_scales(x):
    f = fmt("nvfp4")
    gs = f.global_scale(x)
    # amax / 2688, as the float32 reciprocal of the 2688 / amax compressed-tensors stores
    assert gs == (1 / (2688 / x.abs().max()) if x.abs().max() > 0 else 1.0)
    assert gs == pytest.approx(x.abs().max().item() / 2688, rel=2**-21) or x.abs().max() == 0  # 2 roundings
    p = f.fit(x)
    assert torch.equal(p.scale.to(torch.float8_e4m3fn).float(), p.scale) and (p.scale > 0).all()
    given_gs = torch.tensor(0.37)
    p = f.fit(x, global_scale=given_gs)
    assert p.global_scale == given_gs
    expect = (block_amax(x, 16) / (6 * given_gs)).clamp(2**-9, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(p.scale, expect)


def test_fp8_codes_are_e4m3_bit_patterns():
    x = make_x(0, 4, 2, "heavy")
    f = fmt("fp8-row")
    q = f.quantize(x)
    scale = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(q.params.scale, scale)
    assert torch.equal(q.codes, (x / scale).to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("name", SPECS)
def test_all_zero_tensor(name):
    f = fmt(name)
    q = f.quantize(torch.zeros(2, 64))
    assert (q.params.scale > 0).all() and torch.isfinite(q.params.scale).all()
    assert torch.equal(f.dequantize(q), torch.zeros(2, 64))


@pytest.mark.parametrize("name", SPECS)
def test_fake_quant_straight_through(name):
    f = fmt(name)
    x = make_x(1, 6, 2, "normal").reshape(2, 3, 64).requires_grad_()
    y = f.fake_quant(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(y.detach(), f.quantize_dequantize(x.detach().reshape(6, 64)).reshape(2, 3, 64))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_int_mse_falls_with_bits(sym, group_size):
    xs = [make_x(seed, 8, 4, "heavy") for seed in range(6)]
    mse = []
    for bits in range(2, 9):
        f = make_format(QuantSpec(bits=bits, symmetric=sym, group_size=group_size))
        mse.append(sum(((f.quantize_dequantize(x) - x) ** 2).mean().item() for x in xs))
    assert all(a > b for a, b in zip(mse, mse[1:])), mse


@pytest.mark.parametrize("sym", [True, False])
@settings(max_examples=10, deadline=None)
@given(x=tensors)
def test_int_clip_search_never_worse(sym, x):
    def group_err(clip_search: bool) -> torch.Tensor:
        f = make_format(QuantSpec(bits=3, symmetric=sym, group_size=32, clip_search=clip_search))
        e = (f.quantize_dequantize(x) - x).abs().pow(CLIP_NORM)
        return e.reshape(x.shape[0], -1, 32).sum(-1)

    plain, searched = group_err(False), group_err(True)
    assert (searched <= plain * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_asymmetric_int_keeps_zero_representable(sign):
    x = sign * (1.0 + torch.rand(4, 64, generator=torch.Generator().manual_seed(0)))  # min > 0 (or max < 0)
    f = make_format(QuantSpec(bits=4, symmetric=False, group_size=32))
    p = f.fit(x)
    z = p.zero
    assert torch.equal(z, z.round()) and ((z >= 0) & (z <= 15)).all()
    assert torch.equal(f.decode(z.to(torch.uint8), p), torch.zeros_like(z))
    x[:, 5] = 0.0
    assert (f.quantize_dequantize(x)[:, 5] == 0).all()


@pytest.mark.parametrize("spec, cols", [(dict(bits=4, group_size=32), 48), (SPECS["mxfp4-spec"], 48),
                                        (SPECS["nvfp4"], 24), (SPECS["fp8-g16-fp16"], 40)])
def test_group_size_not_dividing_columns_raises(spec, cols):
    with pytest.raises(ConfigError, match="group_size"):
        make_format(QuantSpec(**spec)).quantize(torch.randn(2, cols))


@pytest.mark.parametrize("spec, field", [
    (dict(format="mxfp4", group_size=16), "group_size"),
    (dict(format="mxfp4", group_size=32, bits=8), "bits"),
    (dict(format="mxfp4", group_size=32, symmetric=False), "symmetric"),
    (dict(format="mxfp4", group_size=32, clip_search=True), "clip_search"),
    (dict(format="nvfp4", group_size=32), "group_size"),
    (dict(format="nvfp4", group_size=16, scale_rule="three_quarters"), "scale_rule"),
    (dict(format="fp8", bits=4), "bits"),
    (dict(format="fp8", bits=8, symmetric=False), "symmetric"),
    (dict(format="int", bits=9), "bits"),
])
def test_check_names_the_field(spec, field):
    with pytest.raises(ConfigError, match=field):
        QuantSpec(**spec)
