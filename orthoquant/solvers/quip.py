"""QuIP# incoherence processing: a randomized Hadamard transform (RHT) on both sides of each linear,
then another registered solver in the rotated space: ``quip-ldlq``, ``quip-ldlq-tune`` (BlockLDLQ,
for the E8 lattice and scalar formats), ``quip-gptq`` and ``quip-rtn`` (scalar formats).

Row convention (``y = x Wᵀ``, DESIGN §2), with ``SU`` (n,) and ``SV`` (m,) random signs:

- input transform  ``M_in  = diag(SU)·Had_n``  (:class:`~orthoquant.transforms.base.Hadamard`):
  ``x → (x ⊙ SU) Had_n``;
- output transform ``M_out = Had_mᵀ·diag(SV)`` (:class:`~orthoquant.transforms.base.HadamardTranspose`):
  ``y' → (y' Had_mᵀ) ⊙ SV``;
- rotated weight  ``Wr = M_out W M_in = Had_mᵀ diag(SV) W diag(SU) Had_n``, so that
  ``(x M_in) Wrᵀ M_out = x Wᵀ``; rotated Hessian ``Hr = M_inᵀ H M_in = Had_nᵀ diag(SU) H diag(SU) Had_n``,
  the second moment of the rotated input. Hence ``tr(ΔWr Hr ΔWrᵀ) = tr(ΔW H ΔWᵀ)``: the proxy loss is the
  same in both spaces, and the solver's loss is the layer's.

The solver returns ``Ŵr`` (stored and run in the rotated space) plus both online transforms; the
runner attaches them and saves their signs with the layer. The equivalent plain weight is
``Ŵ = diag(SV) Had_m Ŵr Had_nᵀ diag(SU)`` (:func:`unrotate_weight`).

The Hessian is QuIP#'s ``E[x xᵀ]`` (uncentred) regularised as ``H/mean(diag H) + damp·I``: the inner
solver's relative damping ``H + damp·mean(diag H)·I`` is the same matrix up to a positive factor, which
changes neither GPTQ's nor LDLQ's result (and ``tr Hr = tr H``).

Signs are drawn from a private generator seeded with :data:`SIGN_SEED` mixed with a CRC of the
weight's shape and float32 bytes: deterministic (a rerun or resume redraws the same signs, on any
device) and different for every matrix, as QuIP#'s per-layer draws.
"""
from __future__ import annotations

import zlib
from functools import partial

import torch

from ..hadamard import hadamard_factor, random_signs
from ..transforms.base import Hadamard, HadamardTranspose
from .base import SOLVERS, SolveResult, Solver

SIGN_SEED = 0x51C0  # mixed into every layer's seed; changing it redraws all signs


def sign_seed(W: torch.Tensor) -> int:
    """The seed of ``W``'s signs: :data:`SIGN_SEED` mixed with a CRC-32 of its shape and float32 bytes."""
    data = W.detach().float().contiguous().cpu().numpy().tobytes()
    crc = zlib.crc32(data, zlib.crc32(repr(tuple(W.shape)).encode()))
    return (SIGN_SEED << 32) | crc


def rht_transforms(W: torch.Tensor) -> tuple[Hadamard, HadamardTranspose]:
    """The input and output transforms of ``W`` (m, n): ``Hadamard(n, SU)``, ``HadamardTranspose(m, SV)``."""
    m, n = W.shape
    seed = sign_seed(W)
    return Hadamard(n, random_signs(n, seed)), HadamardTranspose(m, random_signs(m, seed + 1))


def rotate_weight(W: torch.Tensor, t_in: Hadamard, t_out: HadamardTranspose) -> torch.Tensor:
    """``Wr = M_out W M_in`` (m, n) in float64: rows through ``M_in``, columns through ``M_out``."""
    A = t_in.forward(W.double())  # W M_in
    return t_out.inverse(A.T).T  # M_out A = (Aᵀ M_outᵀ)ᵀ, and x M_outᵀ = x M_out⁻¹ (orthogonal)


def rotate_hessian(H: torch.Tensor, t_in: Hadamard) -> torch.Tensor:
    """``Hr = M_inᵀ H M_in`` (n, n) float64."""
    A = t_in.forward(H.double())
    return t_in.forward(A.T.contiguous()).T.contiguous()


def unrotate_weight(Wr: torch.Tensor, t_in: Hadamard, t_out: HadamardTranspose) -> torch.Tensor:
    """``W = M_outᵀ Wr M_inᵀ`` (m, n) float64: the plain weight that computes what the rotated one does."""
    A = t_in.inverse(Wr.double())  # Wr M_inᵀ
    return t_out.forward(A.T).T  # M_outᵀ A = (Aᵀ M_out)ᵀ


def solve_quip(W: torch.Tensor, H: torch.Tensor | None, fmt, spec, inner: str) -> SolveResult:
    """Rotate ``W`` (m, n) and ``H`` (n, n), solve with the solver ``inner``, return ``Ŵr`` and both RHTs.

    :return: weight ``Ŵr`` (m, n) in the rotated space; loss ``tr(ΔW H ΔWᵀ)`` (the same in both spaces).
    """
    t_in, t_out = rht_transforms(W)
    Wr = rotate_weight(W, t_in, t_out).to(W.dtype)
    Hr = None if H is None else rotate_hessian(H, t_in)
    res = SOLVERS.get(inner).solve(Wr, Hr, fmt, spec)
    return SolveResult(res.weight, res.qweight, res.loss, input_transform=t_in, output_transform=t_out)


def check_quip(fmt, spec, rows: int, cols: int, inner: str) -> None:
    """The RHT needs Hadamards of both sides' orders; then the inner solver's own check."""
    hadamard_factor(cols)
    hadamard_factor(rows)
    SOLVERS.get(inner).check(fmt, spec, rows, cols)


for _inner, _needs_h in (("rtn", False), ("gptq", True), ("ldlq", True), ("ldlq-tune", True)):
    SOLVERS.add(f"quip-{_inner}", Solver(partial(solve_quip, inner=_inner), needs_hessian=_needs_h,
                                         check=partial(check_quip, inner=_inner)))
