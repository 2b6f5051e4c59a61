"""The fused FP4 fake-quant (``FP4Format.quantize_dequantize``, the activation quantizer's hot path) is the
codes path ``decode(encode(x))`` bit for bit: same values, same signs of zero, same saturation and NaN
handling, for MXFP4 (both scale rules) and NVFP4 (dynamic and given global scale)."""
from __future__ import annotations

import pytest
import torch

from orthoquant.config import QuantSpec
from orthoquant.fakequant.static_inputs import BUFFER, global_scale_of, static_fake_quant
from orthoquant.formats import make_format
from orthoquant.formats.base import QuantFormat
from orthoquant.formats.fp4 import E2M1_VALUES, e2m1_decode, e2m1_encode, e2m1_round

SPECS = {
    "mxfp4-spec": dict(format="mxfp4", group_size=32),
    "mxfp4-34": dict(format="mxfp4", group_size=32, scale_rule="three_quarters"),
    "mxfp4-clip": dict(format="mxfp4", group_size=32, clip_ratio=0.8),
    "nvfp4": dict(format="nvfp4", group_size=16),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns: equal bits also means the same sign of zero (``torch.equal`` has -0 == 0)."""
    return t.contiguous().view(torch.int32)


def codes_path(y: torch.Tensor) -> torch.Tensor:
    return e2m1_decode(e2m1_encode(y))


def every_kind_of_float() -> torch.Tensor:
    """Float32 bit patterns at a stride over all of them (both signs: zeros, subnormals, normals, ±inf, NaNs),
    every E2M1 midpoint and grid value with its two float32 neighbours, and small multiples of 1/8."""
    stride = torch.arange(0, 2**31, 1021, dtype=torch.int64).to(torch.int32).view(torch.float32)
    specials = torch.tensor([0.0, 2.0**-149, 2.0**-126, float("inf"), float("nan"), 6.0, 7.999, 1e30])
    grid = E2M1_VALUES[:8]
    marks = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
    near = torch.cat([marks, torch.nextafter(marks, torch.tensor(-1.0)), torch.nextafter(marks, torch.tensor(9.0))])
    eighths = torch.arange(0, 80) / 8
    pos = torch.cat([stride, specials, near, eighths])
    return torch.cat([pos, -pos])


def test_e2m1_round_is_decode_of_encode_bit_for_bit():
    y = every_kind_of_float()
    assert torch.equal(bits(e2m1_round(y)), bits(codes_path(y)))


def test_e2m1_round_ties_and_edges_written_out():
    """Independent of both implementations: ties to the even code, saturation, −0, NaN to ±6."""
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.0001, 7.0, float("inf"), -0.1, -0.0, float("nan"),
                      -float("nan")])
    expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -0.0, -0.0, 6.0, -6.0])
    assert torch.equal(bits(e2m1_round(y)), bits(expect))


def tensors(seed: int) -> dict[str, torch.Tensor]:
    """(8, 96) tensors whose blocks span many magnitudes, with exact ties, zero blocks and non-finite values."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(8, 96, generator=g)
    spread = normal * 2.0 ** torch.randint(-140, 120, (8, 1), generator=g).float()
    ties = torch.randint(-48, 49, (8, 96), generator=g) / 8.0  # midpoints of E2M1 times power-of-two scales
    ties[:, ::16] = 6.0  # a block max that makes the scale 1 (MXFP4) so the ties stay ties
    zeros = normal.clone()
    zeros[:, :32] = 0.0
    zeros[0, 32:48] = -0.0
    non_finite = normal.clone()
    non_finite[0, 3], non_finite[1, 40], non_finite[2, 70] = float("inf"), float("nan"), -float("inf")
    tiny = normal * 1e-41  # subnormal inputs
    return {"spread": spread, "ties": ties, "zeros": zeros, "non_finite": non_finite, "tiny": tiny,
            "heavy": normal * torch.exp(2 * torch.randn(8, 96, generator=g))}


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("seed", range(4))
def test_fused_quantize_dequantize_is_the_codes_path(name, seed):
    f = make_format(QuantSpec(**SPECS[name]))
    for kind, x in tensors(seed).items():
        fused, reference = f.quantize_dequantize(x), QuantFormat.quantize_dequantize(f, x)
        assert torch.equal(bits(fused), bits(reference)), kind


@pytest.mark.parametrize("global_scale", [0.37, 1e-30, 3e4])
def test_fused_nvfp4_with_a_given_global_scale(global_scale):
    f = make_format(QuantSpec(**SPECS["nvfp4"]))
    gs = torch.tensor(global_scale)
    for kind, x in tensors(7).items():
        fused, reference = f.quantize_dequantize(x, gs), QuantFormat.quantize_dequantize(f, x, gs)
        assert torch.equal(bits(fused), bits(reference)), kind


def test_static_nvfp4_input_quantizer_is_the_codes_path():
    """The static-input quantizer (stored global scale) goes through the fused path with the same values."""
    f = make_format(QuantSpec(**SPECS["nvfp4"], static=True))
    linear = torch.nn.Linear(96, 4)
    linear.register_buffer(BUFFER, global_scale_of(11.0))
    x = tensors(3)["heavy"].reshape(2, 4, 96)
    gs = (1 / getattr(linear, BUFFER)).reshape(())
    rows = x.reshape(-1, 96)
    params = f.fit(rows, gs).columns(96)
    expect = f.decode(f.encode(rows, params), params).reshape(x.shape)
    assert torch.equal(bits(static_fake_quant(f, linear, x)), bits(expect))
