"""Uniform integer formats, INT2..INT8, symmetric or asymmetric, with optional MSE clip search.

Codes are unsigned ``q ∈ [0, 2^b − 1]`` and decode as ``scale · (q − zero)``:
- symmetric: ``zero = 2^(b−1)`` (implicit), so the signed value ``q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1) − 1]``
  is exactly compressed-tensors' (and GPTQ v1's) signed int, with the scale the spec's ``scale_rule``
  gives (:data:`SYMMETRIC_SCALES`), ``clip·amax / d`` for a divisor ``d``:
  ``quarot`` ``d = 2^(b−1) − 1`` (QuaRot; amax is on the grid, the default), ``minmax`` ``d = (2^b − 1)/2``
  (IST GPTQ ``2·amax/maxq``, compressed-tensors ``amax/(bit_range/2)``; a finer step, and the positive max
  rounds to ``2^(b−1)`` and clips to ``2^(b−1) − 1``);
  ``full_range`` ``scale = −clip·x_ext / 2^(b−1)`` with ``x_ext`` the group's value of largest magnitude,
  signed (llama.cpp's Q4_0, AutoRound's sym default): the scale's sign puts that value on the code
  ``−2^(b−1)`` exactly, so all ``2^b`` codes are used with a step ``amax / 2^(b−1)``, finer than
  ``quarot``'s (the other side's max may clip by at most one step); scales may be negative, which every
  export decodes as it does any scale (``scale · (q − zero)``);
- asymmetric: ``scale = clip·(max − min) / (2^b − 1)``, ``zero = round(−clip·min / scale)``, with
  ``min ≤ 0 ≤ max`` so that zero is representable (GPTQ's convention).
"""
from __future__ import annotations

import torch

from .base import FORMATS, QParams, QuantFormat

# MSE clip search of GPTQ/QuaRot: candidates p = 1 - i/grid, error |q - x|^norm per group.
CLIP_GRID = 100
CLIP_MIN_RATIO = 0.2
CLIP_NORM = 2.4
# Floats of the (candidates, rows, groups, columns) error tile of the search: it should stay in cache.
CLIP_CHUNK = 1 << 17
# Candidate parameters (candidates x rows x groups) handled together: bounds the search's extra memory.
CLIP_PARAMS = 1 << 18
# Relative band around the fastest-ranked best clip whose candidates get the exact error.
CLIP_BAND = 1e-3
# Symmetric scale rules: (clipped group min, max, bits) -> scale (see the module docstring).
SYMMETRIC_SCALES = {
    "quarot": lambda lo, hi, bits: torch.maximum(lo.abs(), hi.abs()) / (2 ** (bits - 1) - 1),
    "minmax": lambda lo, hi, bits: torch.maximum(lo.abs(), hi.abs()) / ((2**bits - 1) / 2),
    "full_range": lambda lo, hi, bits: torch.where(lo.abs() >= hi.abs(), lo, hi) / -(2 ** (bits - 1)),
}


@FORMATS.register("int")
class IntFormat(QuantFormat):
    """Integer format; see the module docstring for the code convention."""

    name = "int"

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def _params(self, lo: torch.Tensor, hi: torch.Tensor) -> QParams:
        """Scale (and zero) of groups with range [lo, hi] (tensors shaped (rows, n_groups))."""
        if self.spec.symmetric:  # an all-zero group gets scale 1 (any nonzero scale encodes it exactly)
            scale = SYMMETRIC_SCALES[self.spec.scale_rule](lo, hi, self.bits)
            return QParams(self.round_scale(torch.where(scale != 0, scale, torch.ones_like(scale))))
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / self.maxq
        scale = self.round_scale(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = torch.round(-lo / scale).clamp(0, self.maxq)
        return QParams(scale, zero)

    def fit(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> QParams:
        g = self.grouped(x.float())
        ratio = self.spec.clip_ratio
        lo, hi = torch.aminmax(g, dim=-1)  # one pass over the weight instead of two
        lo, hi = lo * ratio, hi * ratio
        if not self.spec.clip_search:
            return self._params(lo, hi)
        return self._search_clip(g, lo, hi)

    def _search_clip(self, g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> QParams:
        """Per group, the clip ``p = 1 − i/CLIP_GRID`` of least |error|^2.4 (the first one on ties).

        All candidates are evaluated at once on tiles of about :data:`CLIP_CHUNK` floats, (candidates,
        rows, groups, columns), small enough to stay in cache, where a loop of full passes over the
        weight per candidate streams it from memory ten times per candidate. Blocks of rows with up
        to :data:`CLIP_PARAMS` candidate parameters share the per-block work.
        """
        steps = int(round((1 - CLIP_MIN_RATIO) * CLIP_GRID))
        ratios = torch.tensor([1 - i / CLIP_GRID for i in range(steps + 1)], device=g.device).view(-1, 1, 1)
        rows = max(1, CLIP_PARAMS // (len(ratios) * g.shape[1]))
        best = [self._best_clip(g[a:a + rows], lo[a:a + rows] * ratios, hi[a:a + rows] * ratios)
                for a in range(0, g.shape[0], rows)]
        zero = None if best[0].zero is None else torch.cat([p.zero for p in best])
        return QParams(torch.cat([p.scale for p in best]), zero)

    def _best_clip(self, g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> QParams:
        """The candidate ranges ``lo``, ``hi`` (K, rows, groups) of least error on ``g`` (rows, groups, group).

        ``pow`` with a fractional exponent is scalar code in torch (4x exp + log), so the candidates
        are ranked with ``exp(2.4·log|e|)`` (off by < 1e-4 relative) and only those within
        :data:`CLIP_BAND` of the best get the exact error; the pick is then the exact search's.
        """
        cand = self._params(lo, hi)
        err = self._ranking_error(g, cand)
        near = err <= err.amin(0) * (1 + CLIP_BAND)
        k, r, j = near.nonzero(as_tuple=True)
        at = lambda t: None if t is None else t[k, r, j][:, None]  # noqa: E731  (rows = the near ones)
        exact = torch.full_like(err, float("inf"))
        e = self._clip_error(g[r, j][:, None], QParams(at(cand.scale), at(cand.zero)))
        exact[near] = e.pow_(CLIP_NORM).sum(-1)[:, 0]
        i = exact.argmin(0, keepdim=True)  # argmin keeps the first of equal minima, like a strict < scan
        pick = lambda t: None if t is None else t.gather(0, i)[0]  # noqa: E731
        return QParams(pick(cand.scale), pick(cand.zero))

    def _ranking_error(self, g: torch.Tensor, p: QParams) -> torch.Tensor:
        """(K, rows, groups) ``Σ exp(2.4·log|e|)`` of ``g`` under K candidates, tile by tile."""
        K, rows, groups = p.scale.shape
        cols = min(g.shape[-1], max(1, CLIP_CHUNK // (K * groups)))  # of a row, when a row is too long
        step = max(1, CLIP_CHUNK // (K * groups * cols))
        err = torch.zeros_like(p.scale)
        for a in range(0, rows, step):
            sub = QParams(p.scale[:, a:a + step], None if p.zero is None else p.zero[:, a:a + step])
            for c in range(0, g.shape[-1], cols):
                e = self._clip_error(g[a:a + step, :, c:c + cols], sub)
                err[:, a:a + step] += e.log_().mul_(CLIP_NORM).exp_().sum(-1)
        return err

    def _clip_error(self, g: torch.Tensor, p: QParams) -> torch.Tensor:
        """|error| of ``g`` (rows, groups, k) under K candidate parameters (K, rows, groups), in one buffer.

        The symmetric ``clamp(round(x/s), −z, maxq − z)`` is exactly the clamp of the code minus z
        (small integers), as in :meth:`encode` and :meth:`decode`.
        """
        scale = p.scale.unsqueeze(-1)
        q = torch.div(g, scale).round_()
        if p.zero is None:
            z = self._zero(p)
            q.clamp_(-z, self.maxq - z)
        else:  # a clamp with tensor bounds is a slow path in torch: shift, clamp, shift back
            z = p.zero.unsqueeze(-1)
            q.add_(z).clamp_(0, self.maxq).sub_(z)
        return q.mul_(scale).sub_(g).abs_()

    def _zero(self, p: QParams) -> torch.Tensor | float:
        return p.zero if p.zero is not None else float(2 ** (self.bits - 1))

    def encode(self, x: torch.Tensor, params: QParams) -> torch.Tensor:
        q = torch.round(x.float() / params.scale) + self._zero(params)
        return q.clamp(0, self.maxq).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: QParams) -> torch.Tensor:
        # uint8 − zero promotes to float32 in the same pass: (float(code) − zero), as a .float() first
        return (codes - self._zero(params)).mul_(params.scale)

    def encode_decode(self, x: torch.Tensor, params: QParams) -> tuple[torch.Tensor, torch.Tensor]:
        # One rounding serves both: the clamped code held as a float is exact, so (code − zero)·scale
        # is decode's value bit for bit.
        zero = self._zero(params)
        q = torch.div(x.float(), params.scale).round_().add_(zero).clamp_(0, self.maxq)
        return q.to(torch.uint8), q.sub_(zero).mul_(params.scale)
