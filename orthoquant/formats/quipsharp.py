"""Our E8 lattice codes in quip-sharp's index layout, and back (the same points, other indices).

orthoquant's codebooks (:mod:`.e8`) hold exactly quip-sharp's points — the abs grid is its
``get_abs_grid()`` row for row — but number them differently: only 856 of the 65,536 E8P12 indices
decode to the same point in both. These maps translate codes for interchange with quip-sharp
checkpoints (``Qidxs`` before its kernel packing, ``maybe_pack_idxs``), as read in
Cornell-RelaxML/quip-sharp ``lib/codebook/latticee8_padded12.py`` (the current, packed-abs-grid
revision) and ``latticee8_padded12_rvq3bit.py``.

**E8P12.** quip-sharp's index is ``abs << 8 | b`` with the same 256 abs patterns ``a``. With
``p = popcount(b) mod 2`` and ``b' = b XOR p`` (only bit 0 toggles), coordinate ``i`` is negative iff bit
``SHUFFLE[i]`` of ``b'`` is set, XOR (for ``i = 7``) the pattern's coordinate sum is odd; the shift is
``−¼`` when ``p = 1`` and ``+¼`` otherwise. (``SHUFFLE`` undoes the nibble order ``[0,2,4,6,1,3,5,7]``
of its packed abs grid, whose 8th nibble carries the odd-pattern sign.) ``popcount(b')`` is always even,
which is how the sign count gets the parity the pattern needs. Ours is ``abs << 8 | neg(1..7) << 1 |
(shift == +¼)`` (see :mod:`.e8`), coordinate 0's sign following from the parity.

**E81B.** quip-sharp's 256 points in its order: the points of E8 with norm² ≤ 2 and integer coordinates
(0 and the 112 ``±e_i ± e_j``), then those with half-integer coordinates (the 128 ``±½`` vectors with an
even coordinate sum), each set in lexicographic order, then ``2e_0 … 2e_7, −2e_0 … −2e_6``; the map is
the permutation between that order and ours.

**Residual codebooks.** A 3- or 4-bit code is its stages' codes concatenated, first stage high, in both
layouts (quip-sharp: ``init << 16 | resid``, so its 3-bit E81B index sits in a 16-bit field): each stage
is mapped on its own.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .e8 import DIM, abs_patterns, e81b_points

SHUFFLE = (0, 4, 1, 5, 2, 6, 3, 7)  # coordinate i's sign bit in quip-sharp's E8P12 sign byte
QUIPSHARP_FIELD = 16  # bits of each stage field in quip-sharp's residual codes


def _bits(x: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) bool: bits 0..n-1 of integer tensor ``x``."""
    return ((x[..., None] >> torch.arange(n, device=x.device)) & 1).bool()


def _odd_pattern(abs_index: torch.Tensor) -> torch.Tensor:
    """Whether each abs pattern's coordinate sum is odd."""
    return abs_patterns().to(abs_index.device).sum(-1).round().long()[abs_index] % 2 == 1


def e8p_to_quipsharp(code: torch.Tensor) -> torch.Tensor:
    """quip-sharp's E8P12 index (int64, same shape) of each of our codes ``code``."""
    code = code.long()
    a = code >> 8
    odd = _odd_pattern(a)
    neg_rest = _bits(code >> 1, DIM - 1)  # coordinates 1..7
    neg0 = (neg_rest.sum(-1) + odd.long()) % 2 == 1
    neg = torch.cat([neg0[..., None], neg_rest], -1)
    neg[..., 7] ^= odd
    p = (code & 1) == 0  # shift −¼
    weights = torch.tensor([1 << s for s in SHUFFLE], device=code.device)
    b = (neg.long() * weights).sum(-1) ^ p.long()
    return a << 8 | b


def e8p_from_quipsharp(index: torch.Tensor) -> torch.Tensor:
    """Our E8P12 code (int64, same shape) of each quip-sharp index ``index``."""
    index = index.long()
    a, b = index >> 8, index & 0xFF
    p = _bits(b, 8).sum(-1) % 2
    bits = _bits(b ^ p, 8)
    neg = bits[..., list(SHUFFLE)]
    neg[..., 7] ^= _odd_pattern(a)
    rest = (neg[..., 1:].long() << torch.arange(DIM - 1, device=index.device)).sum(-1)
    return a << 8 | rest << 1 | (1 - p)


@lru_cache(maxsize=None)
def quipsharp_e81b_points() -> torch.Tensor:
    """(256, 8) float32: E81B in quip-sharp's order (see the module docstring)."""
    ints = torch.cartesian_prod(*[torch.tensor([-1.0, 0.0, 1.0])] * DIM)
    ints = ints[((ints * ints).sum(-1) <= 2) & (ints.sum(-1) % 2 == 0)]
    halves = torch.cartesian_prod(*[torch.tensor([-0.5, 0.5])] * DIM)
    halves = halves[halves.sum(-1) % 2 == 0]
    eye = torch.eye(DIM)
    return torch.cat([ints, halves, 2 * eye, -2 * eye[:DIM - 1]])


@lru_cache(maxsize=None)
def _e81b_permutation() -> tuple[torch.Tensor, torch.Tensor]:
    """(ours -> quip-sharp, quip-sharp -> ours) index tables of E81B, by matching the points."""
    ours, theirs = e81b_points(), quipsharp_e81b_points()
    match = (ours[:, None] == theirs[None]).all(-1)  # (256, 256), one True per row and column
    to_qs = match.float().argmax(1)
    return to_qs, torch.argsort(to_qs)


def e81b_to_quipsharp(code: torch.Tensor) -> torch.Tensor:
    return _e81b_permutation()[0].to(code.device)[code.long()]


def e81b_from_quipsharp(index: torch.Tensor) -> torch.Tensor:
    return _e81b_permutation()[1].to(index.device)[index.long()]


# bits per weight -> per stage (our code bits, ours -> quip-sharp, quip-sharp -> ours)
_STAGES = {
    2: ((16, e8p_to_quipsharp, e8p_from_quipsharp),),
    3: ((16, e8p_to_quipsharp, e8p_from_quipsharp), (8, e81b_to_quipsharp, e81b_from_quipsharp)),
    4: ((16, e8p_to_quipsharp, e8p_from_quipsharp), (16, e8p_to_quipsharp, e8p_from_quipsharp)),
}


def to_quipsharp(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """quip-sharp's ``Qidxs`` (int64, same shape) of our e8p ``codes`` at ``bits`` bits per weight."""
    stages, out, shift = _STAGES[bits], torch.zeros_like(codes, dtype=torch.long), sum(s[0] for s in _STAGES[bits])
    for width, ours_to_qs, _ in stages:
        shift -= width
        out = out << QUIPSHARP_FIELD | ours_to_qs((codes.long() >> shift) & ((1 << width) - 1))
    return out


def from_quipsharp(index: torch.Tensor, bits: int) -> torch.Tensor:
    """Our e8p codes (int64, same shape) of quip-sharp ``Qidxs`` at ``bits`` bits per weight."""
    stages, out = _STAGES[bits], torch.zeros_like(index, dtype=torch.long)
    for k, (width, _, qs_to_ours) in enumerate(stages):
        field = (index.long() >> QUIPSHARP_FIELD * (len(stages) - 1 - k)) & ((1 << QUIPSHARP_FIELD) - 1)
        out = out << width | qs_to_ours(field)
    return out
