"""Learnable rounding of solved linears (AutoRound's SignRound, anchored at the solver's codes).

A format's codes are seen as integer *indices* on a uniform line: INT codes are ``k ∈ [0, 2^b − 1]``
around the zero point, E2M1 codes are ``k ∈ [−7, 7]`` (sign times magnitude index; the grid values
0, .5, 1, 1.5, 2, 3, 4, 6 are joined by straight segments, so rounding the index to the nearest integer
is rounding the value to the nearest grid point). A weight decodes as ``value(k) · scale``.

Each weight keeps a fixed *anchor* ``a``: the value the solver rounded (:mod:`.anchors`; for RTN the
FP weight, for GPTQ its error-compensated weight), moved into the cell of the code the solver chose if
it lies outside (clipped values). The learned weight is

    k = clamp(round(index(a / s) + v), lo, hi),   W_q = value(k) · s,

with one offset ``v ∈ [−½, ½]`` per weight (so ``k`` is one of the two grid points around the anchor,
always on the grid) and a factor ``α ∈ [½, 3⁄2]`` per group on the solver's scale (two, on the low and
high ends of the range, for asymmetric INT, which moves the zero point too). Scales are rounded to their
storage type (float32/16 for INT, a power of two for MXFP4, E4M3 for NVFP4) in the forward pass with
a straight-through gradient, so the learned weight is exactly what the stored codes and scales decode to.
At ``v = 0, α = 1`` the codes and scales are the solver's.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.base import QParams, QuantizedTensor, QuantFormat, expand_groups
from ..formats.fp4 import E2M1_MAGNITUDES, E4M3_MAX, E4M3_MIN
from ..registry import Registry

OFFSET_BOUND = 0.5
SCALE_BOUNDS = (0.5, 1.5)
# The anchor stays this far inside its code's cell, so that rounding it again gives the code back.
CELL_MARGIN = 1e-3


class _RoundThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (one operation each way: ``x + (round(x) − x).detach()``
    gives the same values with two more passes over the weight, every learning step)."""
    return _RoundThrough.apply(x)


def through(x: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """``forward`` in the forward pass, the gradient of ``x`` in the backward pass."""
    return x + (forward - x).detach()


class Grid:
    """A format's code grid as integer indices; see the module docstring.

    :ivar lo, hi: the index range.
    :ivar n_alphas: learnable scale factors per group.
    """

    lo: float
    hi: float
    n_alphas = 1

    def __init__(self, fmt: QuantFormat) -> None:
        self.fmt = fmt

    def index(self, y: torch.Tensor, zero) -> torch.Tensor:
        """Fractional index of scaled values ``y`` (differentiable)."""
        raise NotImplementedError

    def value(self, k: torch.Tensor, zero) -> torch.Tensor:
        """Grid value at (integer) index ``k``, differentiable in ``k`` for the straight-through path."""
        raise NotImplementedError

    def indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Float index of stored codes."""
        raise NotImplementedError

    def codes(self, k: torch.Tensor) -> torch.Tensor:
        """uint8 codes of integer indices ``k``."""
        raise NotImplementedError

    def scales(self, p: QParams, alphas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows, groups) storage-rounded scale and zero point (or None) for the factors ``alphas``."""
        return self.round_scale(p.scale * alphas[0]), None

    def round_scale(self, s: torch.Tensor) -> torch.Tensor:
        return through(s, self.fmt.round_scale(s.detach()))

    def zero_of(self, p: QParams):
        return None


GRIDS: Registry[type[Grid]] = Registry("refinable weight format")


@GRIDS.register("int")
class IntGrid(Grid):
    """INT codes ``k ∈ [0, 2^b − 1]``, value ``k − zero``."""

    def __init__(self, fmt: QuantFormat) -> None:
        super().__init__(fmt)
        self.lo, self.hi = 0.0, float(2**fmt.bits - 1)
        self.n_alphas = 1 if fmt.spec.symmetric else 2

    def index(self, y, zero):
        return y + zero

    def value(self, k, zero):
        return k - zero

    def indices(self, codes):
        return codes.float()

    def codes(self, k):
        return k.to(torch.uint8)

    def zero_of(self, p: QParams):
        return p.zero if p.zero is not None else float(2 ** (self.fmt.bits - 1))

    def scales(self, p, alphas):
        if self.fmt.spec.symmetric:
            return super().scales(p, alphas)
        # the range [−z·s, (maxq − z)·s] with its low end scaled by α_lo and its high end by α_hi;
        # at α = 1 the ratio is exactly 1 (integers), so the scale and zero are the solver's bit for bit
        a_lo, a_hi = alphas
        z0, maxq = p.zero, self.hi
        s = self.round_scale(p.scale * ((a_hi * (maxq - z0) + a_lo * z0) / maxq))
        z = round_ste(z0 * a_lo * p.scale / s).clamp(0, maxq)
        return s, z


class FP4Grid(Grid):
    """E2M1 indices ``k ∈ [−7, 7]``: sign times the magnitude index."""

    lo, hi = -7.0, 7.0

    def __init__(self, fmt: QuantFormat) -> None:
        super().__init__(fmt)
        self.mags = E2M1_MAGNITUDES.clone()
        self.widths = self.mags[1:] - self.mags[:-1]

    def index(self, y, zero):
        a = y.abs().clamp(max=float(self.mags[-1]))
        seg = (torch.bucketize(a.detach(), self.mags.to(a.device), right=True) - 1).clamp(0, 6)
        mags, widths = self.mags.to(a.device)[seg], self.widths.to(a.device)[seg]
        return torch.sign(y) * (seg + (a - mags) / widths)

    def value(self, k, zero):
        m = k.abs()
        seg = m.detach().floor().long().clamp(0, 6)
        return torch.sign(k) * (self.mags.to(k.device)[seg] + (m - seg) * self.widths.to(k.device)[seg])

    def indices(self, codes):
        mag = (codes & 7).float()
        return torch.where(codes >= 8, -mag, mag)

    def codes(self, k):
        mag = k.abs().to(torch.uint8)
        return mag | ((k < 0).to(torch.uint8) << 3)


@GRIDS.register("mxfp4")
class MXFP4Grid(FP4Grid):
    def round_scale(self, s):
        # E8M0: the nearest power of two in the log domain (an exponent moves when α crosses 2^±½)
        return through(s, torch.exp2(torch.round(torch.log2(s.detach()))))


@GRIDS.register("nvfp4")
class NVFP4Grid(FP4Grid):
    def round_scale(self, s):
        return through(s, s.detach().clamp(E4M3_MIN, E4M3_MAX).to(torch.float8_e4m3fn).float())


class LinearRounding(nn.Module):
    """Learnable offsets and scale factors of one solved linear.

    :param fmt: the linear's weight format (a :data:`GRIDS` entry).
    :param solved: the solver's codes and scales (the starting point).
    :param rounded: (out, in) the values the solver rounded (:mod:`.anchors`: the FP weight for RTN, the
        error-compensated weight for GPTQ); moved into the cell of the solver's code, they are the anchors.

    :ivar offset: (out, in) rounding offsets ``v``, in [−½, ½].
    :ivar alphas: per group (rows, groups) scale factors, in :data:`SCALE_BOUNDS`.
    """

    def __init__(self, fmt: QuantFormat, solved: QuantizedTensor, rounded: torch.Tensor) -> None:
        super().__init__()
        self.fmt, self.grid, self.solved = fmt, GRIDS.get(fmt.name)(fmt), solved
        p = solved.params
        k0 = self.grid.indices(solved.codes)
        zero = self._cols(self.grid.zero_of(p))
        total = self._total(self._cols(p.scale))
        t0 = self.grid.index(rounded.float() / total, zero)
        t = torch.minimum(torch.maximum(t0, k0 - 0.5 + CELL_MARGIN), k0 + 0.5 - CELL_MARGIN)
        self.register_buffer("anchor", self.grid.value(t, zero) * total)
        self.offset = nn.Parameter(torch.zeros_like(self.anchor))
        self.alphas = nn.ParameterList(nn.Parameter(torch.ones_like(p.scale)) for _ in range(self.grid.n_alphas))

    def _cols(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        return expand_groups(t, self.solved.codes.shape[-1], self.solved.g_idx)

    def _total(self, scale_cols: torch.Tensor) -> torch.Tensor:
        gs = self.solved.params.global_scale
        return scale_cols if gs is None else scale_cols * gs

    def _indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(integer indices, group scale, group zero) of the current parameters."""
        k, scale, zero, _, _ = self._state()
        return k, scale, zero

    def _state(self):
        """:meth:`_indices` and the per-column scale and zero they were computed with."""
        scale, zero = self.grid.scales(self.solved.params, list(self.alphas))
        if zero is None:
            zero = self.grid.zero_of(self.solved.params)
        scale_cols, zero_cols = self._cols(scale), self._cols(zero)
        t = self.grid.index(self.anchor / self._total(scale_cols), zero_cols) + self.offset
        return round_ste(t).clamp(self.grid.lo, self.grid.hi), scale, zero, scale_cols, zero_cols

    def forward(self) -> torch.Tensor:
        """(out, in) float32 quantized weight under the current parameters (straight-through gradients)."""
        k, _, _, scale_cols, zero_cols = self._state()
        v = self.grid.value(k, zero_cols) * scale_cols
        gs = self.solved.params.global_scale
        return v if gs is None else v * gs

    @torch.no_grad()
    def project_(self) -> None:
        """Keep the parameters inside their bounds (after each optimizer step)."""
        self.offset.clamp_(-OFFSET_BOUND, OFFSET_BOUND)
        for a in self.alphas:
            a.clamp_(*SCALE_BOUNDS)

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        """The codes and storage-rounded scales of the current parameters."""
        k, scale, zero = self._indices()
        p = self.solved.params
        zero = zero.detach().clone() if p.zero is not None else None
        return QuantizedTensor(self.grid.codes(k), QParams(scale.detach().clone(), zero, p.global_scale),
                               self.solved.g_idx)
