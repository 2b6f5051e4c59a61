"""The proxy loss every solver reports: ``tr(ΔW H ΔWᵀ)``, the output error of a linear whose input has
second moment H."""
from __future__ import annotations

import torch


# Below this many columns proxy_loss multiplies by the whole diagonal block of H; above, it halves.
LOSS_LEAF = 256
# Columns of H converted to float32 at a time: bounds the extra memory to n·LOSS_CHUNK floats.
LOSS_CHUNK = 2048


def proxy_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> float:
    """``tr(ΔW H ΔWᵀ)``, or ``‖ΔW‖²`` when H is None.

    Float32 GEMMs with a float64 sum: it is a metric, and in float64 it cost a third of GPTQ's time.
    """
    d = W.float() - Wq.float()
    if H is None:
        return float(d.square().sum(dtype=torch.float64))
    return float(_symmetric_trace(d, H, 0, d.shape[1]))


def _symmetric_trace(d: torch.Tensor, H: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """() float64 ``tr(d_s H_ss d_sᵀ)`` for the columns s = a..b.

    H is symmetric: with s split in halves A, B the trace is ``tr(A) + tr(B) + 2·tr(d_A H_AB d_Bᵀ)``,
    so only the upper triangle is multiplied, m·n² flops instead of the 2·m·n² of ``d @ H``, in GEMMs
    about as large as the halves.
    """
    if b - a <= LOSS_LEAF:
        return _cross(d, H, a, b, a, b)
    mid = (a + b) // 2
    return (_symmetric_trace(d, H, a, mid) + _symmetric_trace(d, H, mid, b)
            + 2 * _cross(d, H, a, mid, mid, b))


def _cross(d: torch.Tensor, H: torch.Tensor, a: int, b: int, c: int, e: int) -> torch.Tensor:
    """() float64 ``tr(d_A H_AB d_Bᵀ)`` for the columns A = a..b, B = c..e.

    Same flops either way; the Gram form ``Σ (d_Aᵀ d_B) ∘ H_AB`` leaves |A|·|B| products to sum instead
    of m·|B|, so it serves whenever d has more rows than B has columns. H goes to float32 a block of at
    most :data:`LOSS_CHUNK` columns at a time.
    """
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    for c1 in range(c, e, LOSS_CHUNK):
        c2 = min(c1 + LOSS_CHUNK, e)
        Hb = H[a:b, c1:c2].to(d)
        if d.shape[0] >= c2 - c1:
            total += _dot(d[:, a:b].T @ d[:, c1:c2], Hb)
        else:
            total += _dot(d[:, a:b] @ Hb, d[:, c1:c2])
    return total


def _dot(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """() float64 ``Σ P ∘ Q``: float32 row sums (fast and short), summed in float64."""
    return torch.linalg.vecdot(P, Q).sum(dtype=torch.float64)

