"""Orthonormal Hadamard matrices of order n = K·2^m.

``Had_n = (H_K ⊗ H_{2^m}) / √n`` with K the **slow** index: entry ``i = k·2^m + j`` of a vector
belongs to row k of H_K and row j of the Sylvester H_{2^m}. This is the layout of QuIP#'s
``matmul_hadU``, QuaRot and the 12N/20N/28N/40N kernels of fast-hadamard-transform.

H_K comes from, in order of preference:

- the stored ±1 tables in ``data/hadamards.safetensors`` (see ``scripts/build_hadamard_data.py``),
  loaded lazily, one key at a time;
- Paley I/II over GF(q), q a prime power (:mod:`orthoquant.hadamard.paley`);
- Sylvester for K a power of two.

Most H_K are not symmetric, so ``Had_n⁻¹ = Had_nᵀ`` and not ``Had_n``. Every H_K is checked against
``H Hᵀ = K·I`` when it is first built, and cached.
"""
from __future__ import annotations

import hashlib
import logging
import operator
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ConfigError
from .paley import paley_hadamard, paley_source

__all__ = [
    "MAX_K",
    "block_hadamard",
    "hadamard_base",
    "hadamard_digest",
    "hadamard_factor",
    "hadamard_matrix",
    "hadamard_source",
    "is_pow2",
    "stored_orders",
    "sylvester",
]

logger = logging.getLogger(__name__)

DATA_FILE = Path(__file__).parent / "data" / "hadamards.safetensors"
# Largest non-power-of-two factor we construct: the H_K matmul costs K flops per entry, and a Paley
# matrix of order K takes O(K²) memory to build. 924 (Qwen2.5-72B) is the largest one in use.
MAX_K = 4096


def is_pow2(n: int) -> bool:
    """True for 1, 2, 4, 8, …"""
    return n > 0 and n & (n - 1) == 0


@lru_cache(maxsize=None)
def stored_orders() -> tuple[int, ...]:
    """Orders K of the ±1 matrices in the data file, ascending (reads only the file header)."""
    with safe_open(str(DATA_FILE), framework="pt") as f:
        return tuple(sorted(int(k) for k in f.keys()))


def sylvester(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix in natural order, ``H[i, j] = (-1)^popcount(i & j)``: ±1 int8 [n, n]."""
    assert is_pow2(n), f"Sylvester order must be a power of two, got {n}"
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_source(k: int) -> str | None:
    """Where H_k comes from: "stored", "sylvester", "paley1(q=…)", "paley2(q=…)", or None."""
    if k in stored_orders():
        return "stored"
    if is_pow2(k):
        return "sylvester"
    if k % 4 or k > MAX_K:
        return None
    return paley_source(k)


def _check_hadamard(h: torch.Tensor, k: int) -> None:
    """Raise unless ``h`` is ±1 with ``h hᵀ = k·I`` (Freivalds' test: 32 random ±1 probes, exact).

    A wrong matrix passes one probe with probability ≤ 1/2, so all 32 with ≤ 2⁻³²; the tests run
    the full product. Integer sums stay far below 2⁵³, so float64 is exact here.
    """
    hd = h.double()
    g = torch.Generator().manual_seed(k)
    v = torch.randint(0, 2, (k, 32), generator=g).double() * 2 - 1
    if hd.abs().ne(1).any() or not torch.equal(hd @ (hd.T @ v), k * v):
        raise RuntimeError(f"H_{k} is not a Hadamard matrix (H Hᵀ != {k}·I): corrupt data or bug")


@lru_cache(maxsize=None)
def _base(k: int) -> torch.Tensor:
    source = hadamard_source(k)
    if source == "stored":
        with safe_open(str(DATA_FILE), framework="pt") as f:
            h = f.get_tensor(str(k))
    elif source == "sylvester":
        h = sylvester(k)
    elif source is not None:
        h = paley_hadamard(k)
    else:
        raise ConfigError(f"no Hadamard matrix of order {k} is stored or constructible")
    h = h.to(torch.int8).contiguous()
    _check_hadamard(h, k)
    logger.debug("H_%d from %s", k, source)
    return h


def hadamard_base(k: int) -> torch.Tensor:
    """The unnormalised ±1 H_k used for the factor K (a fresh copy of the cached matrix).

    :param k: order: a stored order, a Paley order or a power of two.
    :returns: int8 [k, k] with ``H Hᵀ = k·I``.
    """
    return _base(k).clone()


def _as_order(n: object) -> int:
    """n as a positive int (ints and integer scalars from numpy/torch; not floats, not bools)."""
    try:
        order = -1 if isinstance(n, bool) else operator.index(n)
    except TypeError:
        order = -1
    if order < 1:
        raise ConfigError(f"Hadamard order must be a positive integer, got {n!r}")
    return order


@lru_cache(maxsize=None, typed=True)
def hadamard_factor(n: int) -> tuple[int, int]:
    """The factorisation ``n = K·2^m`` used for Had_n.

    K is the smallest ``odd(n)·2^a`` (a ≥ 2, or K = 1 for a power of two) that is stored or
    constructible; every stored K is 4·odd, so a stored K is always the smallest candidate.

    :param n: the order, a positive integer.
    :returns: ``(K, 2^m)``.
    :raises ConfigError: naming n when no factor K ≤ ``MAX_K`` works: n odd > 1 or n = 2·odd (no
        Hadamard matrix exists), or an order without a construction here, such as 268 or 13696.
    """
    n = _as_order(n)
    odd, two = n, 1
    while odd % 2 == 0:
        odd, two = odd // 2, two * 2
    if odd == 1:
        return 1, n
    k = 4 * odd
    while k <= min(n, MAX_K):
        if hadamard_source(k) is not None:
            return k, n // k
        k *= 2
    why = ("no Hadamard matrix exists (orders are 1, 2 or multiples of 4)" if two < 4 else
           f"no H_K with K = {odd}·2^a ≤ {min(n, MAX_K)} is stored or Paley-constructible")
    hint = f"; use a block-diagonal Hadamard (block_hadamard), e.g. block={two}" if two > 1 else ""
    raise ConfigError(f"no Hadamard matrix of order n={n} (= {odd}·{two}): {why}{hint}")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense orthonormal ``Had_n = (H_K ⊗ H_{2^m}) / √n`` (n² entries: meant for small n and tests).

    :param n: order, see :func:`hadamard_factor`.
    :param dtype: floating dtype of the result.
    :returns: [n, n] with ``Had Hadᵀ = I``; not symmetric in general.
    """
    k, m = hadamard_factor(n)
    h = torch.kron(_base(k).to(torch.float64), sylvester(m).to(torch.float64))
    return (h * n**-0.5).to(dtype)


def block_hadamard(n: int, block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Block-diagonal ``I_{n/block} ⊗ Had_block``: a Hadamard per block of ``block`` channels.

    :param n: total width.
    :param block: block size; must divide n and have a construction itself.
    :returns: [n, n] orthonormal, block-diagonal.
    :raises ConfigError: when block does not divide n, or has no construction.
    """
    if not isinstance(block, int) or block < 1 or n % block:
        raise ConfigError(f"Hadamard block {block!r} must be a positive divisor of n={n}")
    eye = torch.eye(n // block, dtype=torch.float64)
    return torch.kron(eye, hadamard_matrix(block)).to(dtype)


def hadamard_digest(n: int) -> str:
    """SHA-256 of the factorisation and the ±1 H_K bytes behind Had_n, for export metadata.

    Two libraries can share K and still differ in H_K (Sloane vs Paley had12): the digest pins it.
    """
    k, m = hadamard_factor(n)
    h = hashlib.sha256(f"K={k};M={m};".encode())
    h.update(_base(k).numpy().tobytes())
    return h.hexdigest()
