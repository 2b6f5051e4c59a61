"""Paley constructions of ±1 Hadamard matrices over finite fields GF(q), q = p^k.

- Paley I, q ≡ 3 (mod 4): order q + 1, ``H = I + S`` with ``S = [[0, 1ᵀ], [-1, Q]]``.
- Paley II, q ≡ 1 (mod 4): order 2(q + 1), ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]``
  with the symmetric conference matrix ``C = [[0, 1ᵀ], [1, Q]]``.

``Q[i, j] = χ(a_j - a_i)`` is the Jacobsthal matrix of the quadratic character χ of GF(q). Field
elements are the integers ``0 … q-1`` read as base-p digit vectors (coefficients of a polynomial of
degree < k), so addition is digit-wise mod p and multiplication is modulo a fixed monic irreducible
polynomial: the lexicographically first one, which makes every matrix here reproducible.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch

__all__ = ["prime_power", "paley_source", "paley_hadamard", "paley1", "paley2"]


def prime_power(q: int) -> tuple[int, int] | None:
    """Return ``(p, k)`` with ``q = p^k`` for a prime p, or None when q is not a prime power."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)  # smallest divisor is prime
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(num: list[int], den: list[int], p: int) -> list[int]:
    """Remainder of ``num / den`` over GF(p); coefficient lists are lowest degree first, den monic."""
    num = list(num)
    for shift in range(len(num) - len(den), -1, -1):
        c = num[shift + len(den) - 1] % p
        if c:
            for t, d in enumerate(den):
                num[shift + t] = (num[shift + t] - c * d) % p
    return [c % p for c in num[: len(den) - 1]]


def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """Low coefficients ``(c_0 … c_{k-1})`` of the first monic irreducible ``x^k + Σ c_t x^t``."""
    for low in itertools.product(range(p), repeat=k):
        f = list(low[::-1]) + [1]  # product order is lexicographic on (c_{k-1}, …, c_0)
        if f[0] == 0 and k > 1:
            continue  # divisible by x
        # reducible <=> a monic factor of degree 1 … k//2 divides f
        if not any(
            not any(_poly_mod(f, list(g) + [1], p))
            for d in range(1, k // 2 + 1)
            for g in itertools.product(range(p), repeat=d)
        ):
            return tuple(f[:k])
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _digits(q: int, p: int, k: int) -> torch.Tensor:
    """Base-p digits of every field element: [q, k] int64, lowest degree first."""
    e = torch.arange(q)
    return torch.stack([(e // p**t) % p for t in range(k)], dim=1)


def _quadratic_character(p: int, k: int) -> torch.Tensor:
    """χ over GF(p^k) indexed by element: [q] int8, 0 at 0, +1 on nonzero squares, -1 elsewhere."""
    q = p**k
    f = _irreducible(p, k) if k > 1 else (0,)
    a = _digits(q, p, k)
    sq = torch.zeros(q, 2 * k - 1, dtype=torch.int64)  # a(x)² before reduction
    for i in range(k):
        for j in range(k):
            sq[:, i + j] += a[:, i] * a[:, j]
    for deg in range(2 * k - 2, k - 1, -1):  # x^k = -Σ c_t x^t
        top = sq[:, deg] % p
        for t in range(k):
            sq[:, deg - k + t] -= top * f[t]
    weights = torch.tensor([p**t for t in range(k)])
    squares = ((sq[:, :k] % p) * weights).sum(dim=1)
    chi = torch.full((q,), -1, dtype=torch.int8)
    chi[squares] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(a_j - a_i)`` over GF(q): [q, q] int8."""
    p, k = prime_power(q)
    chi = _quadratic_character(p, k)
    a = _digits(q, p, k).to(torch.int32)
    diff = torch.zeros(q, q, dtype=torch.int64)
    for t in range(k):  # index of a_j - a_i, digit by digit
        diff += ((a[None, :, t] - a[:, None, t]) % p).long() * p**t
    return chi[diff]


def paley1(q: int) -> torch.Tensor:
    """Paley I Hadamard matrix for a prime power q ≡ 3 (mod 4): ±1 int8 [q+1, q+1]."""
    assert prime_power(q) and q % 4 == 3, f"Paley I needs a prime power q ≡ 3 mod 4, got {q}"
    s = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int8)


def paley2(q: int) -> torch.Tensor:
    """Paley II Hadamard matrix for a prime power q ≡ 1 (mod 4): ±1 int8 [2(q+1), 2(q+1)]."""
    assert prime_power(q) and q % 4 == 1, f"Paley II needs a prime power q ≡ 1 mod 4, got {q}"
    c = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    minus = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    # C has a zero diagonal and ±1 elsewhere, so exactly one of the two terms is nonzero per block
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int8), minus)


@lru_cache(maxsize=None)
def paley_source(order: int) -> str | None:
    """Name the Paley construction of this order ("paley1(q=67)", "paley2(q=49)") or None.

    Paley I is tried first; the choice is fixed so that a given order always yields the same matrix.
    """
    q = order - 1
    if q % 4 == 3 and prime_power(q):
        return f"paley1(q={q})"
    q = order // 2 - 1
    if order % 2 == 0 and q % 4 == 1 and prime_power(q):
        return f"paley2(q={q})"
    return None


def paley_hadamard(order: int) -> torch.Tensor | None:
    """±1 int8 Hadamard matrix [order, order] by Paley I or II, or None when neither applies."""
    source = paley_source(order)
    if source is None:
        return None
    q = int(source.split("=")[1].rstrip(")"))
    return paley1(q) if source.startswith("paley1") else paley2(q)
