"""Codebooks on the E8 lattice (QuIP#, Tseng et al. 2024): E8P12 (16 bits per 8 weights) and E8-1bit.

**E8P12** holds 2^16 points of ``E8 + ¼``: ``s ⊙ a ± ¼·1`` where

- ``a`` is one of 256 absolute patterns with entries in {½, 3/2, 5/2, 7/2}: the 227 patterns of squared
  norm ≤ 10 (every abs pattern of ``D8 + ½`` in that ball) in lexicographic order, then the 29 patterns of
  norm² 12 (five 3/2, three ½) that quip-sharp's ``lib/codebook/latticee8_padded12.py`` lists, in its order;
- ``s`` is a sign vector with an even signed coordinate sum, so that ``s ⊙ a ∈ D8 + ½`` (the even
  coset ``D̂8``); flipping one sign changes that sum by an odd number, so 7 signs are free and the first
  one follows from the parity;
- the shift is ``+¼`` or ``−¼``.

A code is ``abs_index << 8 | negative(1..7) << 1 | (shift == +¼)``, bit ``j`` of the sign field saying
that coordinate ``j + 1`` is negative.

Nearest-point search is exact and needs no table of the 2^16 points: for a shift ``t`` and ``y = x − t``,
``‖y − s⊙a‖² = ‖y‖² + ‖a‖² − 2 Σ s_i a_i y_i``. The best signs are ``sign(y)``, and when their parity is
wrong for ``a`` the cheapest fix flips the coordinate with the smallest ``a_i |y_i|``. One GEMM gives
every pattern's gain without the fix; the best pattern needing no fix and the top pattern needing one
(its fix evaluated exactly) are the only candidates (:func:`_best_pattern` proves it), so a vector
costs a 9×256 product, two maxima and a few 8-wide operations per shift. The result equals brute force
over all 2^16 points (tested).

**E8-1bit** (E81B, QuIP#'s 3-bit residual stage): 256 points of E8: 0, the 240 roots (norm² 2) and 15 of
the 16 vectors ``±2e_i`` (all but ``−2e_7``); searched exhaustively.
"""
from __future__ import annotations

from functools import lru_cache

import torch

DIM = 8
# The 29 norm²-12 patterns of quip-sharp's E8P12 codebook, in units of ½ (its current revision; an older
# one repeated "13331133" in place of "11331333").
NORM12 = ("31113333", "13113333", "11313333", "11133333", "33313311", "33313131", "33311331", "33313113",
          "33311313", "33311133", "33133311", "33133131", "33131331", "33133113", "33131313", "33131133",
          "31333311", "31333131", "31331331", "31333113", "31331313", "13331133", "13333311", "13333131",
          "13331331", "13333113", "13331313", "11331333", "33113331")
_CHUNK = 16384  # vectors per search step: bounds the (chunk, 256) score tensors to a few MiB


@lru_cache(maxsize=None)
def abs_patterns() -> torch.Tensor:
    """(256, 8) float64: the absolute patterns, index = the code's high byte."""
    halves = torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.float64)
    grid = torch.cartesian_prod(*[halves] * DIM)  # lexicographic order
    small = grid[(grid * grid).sum(-1) <= 10]
    norm12 = torch.tensor([[int(c) for c in p] for p in NORM12], dtype=torch.float64) / 2
    return torch.cat([small, norm12])


def _parity(a: torch.Tensor) -> torch.Tensor:
    """(..., 256) int64: the parity the number of negative signs must have for each pattern."""
    return a.sum(-1).round().long() % 2


@lru_cache(maxsize=None)
def e8p_points() -> torch.Tensor:
    """(65536, 8) float32: every point of E8P12, indexed by its code (exact: multiples of ¼)."""
    code = torch.arange(1 << 16)
    a = abs_patterns()[code >> 8]
    neg = ((code[:, None] >> torch.arange(1, DIM)) & 1).bool()  # coordinates 1..7
    neg0 = (neg.sum(-1) + _parity(a)) % 2 == 1
    signs = 1 - 2 * torch.cat([neg0[:, None], neg], 1).double()
    shift = torch.where(code & 1 == 1, 0.25, -0.25).double()
    return (signs * a + shift[:, None]).float()


@lru_cache(maxsize=None)
def e81b_points() -> torch.Tensor:
    """(256, 8) float32: 0, the 240 roots of E8, and ``±2e_i`` except ``−2e_7``."""
    eye = torch.eye(DIM)
    i, j = torch.triu_indices(DIM, DIM, 1)
    pairs = eye[i] + eye[j], eye[i] - eye[j], -eye[i] + eye[j], -eye[i] - eye[j]
    signs = 1 - 2 * ((torch.arange(256)[:, None] >> torch.arange(DIM)) & 1).float()
    halves = 0.5 * signs[signs.sum(-1) % 4 == 0]  # an even number of −½: even coordinate sum
    twos = torch.cat([2 * eye, -2 * eye[:DIM - 1]])
    return torch.cat([torch.zeros(1, DIM), *pairs, halves, twos])


class _Tables:
    """Per-device, per-dtype constants of the E8P search (built once, reused by every call).

    ``gains[p]`` maps ``[|y|, 1]`` to the fix-free gains ``2 a·|y| − ‖a‖²`` of the patterns whose
    coordinate sum has parity ``p`` (indices ``index[p]``); ``a`` is the (256, 8) pattern table.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        a = abs_patterns()
        parity = _parity(a)
        gain_matrix = torch.cat([2 * a.T, -(a * a).sum(-1)[None]])  # (9, 256): no bias add after the GEMM
        self.index = [torch.nonzero(parity == p)[:, 0].to(device) for p in (0, 1)]
        self.gains = [gain_matrix[:, i.cpu()].to(device, dtype).contiguous() for i in self.index]
        self.a = a.to(device, dtype)


@lru_cache(maxsize=None)
def _tables(device: torch.device, dtype: torch.dtype) -> _Tables:
    return _Tables(device, dtype)


def _best_pattern(y: torch.Tensor, t: _Tables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best pattern for shifted vectors ``y`` (R, 8): (index (R,), gain (R,), parity fix needed (R,)).

    ``gain = 2 Σ s_i a_i y_i − ‖a‖²`` with the best admissible signs, so ``‖y − s⊙a‖² = ‖y‖² − gain``.
    Among the patterns that need a parity fix only the one with the largest fix-free gain ``u`` can
    win: with μ = min_i |y_i| at coordinate k, every fixed gain is at most its fix-free gain − 2μ
    (a_i ≥ ½), so none beats ``u − 2μ``; and either that top pattern has ``a_k = ½`` (its fix costs
    exactly 2μ) or lowering ``a_k`` by 1 gives a pattern of the codebook (a smaller norm, or a norm-12
    pattern turned into a norm-10 one) that needs no fix and gains at least ``u − 2μ + 2``.
    """
    aug = torch.cat([y.abs(), torch.ones_like(y[:, :1])], 1)
    (g0, j0), (g1, j1) = ((aug @ m).max(-1) for m in t.gains)
    i0, i1 = t.index[0][j0], t.index[1][j1]
    odd = (y < 0).sum(-1) % 2 == 1  # sign(y) suits the odd patterns: the even ones need a fix
    fix_bound, fix_idx = torch.where(odd, g0, g1), torch.where(odd, i0, i1)
    fixed = fix_bound - 4 * (t.a[fix_idx] * aug[:, :DIM]).amin(-1)
    free = torch.where(odd, g1, g0)
    fix = fixed > free
    return torch.where(fix, fix_idx, torch.where(odd, i1, i0)), torch.where(fix, fixed, free), fix


def _encode_chunk(x: torch.Tensor, t: _Tables) -> torch.Tensor:
    """Codes (N,) int64 of the nearest E8P12 points to ``x`` (N, 8): both shifts searched as one batch."""
    n = len(x)
    y = torch.cat([x + 0.25, x - 0.25])  # y = x − shift for the shifts −¼, then +¼
    idx, gain, fix = _best_pattern(y, t)
    plus = ((y * y).sum(-1) - gain).view(2, n).diff(dim=0)[0] < 0
    pick = torch.arange(n, device=x.device) + n * plus
    y, idx, fix = y[pick], idx[pick], fix[pick]
    neg = y < 0
    flip = (t.a[idx] * y.abs()).argmin(-1)  # the sign a parity fix flips: the cheapest one
    neg[torch.arange(n, device=x.device), flip] ^= fix
    bits = (neg[:, 1:].long() << torch.arange(DIM - 1, device=x.device)).sum(-1)
    return idx << 8 | bits << 1 | plus.long()


def e8p_encode(x: torch.Tensor) -> torch.Tensor:
    """Exact nearest-point codes of E8P12.

    :param x: (N, 8) float32 or float64 (the search runs in this dtype; others run in float32).
    :return: (N,) int64 codes in [0, 2^16); exact ties (measure zero) are broken arbitrarily.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    t = _tables(x.device, x.dtype)
    return torch.cat([_encode_chunk(c, t) for c in x.split(_CHUNK)]) if len(x) else x.new_zeros(0, dtype=torch.long)


def e81b_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest-point codes (N,) int64 in [0, 256) of E81B for ``x`` (N, 8), by exhaustive search."""
    g = e81b_points().to(x)
    norm = (g * g).sum(-1)
    return torch.cat([(2 * c @ g.T - norm).argmax(-1) for c in x.split(_CHUNK)]) if len(x) else \
        x.new_zeros(0, dtype=torch.long)
