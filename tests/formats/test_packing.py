"""Bit packing: exact round trips, the pinned layout, and agreement with a big-integer reference."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthoquant.formats import packing
from orthoquant.formats.packing import pack_codes, pack_nibbles, unpack_codes, unpack_nibbles

FAST = settings(max_examples=40, deadline=None)


def random_codes(seed: int, rows: int, cols: int, bits: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)


def reference_words(row: list[int], bits: int) -> list[int]:
    """One row packed as a Python big integer bit stream, cut into signed 32-bit words."""
    stream = sum(c << (bits * i) for i, c in enumerate(row))
    words = []
    for w in range(math.ceil(len(row) * bits / 32)):
        u = (stream >> (32 * w)) & 0xFFFFFFFF
        words.append(u - (1 << 32) if u >= 1 << 31 else u)
    return words


@FAST
@given(bits=st.integers(2, 8), rows=st.integers(0, 4), cols=st.integers(0, 100), seed=st.integers(0, 2**16))
def test_pack_round_trip(bits, rows, cols, seed):
    codes = random_codes(seed, rows, cols, bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, math.ceil(cols * bits / 32))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


@FAST
@given(bits=st.integers(2, 8), cols=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_matches_big_integer_stream(bits, cols, seed):
    codes = random_codes(seed, 2, cols, bits)
    packed = pack_codes(codes, bits)
    for r in range(2):
        assert packed[r].tolist() == reference_words(codes[r].tolist(), bits)


@pytest.mark.parametrize(
    "bits, codes, words",
    [
        (4, [1, 2, 3, 4, 5, 6, 7, 8], [0x87654321 - (1 << 32)]),  # GPTQ int4: q[i] << 4·i
        (2, [1, 2, 3], [1 | 2 << 2 | 3 << 4]),
        (8, [1, 2, 3, 4, 5], [0x04030201, 5]),
        # 3 bits: code 10 starts at bit 30 and spills its top bit into word 1 (GPTQ 3-bit layout).
        (3, [7] + [0] * 9 + [5, 3], [7 | 1 << 30, 1 | 3 << 1]),
        (3, [7] * 32, [-1, -1, -1]),  # 32 codes fill exactly 3 words
        (5, [0] * 6 + [31], [(3 << 30) - (1 << 32), 7]),  # code 6 at bits 30..34
    ],
)
def test_pinned_layout(bits, codes, words):
    c = torch.tensor([codes], dtype=torch.uint8)
    assert pack_codes(c, bits).tolist() == [words]
    assert unpack_codes(torch.tensor([words], dtype=torch.int32), bits, len(codes)).tolist() == [codes]


def test_pack_row_chunks(monkeypatch):
    """Tensors larger than one chunk are packed chunk by chunk with the same result."""
    codes = random_codes(3, 11, 45, 5)
    whole = pack_codes(codes, 5)
    monkeypatch.setattr(packing, "_CHUNK_CODES", 64)
    assert torch.equal(pack_codes(codes, 5), whole)
    assert torch.equal(unpack_codes(whole, 5, 45), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(torch.tensor([[16]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="words"):
        unpack_codes(torch.zeros(1, 2, dtype=torch.int32), 4, 8)


@FAST
@given(rows=st.integers(0, 4), cols=st.integers(0, 41), seed=st.integers(0, 2**16))
def test_nibbles_round_trip(rows, cols, seed):
    codes = random_codes(seed, rows, cols, 4)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, math.ceil(cols / 2))
    assert torch.equal(unpack_nibbles(packed, cols), codes)


def test_nibbles_pinned_and_match_int32_stream():
    assert pack_nibbles(torch.tensor([[1, 2, 3]], dtype=torch.uint8)).tolist() == [[0x21, 0x03]]
    # Little-endian bytes of the int32 stream are the nibble pairs: both layouts agree on the bits.
    codes = random_codes(0, 3, 24, 4)
    assert torch.equal(pack_nibbles(codes).view(torch.int32), pack_codes(codes, 4))
