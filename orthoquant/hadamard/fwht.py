"""Apply the orthonormal Hadamard ``Had_n`` of :mod:`.construct` fast, exactly, in pure torch.

Row-vector convention (DESIGN §2): for x [..., n],

- ``apply_hadamard(x)           = x @ Had_n``    (the transform: activations ``x → x M``),
- ``apply_hadamard_transpose(x) = x @ Had_nᵀ``   (its inverse; Had_n is not symmetric in general),
- ``apply_random_hadamard(x, s) = (x ⊙ s) @ Had_n``, i.e. ``M = diag(s)·Had_n`` (signs first).

With n = K·2^m and x viewed as X [..., K, 2^m] (K slow), ``x @ Had_n = H_Kᵀ X H_{2^m} / √n``. The
Sylvester factor runs as a mixed-radix butterfly: ``H_{2^m} = H_{r_1} ⊗ … ⊗ H_{r_s}`` with every
radix r ≤ 64, one stage per factor, each stage a single (batched) GEMM with the r×r ±1 matrix along
one axis of the view; H_K is one more such stage over the slow axis. That is O(n·Σ r_i) =
O(n log n) flops and s + 1 passes over memory, where a radix-2 butterfly makes log2(n) passes
and is memory-bound on CPU (``scripts/bench_hadamard.py`` times both). Two variants:

- no-grad: the stages write with ``out=`` into two ping-pong buffers (no allocation per stage);
- autograd: the same stages as plain matmuls, used whenever x requires grad, or when
  ``differentiable=True``.

On CUDA, powers of two go through the ``fast-hadamard-transform`` kernel when it is installed and a
probe shows it equals our matrix (see :mod:`.cuda`). Half-precision inputs are computed in float32,
float64 stays float64; the result has x's dtype. Every fast function has a ``_ref`` twin (dense
``x @ Had_n``, or a two-factor product for large n) that the tests compare against.
"""
from __future__ import annotations

import torch

from . import cuda
from .butterfly import butterfly, compute_dtype
from .construct import hadamard_base, hadamard_factor, hadamard_matrix

__all__ = [
    "apply_hadamard",
    "apply_hadamard_ref",
    "apply_hadamard_transpose",
    "apply_hadamard_transpose_ref",
    "apply_random_hadamard",
    "apply_random_hadamard_ref",
    "apply_random_hadamard_transpose",
    "random_signs",
]

DENSE_REF_MAX = 2048  # above this the reference uses factors, never an n×n matrix
_REF_FACTOR_MAX = 1024  # largest dense Sylvester factor in the two-factor reference


def _apply(x: torch.Tensor, transpose: bool, differentiable: bool | None) -> torch.Tensor:
    n = x.shape[-1]
    k, m = hadamard_factor(n)
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if differentiable is None:
        differentiable = needs_grad
    elif needs_grad and not differentiable:
        raise ValueError("differentiable=False but x requires grad: the no-grad path writes with out=")
    if x.is_cuda and k == 1 and cuda.kernel_usable(n, x.dtype, x.device):
        return cuda.hadamard_transform(x)  # Sylvester: symmetric, so forward == transpose
    x2 = x.reshape(-1, n).to(compute_dtype(x.dtype))
    y = butterfly(x2, k, m, transpose, use_out=not differentiable)
    return y.reshape(x.shape).to(x.dtype)


def apply_hadamard(x: torch.Tensor, differentiable: bool | None = None) -> torch.Tensor:
    """``x @ Had_n`` over the last dim.

    :param x: [..., n], floating; n must have a construction (see ``hadamard_factor``).
    :param differentiable: None picks the autograd path iff x requires grad (and grad mode is
        on); True forces it; False forces the no-grad path (an error if x requires grad).
    :returns: [..., n] in x's dtype.
    """
    return _apply(x, False, differentiable)


def apply_hadamard_transpose(x: torch.Tensor, differentiable: bool | None = None) -> torch.Tensor:
    """``x @ Had_nᵀ`` over the last dim: the inverse of :func:`apply_hadamard`. Same parameters."""
    return _apply(x, True, differentiable)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """Random ±1 signs from a private ``torch.Generator`` seeded with ``seed`` (global RNG untouched).

    :returns: float32 [n] on CPU, the same for the same (n, seed) on every machine.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1


def apply_random_hadamard(
    x: torch.Tensor, signs: torch.Tensor, differentiable: bool | None = None
) -> torch.Tensor:
    """``(x ⊙ s) @ Had_n``: signs first, then mixing. :param signs: [n] ±1. :returns: [..., n]."""
    return apply_hadamard(x * signs.to(device=x.device, dtype=x.dtype), differentiable)


def apply_random_hadamard_transpose(
    x: torch.Tensor, signs: torch.Tensor, differentiable: bool | None = None
) -> torch.Tensor:
    """``(x @ Had_nᵀ) ⊙ s``: the inverse of :func:`apply_random_hadamard`. Same parameters."""
    return apply_hadamard_transpose(x, differentiable) * signs.to(device=x.device, dtype=x.dtype)


def _two_factor_ref(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Reference for large n from dense factors: H_K and scipy's Sylvester H_d, d ≤ 1024.

    scipy builds its Sylvester matrix independently of ours; ``H_{cd} = H_c ⊗ H_d`` (natural order)
    lets us split 2^m into dense factors so nothing n×n is ever formed.
    """
    import scipy.linalg  # only references need it

    n = x.shape[-1]
    k, m = hadamard_factor(n)
    dims = []
    while m > 1:
        dims.insert(0, min(m, _REF_FACTOR_MAX))
        m //= dims[0]
    y = x.reshape(-1, k, *dims)
    for axis, d in enumerate(dims, start=2):
        h = torch.from_numpy(scipy.linalg.hadamard(d)).to(y)
        y = (y.movedim(axis, -1) @ h).movedim(-1, axis)
    hk = hadamard_base(k).to(y)
    y = torch.tensordot(hk if transpose else hk.T, y, dims=([1], [1])).movedim(0, 1)
    return y.reshape(x.shape) * n**-0.5


def _ref(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    n = x.shape[-1]
    xc = x.to(compute_dtype(x.dtype))
    if n > DENSE_REF_MAX:
        return _two_factor_ref(xc, transpose).to(x.dtype)
    h = hadamard_matrix(n, xc.dtype).to(xc.device)
    return (xc @ (h.T if transpose else h)).to(x.dtype)


def apply_hadamard_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`apply_hadamard`: dense ``x @ Had_n`` (two-factor above n = 2048)."""
    return _ref(x, False)


def apply_hadamard_transpose_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`apply_hadamard_transpose`: dense ``x @ Had_nᵀ`` (two-factor when large)."""
    return _ref(x, True)


def apply_random_hadamard_ref(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`apply_random_hadamard`: ``(x ⊙ s) @ Had_n``."""
    return _ref(x * signs.to(device=x.device, dtype=x.dtype), False)
