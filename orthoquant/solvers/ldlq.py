"""BlockLDLQ (QuIP#): quantize blocks of ``g`` columns, last block first, with LDL feedback.

With ``H' = L D Lᵀ`` (``H'`` the damped ``H = E[x xᵀ]``, L unit lower triangular *by g×g blocks*, D
block diagonal), column block k is quantized from ``W_k + Σ_{j>k} (W_j − Q_j) L_jk``, so each block's
rounding error is orthogonal, in the ``H'`` metric, to every error quantized after it. ``g`` is the
format's :attr:`~orthoquant.formats.base.QuantFormat.vector_size`: 8 for the E8 lattice (8 weights per
code), 1 for scalar formats, where BlockLDLQ *is* GPTQ on the reversed column order (QuIP's theorem;
tested bit for bit against :func:`~orthoquant.solvers.gptq.solve_gptq`).

The factorisation is GPTQ's (:func:`~orthoquant.solvers.gptq.upper_factor`, damping ``λ = damp·mean
diag H``, i.e. QuIP#'s ``H/mean(diag H) + damp·I`` up to a positive factor that changes nothing, and
the same retries), taken in processing order (columns reversed) where it is upper: ``H' = R Rᵀ``. The
block feedback is ``F = R·blockdiag(R_kk)⁻¹ − I``; its diagonal blocks are zero. Columns are processed in
lazy batches of ``spec.blocksize`` as in GPTQ: each batch first gets the feedback of all earlier
batches in one GEMM, then its blocks one by one.

Optional refinement passes (QuIP#'s ``quip_tune_iters``) revisit each block, last first, and requantize
``Q_k + (W − Q)·H'_{:,k}·H'_{kk}⁻¹``, the block's least-squares optimum with the others fixed; a row's new
codes are kept only where they lower its proxy loss, so a pass never increases it.

Registered solvers: ``ldlq`` (no refinement) and ``ldlq-tune`` (:data:`TUNE_PASSES` passes); the
``quip-`` variants (:mod:`.quip`) run them after the RHT.
"""
from __future__ import annotations

import logging
from functools import partial

import torch

from ..errors import ConfigError
from ..formats.base import QParams, QuantizedTensor
from .base import SOLVERS, SolveResult, Solver, check_format
from .gptq import feedback_from_factor, upper_factor
from .loss import proxy_loss

log = logging.getLogger(__name__)

# Refinement passes of the ``ldlq-tune`` solvers: on correlated synthetic layers one pass removes most
# of the gain (8-11% lower proxy loss) and five reach 99% of it (QuIP# runs 10).
TUNE_PASSES = 5


def block_feedback(R: torch.Tensor, g: int) -> torch.Tensor:
    """Strictly block-upper ``F = R·blockdiag(R_kk)⁻¹ − I`` of an upper factor ``R`` (n, n), n = k·g.

    For g = 1 this is :func:`~orthoquant.solvers.gptq.feedback_from_factor` (``R`` is overwritten then).
    """
    if g == 1:
        return feedback_from_factor(R)
    n = R.shape[0]
    blocks = R.view(n // g, g, n // g, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n/g, g, g) R_kk
    eye = torch.eye(g, dtype=R.dtype, device=R.device).expand_as(blocks)
    inv = torch.linalg.solve_triangular(blocks, eye, upper=True)
    F = torch.einsum("nbg,bgh->nbh", R.view(n, n // g, g), inv).reshape(n, n)
    F.view(n // g, g, n // g, g).diagonal(dim1=0, dim2=2).zero_()
    return F


def _columns(p: QParams, a: int, b: int) -> QParams:
    """Parameters of original columns a..b from per-column ``p`` (one scale per row/tensor stays as is)."""
    if p.scale.shape[-1] == 1:
        return p
    return QParams(p.scale[:, a:b], None if p.zero is None else p.zero[:, a:b], p.global_scale)


class _Blocks:
    """Encodes the column blocks of an (out, n) weight given in reversed order, collecting their codes.

    :param fmt: the format; ``params`` its parameters fitted on the whole weight, per column (n columns).
    """

    def __init__(self, fmt, params: QParams, n: int, g: int) -> None:
        self.fmt, self.params, self.n, self.g = fmt, params, n, g
        self.codes: torch.Tensor | None = None

    def quantize(self, p: int, rows: torch.Tensor) -> torch.Tensor:
        """Quantize processed columns ``p..p+g`` (given as ``rows`` (g, out)); returns their values (g, out)."""
        a, b = self.n - p - self.g, self.n - p  # the same columns in original order
        x = rows.flip(0).T.float()
        params = _columns(self.params, a, b)
        c = self.fmt.encode(x, params)
        if self.codes is None:
            self.codes = torch.empty(x.shape[0], self.n // self.fmt.vector_size, dtype=c.dtype, device=c.device)
        vs = self.fmt.vector_size
        self.codes[:, a // vs:b // vs] = c
        return self.fmt.decode(c, params).T.flip(0)


def _ldlq_loop(Wt: torch.Tensor, F: torch.Tensor, blocks: _Blocks, blocksize: int) -> None:
    """The LDLQ loop on the transposed weight ``Wt`` (n, out) in processing order (overwritten by errors)."""
    n, g = Wt.shape[0], blocks.g
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = torch.addmm(Wt[i1:i2], F[:i1, i1:i2].T, Wt[:i1])  # feedback of all earlier batches
        F1 = F[i1:i2, i1:i2]
        for i in range(0, i2 - i1, g):
            err = Wt[i1 + i:i1 + i + g].sub_(blocks.quantize(i1 + i, W1[i:i + g]))
            if g == 1:  # GPTQ's rank-1 update, so that g = 1 reproduces it bit for bit
                W1[i + 1:].addr_(F1[i, i + 1:], err[0])
            else:
                W1[i + g:].addmm_(F1[i:i + g, i + g:].T, err)


def _refine(W: torch.Tensor, Hd: torch.Tensor, blocks: _Blocks, passes: int) -> None:
    """Block coordinate descent on ``tr(E H' Eᵀ)``, ``E = W − Q``; updates ``blocks.codes`` in place.

    :param W: (out, n) weight (dead columns zeroed); :param Hd: (n, n) damped H, same dtype.
    """
    fmt, g, vs, n = blocks.fmt, blocks.g, blocks.fmt.vector_size, W.shape[1]
    Q = fmt.dequantize(QuantizedTensor(blocks.codes, blocks.params)).to(W.dtype)
    G = (W - Q) @ Hd  # (out, n): the loss gradient / −2, kept up to date
    diag = Hd.view(n // g, g, n // g, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n/g, g, g)
    inv = torch.linalg.inv(diag)
    for i in range(passes):
        kept = torch.zeros((), dtype=torch.long, device=W.device)  # summed on device: no sync per block
        for k in reversed(range(n // g)):
            a, b = k * g, (k + 1) * g
            params = _columns(blocks.params, a, b)
            c = fmt.encode((Q[:, a:b] + G[:, a:b] @ inv[k]).float(), params)
            new = fmt.decode(c, params).to(W.dtype)
            delta = new - Q[:, a:b]
            change = ((delta @ diag[k]) * delta).sum(-1) - 2 * (delta * G[:, a:b]).sum(-1)
            keep = change < 0  # per row: tr(E H' Eᵀ) separates over rows
            kept += keep.sum()
            delta[~keep] = 0
            Q[:, a:b] = torch.where(keep[:, None], new, Q[:, a:b])
            blocks.codes[keep, a // vs:b // vs] = c[keep]
            G -= delta @ Hd[a:b]
        log.debug("LDLQ refinement pass %d: %d of %d row blocks changed", i + 1, int(kept), W.shape[0] * n // g)


def block_ldlq(W: torch.Tensor, H: torch.Tensor, fmt, damp: float = 0.01, blocksize: int = 128,
               passes: int = 0) -> QuantizedTensor:
    """Quantize ``W`` with BlockLDLQ (see the module docstring).

    :param W: (out, n) float32 weight; n a multiple of ``fmt.vector_size``.
    :param H: (n, n) float64 second moment ``E[x xᵀ]`` of the input.
    :param fmt: any format; one scale per row or tensor, or static groups (scalar formats).
    :param damp: relative damping of H.
    :param blocksize: columns per lazy batch (rounded down to a multiple of the block size, at least one).
    :param passes: refinement passes after the LDLQ pass.
    :return: the codes and parameters; ``fmt.dequantize`` gives the quantized weight.
    """
    n, g = W.shape[1], fmt.vector_size
    check_ldlq(fmt, None, W.shape[0], n)
    H = H.to(W.device)
    dead = H.diagonal() == 0  # inputs that never fire: their weights cannot matter
    Wz = W.float().clone()
    Wz[:, dead] = 0
    params = fmt.fit(Wz)
    blocks = _Blocks(fmt, params.columns(n), n, g)
    rev = torch.arange(n - 1, -1, -1, device=W.device)  # processing order: last column first
    F = block_feedback(upper_factor(H, dead, rev, damp)[0], g)
    Wt = Wz[:, rev].T.to(F.dtype).contiguous()
    _ldlq_loop(Wt, F, blocks, max(g, blocksize // g * g))
    if passes:
        Hd = H.to(F.dtype).clone()
        Hd.diagonal()[dead] = 1
        Hd.diagonal().add_(damp * float(Hd.diagonal().mean()))
        _refine(Wz.to(F.dtype), Hd, blocks, passes)
    return QuantizedTensor(blocks.codes, params)


def check_ldlq(fmt, spec, rows: int, cols: int) -> None:
    """BlockLDLQ quantizes ``fmt.vector_size`` columns together: they must divide the inputs."""
    if cols % fmt.vector_size:
        raise ConfigError(f"BlockLDLQ with a {fmt.name} format needs a multiple of {fmt.vector_size} "
                          f"input columns, got {cols}")
    check_format(fmt, spec, rows, cols)


def solve_ldlq(W: torch.Tensor, H: torch.Tensor | None, fmt, spec, passes: int = 0) -> SolveResult:
    """Solver entry: :func:`block_ldlq` with ``spec.damp`` and ``spec.blocksize``; loss with the undamped H.

    The column order is fixed (last block first), so ``spec.act_order`` and ``spec.static_groups`` do not apply.
    """
    if H is None:
        raise ValueError("LDLQ needs the input second moment H of the linear")
    q = block_ldlq(W, H, fmt, spec.damp, spec.blocksize, passes)
    Wq = fmt.dequantize(q)
    return SolveResult(Wq, q, proxy_loss(W, Wq, H.to(W.device)))


SOLVERS.add("ldlq", Solver(solve_ldlq, needs_hessian=True, check=check_ldlq))
SOLVERS.add("ldlq-tune", Solver(partial(solve_ldlq, passes=TUNE_PASSES), needs_hessian=True, check=check_ldlq))
