"""Optional CUDA kernel: Dao-AILab ``fast-hadamard-transform``, used only where it equals our Had_n.

The package computes ``x @ H_nᵀ · scale`` (unnormalised unless ``scale`` is given). We use it only for

- n a power of two with 8 ≤ n ≤ 32768: its Sylvester matrix is ours, and being symmetric its
  backward (which re-applies the forward) is right. Other n are zero-padded to a power of two and
  truncated by the plain API (not orthogonal), and its 12N/20N/28N/40N variants use different H_K
  (Paley had12) with a wrong backward for the non-symmetric ones: never used;
- fp32/fp16/bf16 (its supported dtypes; it computes in fp32 like our torch path);
- after a probe on a few random rows per (n, dtype, device) agrees with the torch butterfly.

The package is imported lazily on the first CUDA call: importing this module touches no CUDA.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Callable

import torch

from .butterfly import butterfly

__all__ = ["hadamard_transform", "kernel_applies", "kernel_usable"]

logger = logging.getLogger(__name__)

MAX_N = 32768  # largest power of two the kernel handles
MIN_N = 8  # below this its dim % 8 padding would change the matrix
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@lru_cache(maxsize=1)
def _kernel() -> Callable | None:
    try:
        from fast_hadamard_transform import hadamard_transform
    except (ImportError, OSError) as e:  # not installed, or built against another CUDA/torch
        logger.debug("fast-hadamard-transform unavailable (%s): using the torch butterfly", e)
        return None
    return hadamard_transform


def kernel_applies(n: int, dtype: torch.dtype) -> bool:
    """Whether the kernel's matrix is provably our Had_n for this width and dtype (no probe)."""
    return MIN_N <= n <= MAX_N and n & (n - 1) == 0 and dtype in _DTYPES


@lru_cache(maxsize=None)
def _probe(n: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Run the kernel on 4 random rows and compare with the torch path (both fp32 inside)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4, n, generator=g).to(device=device, dtype=dtype)
    try:
        got = _kernel()(x, scale=n**-0.5).float()
    except RuntimeError as e:  # e.g. built for another GPU architecture
        logger.warning("fast-hadamard-transform failed on Had_%d (%s): not used", n, e)
        return False
    want = butterfly(x.float(), 1, n, transpose=False, use_out=True)  # apply_hadamard would re-probe
    eps = torch.finfo(dtype).eps
    # rounding differences are a few eps of the largest entry; a different matrix is off by O(max)
    ok = bool((got - want).abs().max() <= 8 * eps * want.abs().max() + 1e-5)
    if not ok:
        logger.warning("fast-hadamard-transform disagrees with Had_%d (%s): not used", n, dtype)
    return ok


def kernel_usable(n: int, dtype: torch.dtype, device: torch.device) -> bool:
    """True when the kernel is installed, applies to (n, dtype) and passed the probe on device."""
    if not kernel_applies(n, dtype) or _kernel() is None:
        return False
    return _probe(n, dtype, device)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ Had_n`` for a power-of-two n on CUDA through the kernel (autograd included).

    :param x: [..., n] CUDA tensor, fp32/fp16/bf16; callers check :func:`kernel_usable` first.
    :returns: [..., n] in x's dtype.
    """
    n = x.shape[-1]
    return _kernel()(x.contiguous(), scale=n**-0.5)
