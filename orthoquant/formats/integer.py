"""Uniform integer formats, INT2..INT8, symmetric or asymmetric, with optional MSE clip search.

Codes are unsigned ``q ∈ [0, 2^b − 1]`` and decode as ``scale · (q − zero)``:
- symmetric: ``zero = 2^(b−1)`` (implicit), ``scale = clip·amax / (2^(b−1) − 1)``, so the signed value
  ``q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1) − 1]`` is exactly compressed-tensors' signed int and amax is on the grid;
- asymmetric: ``scale = clip·(max − min) / (2^b − 1)``, ``zero = round(−clip·min / scale)``, with
  ``min ≤ 0 ≤ max`` so that zero is representable (GPTQ's convention).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import FORMATS, QParams, QuantFormat

# MSE clip search of GPTQ/QuaRot: candidates p = 1 - i/grid, error |q - x|^norm per group.
CLIP_GRID = 100
CLIP_MIN_RATIO = 0.2
CLIP_NORM = 2.4


@FORMATS.register("int")
class IntFormat(QuantFormat):
    """Integer format; see the module docstring for the code convention."""

    name = "int"

    @classmethod
    def check(cls, spec) -> None:
        if not 2 <= spec.bits <= 8:
            raise ConfigError(f"bits={spec.bits}: the int format takes bits in [2, 8]")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def _params(self, lo: torch.Tensor, hi: torch.Tensor) -> QParams:
        """Scale (and zero) of groups with range [lo, hi] (tensors shaped (rows, n_groups))."""
        if self.spec.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = amax / (2 ** (self.bits - 1) - 1)
            scale = self.round_scale(torch.where(scale > 0, scale, torch.ones_like(scale)))
            return QParams(scale)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / self.maxq
        scale = self.round_scale(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = torch.round(-lo / scale).clamp(0, self.maxq)
        return QParams(scale, zero)

    def fit(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> QParams:
        g = self.grouped(x.float())
        ratio = self.spec.clip_ratio
        lo, hi = g.amin(-1) * ratio, g.amax(-1) * ratio
        if not self.spec.clip_search:
            return self._params(lo, hi)
        return self._search_clip(g, lo, hi)

    def _search_clip(self, g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> QParams:
        """Shrink each group's range while the |error|^2.4 of its round trip decreases (grid search)."""
        best = self._params(lo, hi)
        best_err = self._group_error(g, best)
        for i in range(1, int(round((1 - CLIP_MIN_RATIO) * CLIP_GRID)) + 1):
            p = 1 - i / CLIP_GRID
            cand = self._params(lo * p, hi * p)
            err = self._group_error(g, cand)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best.scale = torch.where(better, cand.scale, best.scale)
            if best.zero is not None:
                best.zero = torch.where(better, cand.zero, best.zero)
        return best

    def _group_error(self, g: torch.Tensor, p: QParams) -> torch.Tensor:
        scale = p.scale.unsqueeze(-1)
        zero = self._zero(p).unsqueeze(-1) if p.zero is not None else self._zero(p)
        q = torch.clamp(torch.round(g / scale) + zero, 0, self.maxq)
        return ((q - zero) * scale - g).abs().pow(CLIP_NORM).sum(-1)

    def _zero(self, p: QParams) -> torch.Tensor | float:
        return p.zero if p.zero is not None else float(2 ** (self.bits - 1))

    def encode(self, x: torch.Tensor, params: QParams) -> torch.Tensor:
        q = torch.round(x.float() / params.scale) + self._zero(params)
        return q.clamp(0, self.maxq).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: QParams) -> torch.Tensor:
        return (codes.float() - self._zero(params)) * params.scale
