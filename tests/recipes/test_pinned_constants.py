"""Format constants and orders that no other test would notice changing.

- the two symmetric INT scale rules (QuaRot's amax/(2^(b−1)−1), the default; IST GPTQ / compressed-tensors'
  2·amax/(2^b−1)), which presets name explicitly, and exact exports of the second;
- the lattice codebooks' gains and opt_scales, by value and by the error they give on Gaussian weights;
- the map between our E8P12/E81B code indices and quip-sharp's;
- compressed-tensors' MXFP4 exponent rounding that formats/fp4.py documents;
- the KV-cache quantizer seeing keys after RoPE and after the online Q/K Hadamard (R3).
"""
from __future__ import annotations

from dataclasses import replace
from importlib import resources

import pytest
import torch
import yaml
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from orthoquant.config import QuantSpec, Recipe
from orthoquant.recipes import preset_names
from orthoquant.errors import ConfigError
from orthoquant.export import export_run, load_quantized
from orthoquant.fakequant.attention import set_kv_quantizers, use_orthoquant_attention
from orthoquant.formats import make_format
from orthoquant.formats.e8 import e81b_points, e8p_points
from orthoquant.formats.fp4 import floor_log2
from orthoquant.formats.lattice import E81B, E8P, LATTICE_CODEBOOKS
from orthoquant.formats.quipsharp import (e81b_from_quipsharp, e81b_to_quipsharp, e8p_from_quipsharp,
                                          e8p_to_quipsharp, from_quipsharp, quipsharp_e81b_points, to_quipsharp)
from orthoquant.hadamard import random_signs
from orthoquant.models.generic import spec_for
from orthoquant.models.tiny import tiny_model
from orthoquant.transforms.base import Hadamard
from orthoquant.transforms.sites import SITES

from helpers import tiny_run, token_windows


# --- symmetric INT scale rules ------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_int_scale_rules(bits):
    """quarot: amax/(2^(b−1)−1), the default; minmax: 2·amax/(2^b−1); both with the code zero 2^(b−1)."""
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(bits)) * torch.arange(1, 6)[:, None]
    amax = x.abs().amax(-1, keepdim=True)
    rules = {"quarot": amax / (2 ** (bits - 1) - 1), "minmax": 2 * amax / (2**bits - 1)}
    for rule, scale in rules.items():
        f = make_format(QuantSpec(bits=bits, scale_rule=rule))
        assert torch.allclose(f.fit(x).scale, scale, rtol=1e-6, atol=0), rule
    assert QuantSpec(bits=bits).scale_rule == "quarot"  # a recipe without the key keeps today's rule
    default = make_format(QuantSpec(bits=bits)).quantize(x)
    quarot = make_format(QuantSpec(bits=bits, scale_rule="quarot")).quantize(x)
    assert torch.equal(default.codes, quarot.codes) and torch.equal(default.params.scale, quarot.params.scale)


def test_minmax_uses_the_whole_signed_range_and_clips_the_positive_max():
    f = make_format(QuantSpec(bits=4, scale_rule="minmax"))
    x = torch.tensor([[-1.5, 1.5, 0.1, -0.2]])
    s = 2 * 1.5 / 15
    assert torch.allclose(f.quantize_dequantize(x)[0, :2], torch.tensor([-8 * s, 7 * s]))
    q = make_format(QuantSpec(bits=4)).quantize_dequantize(x)
    assert torch.allclose(q[0, :2], torch.tensor([-1.5, 1.5]))  # quarot: amax on the grid


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_full_range_puts_each_groups_largest_magnitude_on_the_lowest_code(bits):
    """The scale is signed: −x_ext/2^(b−1), so x_ext decodes exactly from code 0 whichever its sign, and
    the other side's max clips by at most one step."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 64, generator=g)
    x[::2, 5] = x.abs().amax() * 1.5  # rows whose extreme is positive
    x[1::2, 7] = -x.abs().amax() * 1.5  # and negative
    f = make_format(QuantSpec(bits=bits, group_size=32, scale_rule="full_range"))
    q = f.quantize(x)
    amax = x.abs().reshape(6, 2, 32).amax(-1)
    assert torch.allclose(q.params.scale.abs(), amax / 2 ** (bits - 1), rtol=1e-6, atol=0)
    assert (q.params.scale[::2, 0] < 0).all() and (q.params.scale[1::2, 0] > 0).all()
    y = f.dequantize(q)
    assert torch.equal(q.codes[::2, 5], torch.zeros(3, dtype=torch.uint8)) and torch.equal(y[::2, 5], x[::2, 5])
    assert torch.equal(q.codes[1::2, 7], torch.zeros(3, dtype=torch.uint8)) and torch.equal(y[1::2, 7], x[1::2, 7])
    step = q.params.scale.abs().repeat_interleave(32, dim=1)
    assert ((y - x).abs() <= step * (1 + 1e-6)).all()
    assert len(q.codes.unique()) == 2**bits  # every code in use
    # a finer step than quarot's amax/(2^(b-1)-1) at the same clip: lower error on Gaussian weights
    quarot = make_format(QuantSpec(bits=bits, group_size=32)).quantize_dequantize(x)
    assert float((y - x).square().sum()) < float((quarot - x).square().sum())


def test_scale_rules_are_checked_per_format():
    with pytest.raises(ConfigError, match="scale_rule"):
        QuantSpec(bits=4, symmetric=False, scale_rule="minmax")
    with pytest.raises(ConfigError, match="scale_rule"):
        QuantSpec(bits=4, scale_rule="three_quarters")
    with pytest.raises(ConfigError, match="scale_rule"):
        QuantSpec(format="mxfp4", group_size=32, scale_rule="minmax")
    assert QuantSpec(format="mxfp4", group_size=32).scale_rule == "spec"


def _quantized_specs(data: dict):
    for key in ("weights", "activations", "kv_cache"):
        if data.get(key):
            yield key, data[key]
    for o in data.get("overrides") or ():
        for key in ("weights", "activations"):
            if o.get(key):
                yield f"overrides.{key}", {**data[key], **o[key]}


@pytest.mark.parametrize("name", preset_names())
def test_presets_name_the_scale_rule_of_symmetric_int_and_mxfp4(name):
    text = resources.files("orthoquant.recipes").joinpath(f"{name}.yaml").read_text()
    for key, spec in _quantized_specs(yaml.safe_load(text)):
        if spec.get("format", "int") in ("int", "mxfp4") and spec.get("symmetric", True):
            assert "scale_rule" in spec, f"{name}: {key} does not say its scale_rule"


W4G32_MINMAX = {"format": "int", "bits": 4, "symmetric": True, "group_size": 32, "scale_rule": "minmax",
                "scale_dtype": "float16"}  # GPTQ stores float16 scales


@pytest.mark.parametrize("rule", ["minmax", "full_range"])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_minmax_int_weights_export_exactly(fmt, rule, tmp_path, tokenizer):
    """CT's symmetric int and GPTQ v1 (zero 2^(b−1)) hold minmax codes and scales as they are, and
    full_range's negative scales too."""
    vocab = len(tokenizer)
    recipe = Recipe.from_dict({"name": "t", "weights": {**W4G32_MINMAX, "scale_rule": rule},
                               "solver": {"name": "gptq"}, "calibration": {"batch_size": 4}})
    model, _ = tiny_run(tmp_path, recipe, tokenizer)
    export_run(tmp_path / "run", tmp_path / "out", fmt)  # verifies the reload itself, raises on a mismatch
    test = token_windows(2, 32, 1, vocab=vocab)
    with torch.no_grad():
        a, b = model(test).logits, load_quantized(tmp_path / "out")(test).logits
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5


# --- lattice constants ------------------------------------------------------------------------
def relative_mse(bits: int, x: torch.Tensor, stages=None, opt_scale=None) -> float:
    """‖Q(x) − x‖² / ‖x‖² with the e8p format, optionally with other stages / opt_scale."""
    f = make_format(QuantSpec(format="e8p", bits=bits, group_size=0))
    f.stages = stages or f.stages
    f.opt_scale = opt_scale or f.opt_scale
    return float((f.quantize_dequantize(x) - x).square().sum() / x.square().sum())


@pytest.fixture(scope="module")
def gaussian():
    return torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))


def test_lattice_constants_by_value():
    assert LATTICE_CODEBOOKS[2] == ((E8P,), 1.03)
    assert LATTICE_CODEBOOKS[3] == ((E8P, replace(E81B, gain=2.04)), 0.98)
    assert LATTICE_CODEBOOKS[4] == ((E8P, replace(E8P, gain=3.8)), 0.9)


def test_4bit_rvq_constants_beat_the_papers(gaussian):
    """0.9 / 3.8 (tuned with the exact search) against QuIP#'s 1.03 / 3.45: lower MSE on N(0, 1)."""
    ours = relative_mse(4, gaussian)
    paper = relative_mse(4, gaussian, (E8P, replace(E8P, gain=3.45)), 1.03)
    assert ours < 0.95 * paper


@pytest.mark.parametrize("gain", [1.9, 2.2, 2.5])
def test_e81b_gain_is_the_best_of_its_neighbours(gaussian, gain):
    assert relative_mse(3, gaussian) < relative_mse(3, gaussian, (E8P, replace(E81B, gain=gain)))


@pytest.mark.parametrize("bits, other", [(2, 0.95), (2, 1.1), (3, 0.9), (3, 1.05)])
def test_opt_scales_are_the_best_of_their_neighbours(gaussian, bits, other):
    assert relative_mse(bits, gaussian) < relative_mse(bits, gaussian, opt_scale=other)


# --- quip-sharp's code layout -----------------------------------------------------------------
def test_e8p_map_to_quipsharp_is_a_bijection_onto_the_same_points():
    ours = torch.arange(1 << 16)
    qs = e8p_to_quipsharp(ours)
    assert torch.equal(torch.sort(qs).values, ours)
    assert torch.equal(e8p_from_quipsharp(qs), ours)
    # quip-sharp's decode, written from its layout: abs << 8 | sign byte b; p = parity(b) picks −¼ (1) / +¼;
    # b XOR p, then coordinate i's sign is bit [0,4,1,5,2,6,3,7][i], the last one flipped for odd patterns.
    from orthoquant.formats.e8 import abs_patterns
    a, b = qs >> 8, qs & 0xFF
    p = torch.stack([(b >> i) & 1 for i in range(8)], -1).sum(-1) % 2
    b = b ^ p
    sign_bit = torch.stack([(b >> s) & 1 for s in (0, 4, 1, 5, 2, 6, 3, 7)], -1).bool()
    pattern = abs_patterns()[a].float()
    sign_bit[:, 7] ^= pattern.sum(-1).round().long() % 2 == 1
    points = torch.where(sign_bit, -pattern, pattern) + torch.where(p == 1, -0.25, 0.25)[:, None]
    assert torch.equal(points, e8p_points())
    assert int((qs == ours).sum()) < 1000  # the two layouts differ almost everywhere


def test_quipsharp_index_zero_is_the_all_three_quarters_point():
    """Hand-derived: index 0 is pattern ½·1, no sign bits, parity 0 → +¼."""
    assert torch.equal(e8p_points()[e8p_from_quipsharp(torch.tensor(0))], torch.full((8,), 0.75))


def test_e81b_map_to_quipsharp():
    ours = torch.arange(256)
    assert torch.equal(e81b_from_quipsharp(e81b_to_quipsharp(ours)), ours)
    assert torch.equal(e81b_points()[e81b_from_quipsharp(ours)], quipsharp_e81b_points())
    assert torch.equal(quipsharp_e81b_points()[113], torch.full((8,), -0.5))  # first half-integer point


def test_our_e81b_layout_is_the_documented_one():
    """0, the 112 ±e_i±e_j (pairs i<j row by row; signs ++, +−, −+, −− as blocks), the 128 ±½ vectors
    with an even number of −½ (sign bits counting up, coordinate 0 lowest), 2e_0..2e_7, −2e_0..−2e_6."""
    g, eye = e81b_points(), torch.eye(8)
    i, j = torch.triu_indices(8, 8, 1)
    pairs = torch.cat([eye[i] + eye[j], eye[i] - eye[j], -eye[i] + eye[j], -eye[i] - eye[j]])
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    halves = 0.5 - bits[bits.sum(-1) % 2 == 0].float()
    expected = torch.cat([torch.zeros(1, 8), pairs, halves, 2 * eye, -2 * eye[:7]])
    assert torch.equal(g, expected)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_residual_codes_round_trip_through_quipsharp(bits):
    f = make_format(QuantSpec(format="e8p", bits=bits, group_size=0))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(bits))
    q = f.quantize(x)
    qs = to_quipsharp(q.codes, bits)
    assert torch.equal(from_quipsharp(qs, bits), q.codes)
    first = (qs >> 16) if bits > 2 else qs  # quip-sharp's init << 16 | resid
    assert torch.equal(e8p_points()[e8p_from_quipsharp(first)],
                       e8p_points()[(q.codes >> (f.code_bits - 16)) & 0xFFFF])


# --- compressed-tensors' MXFP4 exponent -------------------------------------------------------
def test_compressed_tensors_mx_scale_rounds_the_exponent_up_from_mantissa_1_75():
    """What formats/fp4.py says of compressed-tensors 0.20: the OCP exponent, plus one when the block
    amax's mantissa is ≥ 1.75 (checked against the installed package)."""
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    amax = torch.randn(4096, generator=torch.Generator().manual_seed(0)).abs() * 10 + 1e-3
    amax = torch.cat([amax, torch.tensor([1.75, 1.7499999, 3.5, 7.0, 6.0])])
    mantissa = amax / torch.ldexp(torch.ones_like(amax), floor_log2(amax))
    expected = floor_log2(amax) - 2 + (mantissa >= 1.75).int() + 127
    assert torch.equal(generate_mx_scales(amax).int(), expected)
    ours = make_format(QuantSpec(format="mxfp4", group_size=32)).fit(amax[:, None].expand(-1, 32).contiguous())
    assert torch.equal(floor_log2(ours.scale[:, 0]) + 127 + (mantissa >= 1.75).int(), expected)


# --- KV cache after RoPE and R3 ---------------------------------------------------------------
def test_kv_quantizer_receives_hadamard_rotated_post_rope_keys():
    model = tiny_model("llama")
    use_orthoquant_attention(model)
    arch, layer = spec_for(model.config), model.model.layers[0]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    t = Hadamard(head_dim, random_signs(head_dim, 3))
    SITES.get("qk").attach(layer, arch, None, t)  # R3 as a recipe installs it
    seen = {}

    def record_rope_keys(q, k):
        seen["rope"] = k
        return q, k

    attention = layer.self_attn
    attention.orthoquant_qk = (record_rope_keys,) + attention.orthoquant_qk
    set_kv_quantizers(attention, lambda k: seen.setdefault("kv", k), None)
    keys = {}
    attention.k_proj.register_forward_hook(lambda m, i, o: keys.setdefault("k", o))
    tokens = token_windows(2, 10, vocab=model.config.vocab_size)
    with torch.no_grad():
        model(tokens)
        k = keys["k"].view(2, 10, -1, head_dim).transpose(1, 2)
        positions = torch.arange(10)[None].expand(2, -1)
        cos, sin = model.model.rotary_emb(k, positions)
        _, rope_k = apply_rotary_pos_emb(k, k, cos, sin)
    assert torch.allclose(seen["rope"], rope_k, atol=1e-6)
    assert torch.allclose(seen["kv"], t.forward(rope_k), atol=1e-6)
    assert not torch.allclose(seen["kv"], rope_k, atol=1e-2)
