"""WUSH (Chen et al., arXiv 2512.00956): closed-form, data-aware transforms of blocks of d input channels.

For a linear ``y = x Wᵀ`` and each input block b of d channels (d = the format's group):

- ``Σ_W = W_bᵀW_b / d_out`` and ``Σ_X`` = the diagonal d x d block of the layer's ``E[x xᵀ]``, both damped
  by ``damp`` times their mean diagonal;
- ``W' = chol(Σ_W)`` (lower, ``W'W'ᵀ = Σ_W``), ``eigh(W'ᵀ Σ_X W') = U S² Uᵀ``;
- ``T_b = H_d · S^{-1/2} · Uᵀ · W'ᵀ`` ("W-U-S-H"), so that activations go ``x_b → T_b x_b`` and weights
  ``W_b → W_b T_b⁻¹``: the product is unchanged, T is not orthogonal.

Afterwards both operands have the same second moment, ``T Σ_X Tᵀ = T⁻ᵀ Σ_W T⁻¹ = H_d S H_dᵀ``, whose
diagonal is flat (every entry ``tr(S)/d``). Under the FP4 relative-error model the output error is
proportional to ``Σ_i a_i b_i`` (a, b the two diagonals), which WUSH brings down to its lower bound
``(Σ_k s_k)²/d = (tr((Σ_X^½ Σ_W Σ_X^½)^½))²/d``; without H_d the diagonals are not balanced and the
transform can be worse than none.

Transforms here are in WUSH's column form, one (d, d) matrix per block, stacked as (n_blocks, d, d)
float64; :class:`~orthoquant.transforms.base.BlockDense` (row form) takes their transposes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..hadamard import hadamard_matrix

# Eigenvalues of W'ᵀ Σ_X W' are floored at this fraction of the block's largest one: damping keeps
# them positive in exact arithmetic, the floor only guards against round-off in float64.
EIG_FLOOR = 1e-12


@contextmanager
def no_tf32() -> Iterator[None]:
    """TF32 off for CUDA matmuls inside the block (transforms are built and applied in full precision)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def damped(S: torch.Tensor, damp: float) -> torch.Tensor:
    """``S + damp · mean(diag S) · I`` for a stack of (..., d, d) second moments.

    A block with a zero mean diagonal (all its channels dead, or all its weights zero) is damped by
    ``damp · I`` instead, so the result is always positive definite.
    """
    mean = S.diagonal(dim1=-2, dim2=-1).mean(-1)
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    return S + (damp * mean)[..., None, None] * eye


def block_moments(W: torch.Tensor, H: torch.Tensor, d: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped per-block second moments of the weight and of the input, in float64.

    :param W: (out, in) weight.
    :param H: (in, in) second moment ``E[x xᵀ]`` of the linear's input.
    :param d: block size; must divide ``in``.
    :return: ``Σ_W`` (k, d, d) ``= W_bᵀW_b / out`` and ``Σ_X`` (k, d, d) the diagonal blocks of H,
        both damped (:func:`damped`); k = in / d.
    """
    out, n = W.shape
    if n % d or H.shape != (n, n):
        raise ValueError(f"block size {d} must divide the {n} inputs and H must be {n}x{n}, got {tuple(H.shape)}")
    k = n // d
    Wb = W.double().reshape(out, k, d)
    sigma_w = torch.einsum("oki,okj->kij", Wb, Wb) / out
    sigma_x = H.double().reshape(k, d, k, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return damped(sigma_w, damp), damped(sigma_x, damp)


def wush_blocks(W: torch.Tensor, H: torch.Tensor, d: int, damp: float = 0.01, rotate: bool = True) -> torch.Tensor:
    """The WUSH transform of every input block of a linear (see the module docstring).

    :param W: (out, in) weight (any float dtype; the work is done in float64).
    :param H: (in, in) second moment ``E[x xᵀ]`` of the linear's input.
    :param d: block size (the format's group size).
    :param damp: relative damping of both second moments.
    :param rotate: False leaves out the Hadamard factor (WUS: balanced moments, unflattened diagonal).
    :return: T (in / d, d, d) float64, column form: block b of x maps to ``T_b x_b``.
    :raises ValueError: when W or H holds NaN or Inf.
    """
    if not (torch.isfinite(W).all() and torch.isfinite(H).all()):
        raise ValueError("WUSH: the weight or the input statistics hold NaN or Inf")
    with no_tf32():
        sigma_w, sigma_x = block_moments(W, H, d, damp)
        chol = torch.linalg.cholesky(sigma_w)  # W', lower
        lam, U = torch.linalg.eigh(chol.transpose(1, 2) @ sigma_x @ chol)  # U S² Uᵀ
        lam = lam.clamp_min(EIG_FLOOR * lam[:, -1:].clamp_min(torch.finfo(lam.dtype).tiny))
        T = lam.pow(-0.25)[:, :, None] * (U.transpose(1, 2) @ chol.transpose(1, 2))  # S^{-1/2} Uᵀ W'ᵀ
        if rotate:
            T = hadamard_matrix(d).to(T) @ T
    return T


def hadamard_blocks(k: int, d: int) -> torch.Tensor:
    """The block-Hadamard baseline in the same column form: ``T_b = H_d`` for each of ``k`` blocks.

    :return: (k, d, d) float64, orthonormal blocks.
    """
    return hadamard_matrix(d).expand(k, d, d).clone()


def moment_diagonals(T: torch.Tensor, sigma_w: torch.Tensor, sigma_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonals of the transformed moments: ``a = diag(T Σ_X Tᵀ)`` and ``b = diag(T⁻ᵀ Σ_W T⁻¹)``.

    ``Σ_i a_i b_i`` is WUSH's FP relative-error objective; it is at its minimum for T from :func:`wush_blocks`.

    :param T: (k, d, d) column-form transforms; ``sigma_w``, ``sigma_x``: (k, d, d).
    :return: a, b, each (k, d) float64.
    """
    T = T.double()
    a = (T @ sigma_x.double() @ T.transpose(1, 2)).diagonal(dim1=1, dim2=2)
    inv_t = torch.linalg.inv(T)  # fine here: diagnostics on d x d blocks, not a weight fold
    b = (inv_t.transpose(1, 2) @ sigma_w.double() @ inv_t).diagonal(dim1=1, dim2=2)
    return a, b
