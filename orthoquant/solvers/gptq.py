"""GPTQ (Frantar et al. 2022): quantize columns in order and fold each one's error into the rest.

IST's form: with ``U`` upper and ``H'⁻¹ = UᵀU`` (``H'`` the damped ``H = E[x xᵀ]``), column ``j`` is
rounded to ``q``, then ``W[:, j+1:] -= (w_j − q)/U_jj ⊗ U[j, j+1:]``. This module runs the same algorithm
in its LDL form (QuIP's LDLQ, proven equal to GPTQ): with ``H' = R Rᵀ``, R upper (``R = U⁻¹``), column
``k`` is rounded from ``W_k + Σ_{j<k} (W_j − Q_j) F_jk``, ``F = R·diag(R)⁻¹ − I`` strictly upper. Both give
the same ``Q`` in exact arithmetic (``W − Q = E·U`` with E the scaled errors), but R is one Cholesky
factorisation of the reversed ``H'`` (n³/3 flops) where IST takes three (4n³/3), which dominates for
wide layers, and no inverse is formed. The columns are split recursively (at multiples of
``spec.blocksize`` above that size): once the first half of a span is quantized, its errors reach the
second half in one GEMM (m·n² flops in all, in near-square products that run at the machine's GEMM
rate; a left-looking update of 128-row blocks runs at a third of it on one CPU thread), and spans of
at most :data:`LEAF` columns go column by column with rank-1 updates of the span only.
The partial sums of the two forms differ for columns not reached yet: IST's updated weights of columns
a..b after columns < a are ``W + Y·R_gg⁻¹`` where the LDL form holds ``W + Y·diag(R_gg)⁻¹`` (Y the
feedback of columns < a, ``R_gg`` the diagonal block of R), so dynamic groups convert with a small
triangular solve before fitting.

Scale parameters come from the format only (``fit``/``encode``/``decode``), so every format works:
- per tensor (group 0), per channel (group -1) and static groups are fitted once on the whole weight
  (in its original order, after dead columns are zeroed); static groups keep contiguous groups under
  act-order, which kernels and exports prefer;
- dynamic groups are fitted when GPTQ reaches the first column of the group in processing order, on the
  *current* weights of the group, feedback from every earlier column included (IST reads the block-stale
  outer weight there). Spans split at multiples of the group, so a group is always one span that has
  all earlier feedback when its first column comes. Under act-order such groups hold permuted columns,
  hence g_idx;
- a per-tensor factor (``fmt.global_scale``, NVFP4) is fitted once on the whole weight and passed to
  every ``fit``.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..errors import ConfigError
from ..formats.base import QParams, QuantizedTensor
from .base import SOLVERS, SolveResult, Solver, check_format
from .cholesky import cholesky_lower_

log = logging.getLogger(__name__)

# Damping multipliers tried in turn, first in float32 then in float64, before giving up.
DAMP_STEPS = (1.0, 10.0, 100.0)

# Spans of at most LEAF columns are quantized column by column, each error a rank-1 update of the rest
# of the span only: short enough that those updates stay in cache, long enough that the GEMMs between
# spans are not dominated by their call overhead.
LEAF = 16
# Static-group parameters are gathered for this many processed columns at a time.
_STATIC_RUN = 128


def _reversed_hessian(H: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh ``dtype`` copy of ``H`` (in, in) in *reversed* processing order, dead inputs pinned to 1.

    A zero diagonal entry means the input is always 0; ``H_dd = 1`` keeps the factorisation defined (the
    caller zeroes that input's weights). Casting before the gather halves its traffic.

    :param dead: (in,) bool, original order.
    :param perm: (in,) processing order.
    """
    rev = perm.flip(0)
    Hr = H.to(dtype).index_select(0, rev).index_select(1, rev)
    Hr.diagonal()[dead[rev]] = 1
    return Hr


def upper_factor(H: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor,
                 damp: float) -> tuple[torch.Tensor, float]:
    """Upper ``R`` with ``H' + λI = R Rᵀ``, in float32 when possible, and the ``λ`` it took.

    ``H'`` is ``H`` in processing order with dead inputs pinned, ``λ = damp · mean(diag H')``. R is the
    lower Cholesky factor of the reversed matrix (blocked, see :mod:`.cholesky`), reversed. A failed
    factorisation retries with 10x and 100x the damping, then the same in float64, logging a warning
    each time; it never falls back to round-to-nearest.

    :param H: (in, in) float64 second moment, original order.
    :param dead: (in,) bool, inputs with a zero diagonal entry, original order.
    :param perm: (in,) processing order.
    :return: R (in, in) float32 or float64 in processing order, and λ.
    """
    mean_diag = float(torch.where(dead, 1.0, H.diagonal()).mean())
    for dtype in (torch.float32, torch.float64):
        for step in DAMP_STEPS:
            Hr = _reversed_hessian(H, dead, perm, dtype)
            Hr.diagonal().add_(damp * step * mean_diag)
            L, info = cholesky_lower_(Hr)  # in place: Hr becomes L
            if not info and bool(torch.isfinite(L.diagonal()).all()):
                return L.flip(0, 1), damp * step * mean_diag
            log.warning("GPTQ: Cholesky failed in %s with damping %.3g x mean diag; retrying",
                        str(dtype).removeprefix("torch."), damp * step)
    raise torch.linalg.LinAlgError(
        f"GPTQ: the Hessian is not positive definite even with damping {damp * DAMP_STEPS[-1]:.3g} x mean "
        "diag in float64; check the calibration statistics for NaN/Inf or a broken capture")


def feedback_from_factor(R: torch.Tensor) -> torch.Tensor:
    """The strictly upper feedback ``F = R·diag(R)⁻¹ − I`` of an upper factor ``R`` (overwritten)."""
    R /= R.diagonal().clone()  # column k divided by R_kk
    R.diagonal().zero_()
    return R


def ldl_loss(residuals: torch.Tensor, errors: torch.Tensor, r_diag: torch.Tensor, damping: float,
             dead: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` (undamped H) from GPTQ's by-products in O(m·n), where a direct product is m·n².

    With ``D = W − Q`` and the rounding residuals ``r = D(I + F) = D·R·diag(R)⁻¹`` (the updated weight of
    each column minus its code's value), ``tr(D H'' Dᵀ) = ‖D R‖² = Σ_k R_kk² ‖r_k‖²`` for the factored
    ``H'' = R Rᵀ``: H in processing order plus ``λI``, dead inputs pinned to 1. Taking away
    ``λ‖D_live‖² + (1 + λ)‖D_dead‖²`` leaves the loss under H, in which dead inputs weigh nothing.

    :param residuals: (in, out) ``r`` in processing order, transposed like the solver's working weight.
    :param errors: (in, out) ``D`` likewise (dead inputs' weights zeroed).
    :param r_diag: (in,) the diagonal of R.
    :param dead: (in,) bool, processing order.
    """
    # float32 norms of one row each (vecdot would materialise an (in, out) product), combined in float64
    r2 = torch.linalg.vector_norm(residuals, dim=1).double().square()
    d2 = torch.linalg.vector_norm(errors, dim=1).double().square()
    return float((r2 * r_diag.double().square()).sum() - damping * d2.sum() - d2[dead].sum())


class _Scales:
    """The scale parameters of the weight's columns as GPTQ reaches them.

    :param fmt: the format.
    :param W: (out, in) weight in original column order, dead columns zeroed, not yet updated.
    :param perm: (in,) processing order (act-order), or None for the natural order.
    :param static_groups: fit groups on ``W`` up front instead of when GPTQ reaches them.
    """

    def __init__(self, fmt, W: torch.Tensor, perm: torch.Tensor | None, static_groups: bool) -> None:
        self.fmt, self.perm, self.cols = fmt, perm, W.shape[1]
        self.group = fmt.group_size if fmt.group_size > 0 else 0
        if self.group and self.cols % self.group:
            raise ConfigError(f"group_size {self.group} does not divide the {self.cols} input columns")
        self.global_scale = fmt.global_scale(W)
        self.dynamic = self.group > 0 and not static_groups
        self.fitted: list[QParams] = []
        self.whole = None if self.dynamic else fmt.fit(W, global_scale=self.global_scale)
        # The current column parameters: one set for all columns (no groups) or the current dynamic
        # group's; static groups gather theirs per run of columns instead (see :meth:`_static`).
        self._current = None if self.group else self.whole.columns(1)
        self._run: tuple[int, QParams] = (self.cols, None)

    def blocksize(self, blocksize: int) -> int:
        """``blocksize`` rounded to whole dynamic groups (at least one), so no group spans two blocks."""
        if not self.dynamic:
            return blocksize
        return max(self.group, blocksize // self.group * self.group)

    def column(self, k: int, current: Callable[[int, int], torch.Tensor]) -> QParams:
        """Parameters of the ``k``-th processed column, expanded to one column.

        :param current: ``current(a, b)`` returns the up-to-date weights (out, b − a) of processed
            columns ``a..b``; dynamic groups are fitted on it at their first column.
        """
        if self.dynamic and k % self.group == 0:
            p = self.fmt.fit(current(k, k + self.group).float(), global_scale=self.global_scale)
            self.fitted.append(p)
            self._current = p.columns(1)
        elif self.group and not self.dynamic:
            return self._static(k)
        return self._current

    def _static(self, k: int) -> QParams:
        """Static group parameters of column ``k``, gathered for a run of columns at a time.

        Under act-order consecutive columns hit different groups; gathering (run, out) rows once per
        run makes each column's parameters a view instead of a slice-and-expand per column.
        """
        start, p = self._run
        if not start <= k < start + _STATIC_RUN:
            stop = min(k + _STATIC_RUN, self.cols)
            idx = torch.arange(k, stop, device=self.whole.scale.device)
            idx = (idx if self.perm is None else self.perm[k:stop]) // self.group
            rows = lambda t: None if t is None else t.index_select(1, idx).T.contiguous()  # noqa: E731
            start, p = k, QParams(rows(self.whole.scale), rows(self.whole.zero), self.whole.global_scale)
            self._run = (start, p)
        j = k - start
        return QParams(p.scale[j][:, None], None if p.zero is None else p.zero[j][:, None], p.global_scale)

    def params(self) -> tuple[QParams, torch.Tensor | None]:
        """All groups' parameters and the (in,) g_idx of each original column (None when contiguous)."""
        if not self.dynamic:
            return self.whole, None
        first = self.fitted[0]
        zero = None if first.zero is None else torch.cat([p.zero for p in self.fitted], 1)
        params = QParams(torch.cat([p.scale for p in self.fitted], 1), zero, first.global_scale)
        if self.perm is None:
            return params, None
        g_idx = torch.empty(self.cols, dtype=torch.long, device=self.perm.device)
        g_idx[self.perm] = torch.arange(self.cols, device=self.perm.device) // self.group
        return params, g_idx


class _Columns:
    """The GPTQ recursion on the transposed, processed-order weight ``Wt`` (in, out).

    Working on Wᵀ makes each weight column a contiguous row, which keeps the per-column ops cheap on CPU.
    Row k of ``Wt`` is overwritten with the error ``W_k − Q_k`` once column k is quantized; ``W1`` holds
    the updated weights ``W_k + Σ_{j<k} (W_j − Q_j) F_jk`` of a span from the moment the span starts,
    and row k the rounding residual (updated weight − ``Q_k``) once column k is quantized.
    """

    def __init__(self, Wt: torch.Tensor, F: torch.Tensor, scales, fmt, block: int, group: int) -> None:
        self.Wt, self.F, self.scales, self.fmt, self.block, self.group = Wt, F, scales, fmt, block, group
        self.W1 = Wt.clone()
        self.codes = torch.empty(Wt.shape, dtype=torch.uint8, device=Wt.device)

    def current(self, a: int, b: int) -> torch.Tensor:
        # W1 = W + Y·diag(R)⁻¹ with Y the feedback of columns < a; IST's updated weights of columns
        # a..b are W + Y·R_gg⁻¹ = W + (W1 − W)·(I + F_gg)⁻¹, a unit triangular solve.
        Z = torch.linalg.solve_triangular(self.F[a:b, a:b].T, self.W1[a:b] - self.Wt[a:b],
                                          upper=False, unitriangular=True)
        return (self.Wt[a:b] + Z).T

    def span(self, a: int, b: int) -> None:
        """Quantize columns ``a..b``, whose rows of ``W1`` have the feedback of every column < a."""
        if b - a <= LEAF:
            return self.leaf(a, b)
        # Whole blocks, then whole dynamic groups: a group starts a span and lies within it.
        unit = self.block if b - a > self.block else self.group if 0 < self.group < b - a else 1
        mid = a + max(unit, (b - a) // 2 // unit * unit)
        self.span(a, mid)
        self.W1[mid:b].addmm_(self.F[a:mid, mid:b].T, self.Wt[a:mid])  # the first half's errors
        self.span(mid, b)

    def leaf(self, a: int, b: int) -> None:
        # A handful of kernel calls per column on m-vectors: their fixed cost is what this loop costs.
        fmt, W1, F = self.fmt, self.W1, self.F
        for k in range(a, b):
            c, q = fmt.encode_decode(W1[k].unsqueeze(1).float(), self.scales.column(k, self.current))
            q = q.squeeze(1)
            err = self.Wt[k].sub_(q)
            W1[k].sub_(q)
            if k + 1 < b:
                W1[k + 1:b].addr_(F[k, k + 1:b], err)
            self.codes[k] = c.squeeze(1)


def _quantize_columns(Wt: torch.Tensor, F: torch.Tensor, scales, fmt, blocksize: int,
                      group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on the transposed, processed-order weight ``Wt`` (in, out), overwritten with the errors.

    :param F: (in, in) strictly upper feedback matrix (see :func:`feedback_from_factor`), same dtype as ``Wt``.
    :param scales: ``scales.column(k, current)`` gives column k's parameters (see :class:`_Scales`).
    :param blocksize: spans longer than this split at multiples of it.
    :param group: size of the dynamic groups (a multiple of it divides ``blocksize``), else 0.
    :return: (in, out) uint8 codes and the rounding residuals (see :func:`ldl_loss`), in processing order
        and transposed like ``Wt``.
    """
    cols = _Columns(Wt, F, scales, fmt, blocksize, group)
    cols.span(0, Wt.shape[0])
    return cols.codes, cols.W1


def solve_gptq(W: torch.Tensor, H: torch.Tensor | None, fmt, spec) -> SolveResult:
    """Quantize one linear's weight with GPTQ.

    :param W: (out, in) float32 weight.
    :param H: (in, in) float64 second moment ``E[x xᵀ]`` of the linear's input (required).
    :param fmt: any :class:`~orthoquant.formats.base.QuantFormat`.
    :param spec: :class:`~orthoquant.config.SolverSpec` (damp, blocksize, act_order, static_groups).
    :return: weight ``fmt.dequantize(qweight)`` in the original column order, loss ``tr(ΔW H ΔWᵀ)``
        with the undamped ``H`` (from the solver's residuals, :func:`ldl_loss`).
    """
    if H is None:
        raise ValueError("GPTQ needs the input second moment H of the linear")
    H = H.to(W.device)
    dead = H.diagonal() == 0  # inputs that never fire: their weights cannot matter
    Wz = W.float().masked_fill(dead, 0) if bool(dead.any()) else W.float()
    perm = None
    if spec.act_order:
        perm = torch.argsort(torch.where(dead, 1.0, H.diagonal()), descending=True, stable=True)
    scales = _Scales(fmt, Wz, perm, spec.static_groups)
    order = torch.arange(W.shape[1], device=W.device) if perm is None else perm
    R, damping = upper_factor(H, dead, order, spec.damp)
    r_diag = R.diagonal().clone()
    F = feedback_from_factor(R)
    # The recursion overwrites Wt, so it must be a copy: a gather of whole rows in processed order always
    # is (a plain transpose of a column-major W, as a fused rotation leaves it, would be W's own storage).
    Wt = Wz.T.index_select(0, order).to(F.dtype)
    del Wz
    codes, residuals = _quantize_columns(Wt, F, scales, fmt, scales.blocksize(spec.blocksize),
                                         scales.group if scales.dynamic else 0)
    del F
    loss = ldl_loss(residuals, Wt, r_diag, damping, dead[order])
    del residuals, Wt
    codes = (codes if perm is None else codes.index_select(0, torch.argsort(perm))).T.contiguous()
    params, g_idx = scales.params()
    qweight = QuantizedTensor(codes, params, g_idx)
    return SolveResult(fmt.dequantize(qweight), qweight, loss)


def check_gptq(fmt, spec, rows: int, cols: int) -> None:
    """GPTQ codes one column at a time: a format coding vectors of columns (E8P) cannot follow it."""
    if fmt.vector_size > 1:
        raise ConfigError(f"GPTQ codes one column at a time, but the {fmt.name} format codes {fmt.vector_size} "
                          "together; use solver ldlq or quip-ldlq")
    check_format(fmt, spec, rows, cols)


SOLVERS.add("gptq", Solver(solve_gptq, needs_hessian=True, check=check_gptq))
