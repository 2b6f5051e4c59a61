"""Solvers that quantize each linear in a per-block transformed basis: WUSH and the block-Hadamard baseline.

A block rule builds one (d, d) column-form transform ``T_b`` per input block of d channels, d the
format's group size, so that every scale group sees exactly one transformed block. The linear then
computes ``Q_a(x_b T_bᵀ) · Q_w(W_b T_b⁻¹)ᵀ``: the transform goes online as the solver's
``input_transform`` (a :class:`~orthoquant.transforms.base.BlockDense` with blocks ``T_bᵀ``, fed to the
activation quantizer), and the returned weight is the dequantized weight in that basis.

- ``<rule>-rtn``: every block's T from the whole weight at once, then round to nearest.
- ``<rule>-gptq``: GPTQ in its block LDL form. With ``H' = R Rᵀ`` (R upper, :func:`upper_factor`) and
  errors ``E = W − Q`` of the blocks already quantized, block b's current (IST-updated) weight is
  ``Y_b = W_b + E_{<b} R_{<b,b} R_bb⁻¹`` and its effective Hessian is ``R_bb R_bbᵀ``. T is built from
  ``Y_b``; GPTQ runs inside the block on ``Y_b T⁻¹`` with the Hessian ``T R_bb R_bbᵀ Tᵀ`` and the
  block's scales frozen from ``Y_b T⁻¹``; the result is mapped back by ``·T`` before its error feeds
  the later blocks (WUSH's ``gptq_outer``/``gptq_inner``). A per-tensor factor (NVFP4) is fitted once on
  the whole weight transformed with the transforms of the original weight.

Rules: ``wush`` (:func:`~orthoquant.transforms.wush.wush_blocks`, needs H) and ``blockhad`` (``T_b = H_d``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..errors import ConfigError
from ..formats.base import QParams, QuantizedTensor
from ..hadamard import hadamard_factor
from ..transforms.base import BlockDense
from ..transforms.wush import hadamard_blocks, no_tf32, wush_blocks
from .base import SOLVERS, SolveResult, Solver, check_format
from .gptq import _quantize_columns, feedback_from_factor, upper_factor
from .loss import proxy_loss


@dataclass(frozen=True)
class BlockRule:
    """How a solver builds its per-block transforms.

    :param build: ``build(W (out, in), H (in, in) or None, d, damp) -> T (in/d, d, d)`` column form.
    :param orthogonal: every T is orthogonal (the weight fold is then a product, not a solve).
    :param needs_hessian: ``build`` reads H.
    """

    build: Callable[[torch.Tensor, torch.Tensor | None, int, float], torch.Tensor]
    orthogonal: bool
    needs_hessian: bool


RULES = {
    "wush": BlockRule(wush_blocks, orthogonal=False, needs_hessian=True),
    "blockhad": BlockRule(lambda W, H, d, damp: hadamard_blocks(W.shape[1] // d, d), orthogonal=True,
                          needs_hessian=False),
}


def block_size(fmt, cols: int) -> int:
    """The transform block: the format's group size, which must be positive and divide the ``cols`` inputs."""
    if fmt.group_size <= 0:
        raise ConfigError(f"group_size={fmt.group_size}: block transforms need groups (group_size > 0), "
                          "one transformed block per scale group")
    if cols % fmt.group_size:
        raise ConfigError(f"group_size {fmt.group_size} does not divide the {cols} input columns")
    return fmt.group_size


def check_blocks(fmt, spec, rows: int, cols: int) -> None:
    """Groups that divide the inputs and a Hadamard of the group's order (both rules end in H_d)."""
    hadamard_factor(block_size(fmt, cols))
    check_format(fmt, spec, rows, cols)


def check_gptq_blocks(fmt, spec, rows: int, cols: int) -> None:
    if spec.act_order:
        raise ConfigError("solver.act_order=true: block-transformed GPTQ keeps the natural column order")
    check_blocks(fmt, spec, rows, cols)


def as_transform(T: torch.Tensor, orthogonal: bool) -> BlockDense:
    """The online transform of column-form blocks T (k, d, d), stored in float32 (the runtime dtype).

    Callers fold with this object, so the weight is expressed in exactly the basis applied at inference.
    """
    return BlockDense(T.transpose(1, 2).float().contiguous(), orthogonal=orthogonal)


def to_original(weight: torch.Tensor, t: BlockDense) -> torch.Tensor:
    """A transformed-basis weight (out, in) mapped back: ``W = W' Mᵀ``, per block ``W'_b T_b`` (float64)."""
    return BlockDense(t.blocks.transpose(1, 2)).forward(weight.double())


def _build(rule: BlockRule, W: torch.Tensor, H: torch.Tensor | None, fmt, spec) -> BlockDense:
    """The block transforms of ``W`` (out, in) under ``rule``."""
    if rule.needs_hessian and H is None:
        raise ValueError("this block transform needs the input second moment H of the linear")
    return as_transform(rule.build(W, H, block_size(fmt, W.shape[1]), spec.damp), rule.orthogonal)


def solve_rtn_blocks(W: torch.Tensor, H: torch.Tensor | None, fmt, spec, rule: BlockRule) -> SolveResult:
    """Round to nearest in the transformed basis, all blocks at once.

    :param W: (out, in) float32 weight; ``H``: (in, in) float64 ``E[x xᵀ]`` (only for the loss unless
        the rule reads it).
    :return: weight and codes in the transformed basis, the transform, ``tr(ΔW H ΔWᵀ)`` in the original one.
    """
    with no_tf32():
        t = _build(rule, W, H, fmt, spec)
        q = fmt.quantize(t.consumer(W.double()).float())
        Wq = fmt.dequantize(q)
        return SolveResult(Wq, q, proxy_loss(W, to_original(Wq, t), H), input_transform=t)


class _Frozen:
    """Scale parameters fixed for a whole block (GPTQ's ``scales.column`` interface)."""

    def __init__(self, params: QParams) -> None:
        self.one = params.columns(1)

    def column(self, k: int, current) -> QParams:
        return self.one


def _upper_root(A: torch.Tensor) -> torch.Tensor:
    """Upper R with ``R Rᵀ = A Aᵀ`` for a square invertible A, from a QR of the flipped ``Aᵀ``.

    With J the order reversal, ``(JA)ᵀ = Q R̃`` gives ``J A Aᵀ J = R̃ᵀR̃``, so ``R = J R̃ᵀ J``. Unlike a
    Cholesky factor of ``A Aᵀ`` this never squares A's condition number. Column signs of R may differ
    from a Cholesky factor's; GPTQ's feedback ``R·diag(R)⁻¹`` and ``R Rᵀ`` do not see them.
    """
    return torch.linalg.qr(A.flip(0).T, mode="r")[1].T.flip(0, 1)


def _solve_block(Yt: torch.Tensor, H_bb: torch.Tensor, R_bb: torch.Tensor, fmt, spec, rule: BlockRule,
                 gs: torch.Tensor | None):
    """GPTQ on one block in its own transformed basis (float64).

    :param Yt: (d, out) current weights of the block, transposed.
    :param H_bb: (d, d) diagonal block of the undamped H (WUSH's ``Σ_X``).
    :param R_bb: (d, d) diagonal block of the upper factor: the effective Hessian is ``R_bb R_bbᵀ``.
    :return: codes (out, d), the block's parameters, its transform and ``Q_bᵀ`` (d, out) in the original basis.
    """
    d = Yt.shape[0]
    t = as_transform(rule.build(Yt.T, H_bb, d, spec.damp), rule.orthogonal)
    T = t.blocks[0].T.double()
    Ypt = t.consumer(Yt.T).T.contiguous()  # (Y T⁻¹)ᵀ
    R_t = _upper_root(T @ R_bb)  # T H_eff Tᵀ = R_t R_tᵀ, positive definite already: no extra damping
    params = fmt.fit(Ypt.T.float(), global_scale=gs)
    codes = _quantize_columns(Ypt, feedback_from_factor(R_t), _Frozen(params), fmt, d)[0].T
    Qt = to_original(fmt.decode(codes, params.columns(d)), t).T
    return codes, params, t.blocks[0], Qt


def solve_gptq_blocks(W: torch.Tensor, H: torch.Tensor | None, fmt, spec, rule: BlockRule) -> SolveResult:
    """GPTQ with a transform per block built from the error-updated weights (module docstring).

    :param W: (out, in) float32 weight.
    :param H: (in, in) float64 second moment ``E[x xᵀ]`` of the linear's input (required).
    :param spec: :class:`~orthoquant.config.SolverSpec`; ``damp`` damps H and the block moments,
        ``blocksize`` and ``static_groups`` do not apply (blocks are the scale groups, scales are
        frozen per block), ``act_order`` is refused (it would split the blocks).
    :return: weight and codes in the transformed basis, the transform, ``tr(ΔW H ΔWᵀ)`` in the original one.
    """
    if H is None:
        raise ValueError("GPTQ needs the input second moment H of the linear")
    check_gptq_blocks(fmt, spec, *W.shape)
    n = W.shape[1]
    d = block_size(fmt, n)
    H = H.to(W.device)
    dead = H.diagonal() == 0
    with no_tf32():
        Wz = W.double().masked_fill(dead, 0)  # inputs that never fire: their weights cannot matter
        gs = fmt.global_scale(_build(rule, Wz, H, fmt, spec).consumer(Wz).float())
        R, _ = upper_factor(H, dead, torch.arange(n, device=W.device), spec.damp)
        Wt = Wz.T.to(R.dtype).contiguous()
        Et = torch.empty_like(Wt)  # E = W − Q, transposed, filled block by block
        codes, scales, blocks = [], [], []
        for i1 in range(0, n, d):
            b = slice(i1, i1 + d)
            feedback = torch.linalg.solve_triangular(R[b, b].T, R[:i1, b].T @ Et[:i1], upper=False)
            c, p, block, Qt = _solve_block((Wt[b] + feedback).double(), H[b, b], R[b, b].double(), fmt, spec,
                                           rule, gs)
            Et[b] = Wt[b] - Qt.to(Et.dtype)
            codes.append(c)
            scales.append(p)
            blocks.append(block)
        zero = None if scales[0].zero is None else torch.cat([p.zero for p in scales], 1)
        qweight = QuantizedTensor(torch.cat(codes, 1).contiguous(),
                                  QParams(torch.cat([p.scale for p in scales], 1), zero, gs))
        Wq = fmt.dequantize(qweight)
        t = BlockDense(torch.stack(blocks), orthogonal=rule.orthogonal)
        return SolveResult(Wq, qweight, proxy_loss(W, to_original(Wq, t), H), input_transform=t)


for _name, _rule in RULES.items():
    SOLVERS.add(f"{_name}-rtn", Solver(partial(solve_rtn_blocks, rule=_rule), needs_hessian=_rule.needs_hessian,
                                       check=check_blocks))
    SOLVERS.add(f"{_name}-gptq", Solver(partial(solve_gptq_blocks, rule=_rule), needs_hessian=True,
                                        check=check_gptq_blocks))
