"""The pure-torch mixed-radix butterfly behind :mod:`.fwht` (the algorithm is described there).

Its own module so that :mod:`.cuda` can compare the CUDA kernel with it while :mod:`.fwht` dispatches
to the kernel: both import this, neither imports the other's internals.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from .construct import hadamard_base

MAX_RADIX = 64  # GEMM stages of ≤ 64×64: cheap in flops, and few passes over memory


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32/float64 stay; other floating dtypes compute in float32."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype.is_floating_point:
        return torch.float32  # bf16/fp16 stages would round after every stage
    raise TypeError(f"Hadamard transform needs a floating tensor, got {dtype}")


@lru_cache(maxsize=64)
def _pm1(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Cached ±1 H_k (stored, Paley or Sylvester) in dtype on device: [k, k]."""
    return hadamard_base(k).to(device=device, dtype=dtype)


def _radices(m: int) -> list[int]:
    """Split 2^m-sized Sylvester into balanced power-of-two radices ≤ MAX_RADIX, slowest first."""
    bits = m.bit_length() - 1
    if bits == 0:
        return []
    stages = -(-bits // (MAX_RADIX.bit_length() - 1))
    q, extra = divmod(bits, stages)
    return [1 << (q + (i < extra)) for i in range(stages)]


def _stages(x2: torch.Tensor, factors: list[torch.Tensor], use_out: bool) -> torch.Tensor:
    """``x2 @ (A_0 ⊗ A_1 ⊗ …)`` one Kronecker factor (one axis) at a time, A_0 the slowest.

    :param x2: [R, n] in the compute dtype, n = Π dᵢ; never written to.
    :param factors: the dᵢ×dᵢ matrices Aᵢ in x2's dtype/device.
    :param use_out: write into two ping-pong buffers with ``out=`` (no autograd) instead of
        allocating a new tensor per stage.
    :returns: a new [R, n] tensor.
    """
    n = x2.shape[-1]
    dims = [a.shape[0] for a in factors]
    y = x2.contiguous()
    buffers = [torch.empty_like(y) for _ in range(min(2, len(factors)))] if use_out else []
    for i, a in enumerate(factors):
        inner = math.prod(dims[i + 1 :])
        out = buffers[i % 2].view(-1, dims[i], inner) if use_out else None
        if inner == 1:  # innermost axis: one plain GEMM, y_j' = Σ_j y_j A[j, j']
            y = torch.matmul(y.view(-1, dims[i]), a, out=None if out is None else out.view(-1, dims[i]))
        else:  # axis i of [outer, dᵢ, inner]: y_k' = Σ_k A[k, k'] y_k, i.e. Aᵀ @ view
            y = torch.matmul(a.T, y.view(-1, dims[i], inner), out=out)
    return y.reshape(-1, n)


def butterfly(x2: torch.Tensor, k: int, m: int, transpose: bool, use_out: bool) -> torch.Tensor:
    """``x2 @ Had_n`` (or ``@ Had_nᵀ``) for x2 [R, n] in the compute dtype: a new [R, n] tensor."""
    n = k * m
    factors = [_pm1(r, x2.dtype, x2.device) for r in _radices(m)]
    if k > 1:  # x @ Had_nᵀ = x @ (H_Kᵀ ⊗ H_M): only the K factor changes, H_M is symmetric
        hk = _pm1(k, x2.dtype, x2.device)
        factors.insert(0, hk.T if transpose else hk)
    if not factors:  # n = 1
        return x2.clone()
    factors[-1] = factors[-1] * n**-0.5  # fold the normalisation into the smallest matrix
    return _stages(x2, factors, use_out)
