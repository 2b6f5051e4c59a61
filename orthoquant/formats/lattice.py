"""QuIP#'s E8 lattice formats: 8 weights per code, 2, 3 or 4 bits per weight (format ``e8p``).

A weight row of ``k`` columns (k a multiple of 8) is cut into ``k/8`` vectors; each is divided by the
scale and coded by residual stages of the codebooks in :mod:`.e8`:

====  ==============================  ==============  =========
bits  stages (codebook, gain)          code bits       opt_scale
====  ==============================  ==============  =========
2     E8P12                           16              1.03
3     E8P12, then E81B × 2.04         16 + 8 = 24     0.98
4     E8P12, then E8P12 × 3.8         16 + 16 = 32    0.9
====  ==============================  ==============  =========

Stage ``s`` codes the gained residual ``g_s · (v − Σ_{t<s} decode_t / g_t)`` and the vector decodes as
``scale · Σ_s decode_s / g_s``; the code is the stage codes concatenated, first stage in the high bits
(QuIP#'s ``init << 16 | resid``). Gains and opt_scales are QuIP#'s for 2 and 3 bits, and minimise the
MSE on N(0, 1) weights with our exact search there too (relative MSE 0.091 and 0.0296). For 4 bits
QuIP#'s 1.03 / 3.45 (tuned with its approximate search) give 0.0096 here, 0.9 / 3.8 give 0.0084.

The scale is RMS-based as in QuIP#: ``scale = RMS(x) / opt_scale`` per tensor (``group_size: 0``, QuIP#'s Wscale) or per row (``-1``).

Our code indices are not quip-sharp's (same points, other order): :mod:`.quipsharp` maps them both ways.

Codes are int64 of shape (rows, k/8); :meth:`LatticeFormat.pack` splits each into its 2, 3 or 4 bytes
(little-endian) and packs the bytes with the 8-bit packer, which round-trips exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, ClassVar

import torch

from ..errors import ConfigError
from .base import FORMATS, QParams, QuantFormat
from .e8 import DIM, e81b_encode, e81b_points, e8p_encode, e8p_points
from .packing import pack_codes, unpack_codes


@dataclass(frozen=True)
class Stage:
    """One residual stage: its codebook and the gain applied to the residual before coding it.

    :param bits: code bits of the stage.
    :param encode: (N, 8) float -> (N,) int64 nearest codes.
    :param points: () -> (2**bits, 8) float32 table of the codebook's points.
    :param gain: the residual is multiplied by it before coding and divided by it after decoding.
    """

    bits: int
    encode: Callable[[torch.Tensor], torch.Tensor]
    points: Callable[[], torch.Tensor]
    gain: float = 1.0


E8P = Stage(16, e8p_encode, e8p_points)
E81B = Stage(8, e81b_encode, e81b_points)
# bits per weight -> (stages, opt_scale): QuIP#'s E8P12, E8P12RVQ3B and E8P12RVQ4B codebooks
LATTICE_CODEBOOKS: dict[int, tuple[tuple[Stage, ...], float]] = {
    2: ((E8P,), 1.03),
    3: ((E8P, replace(E81B, gain=2.04)), 0.98),
    4: ((E8P, replace(E8P, gain=3.8)), 0.9),
}


@lru_cache(maxsize=None)
def _table(points: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    """A codebook's (2**bits, 8) points on ``device``, copied there once."""
    return points().to(device)


def _vectors(x: torch.Tensor) -> torch.Tensor:
    """(rows, k) -> (rows·k/8, 8), with a clear error when k is not a multiple of 8."""
    if x.shape[-1] % DIM:
        raise ConfigError(f"the e8p format codes {DIM} weights at a time, but got {x.shape[-1]} columns; "
                          "use a solver that quantizes 8 columns together (ldlq, quip-ldlq)")
    return x.reshape(-1, DIM)


@FORMATS.register("e8p")
class LatticeFormat(QuantFormat):
    """E8P lattice codebooks with residual stages; see the module docstring."""

    name = "e8p"
    vector_size: ClassVar[int] = DIM

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.stages, self.opt_scale = LATTICE_CODEBOOKS[spec.bits]
        self.code_bits = sum(s.bits for s in self.stages)

    def check_shape(self, rows: int, cols: int) -> None:
        super().check_shape(rows, cols)
        _vectors(torch.empty(rows, cols, device="meta"))

    def fit(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> QParams:
        """Scale ``RMS / opt_scale`` of the tensor (1, 1) or of each row (rows, 1)."""
        rms = self.grouped(x.float()).square().mean(-1).sqrt()
        scale = self.round_scale(rms / self.opt_scale)
        return QParams(torch.where(scale > 0, scale, torch.ones_like(scale)))

    def encode(self, x: torch.Tensor, params: QParams) -> torch.Tensor:
        """Codes (rows, k/8) int64 of ``x`` (rows, k) under the (rows or 1, 1) scale."""
        v = _vectors(x.float() / params.scale)
        code = torch.zeros(len(v), dtype=torch.int64, device=x.device)
        coded = torch.zeros_like(v)
        for stage in self.stages:
            c = stage.encode((v - coded) * stage.gain)
            coded += _table(stage.points, v.device)[c] / stage.gain
            code = code << stage.bits | c
        return code.reshape(x.shape[0], -1)

    def decode(self, codes: torch.Tensor, params: QParams) -> torch.Tensor:
        """Float32 values (rows, 8·k) of ``codes`` (rows, k) under the (rows or 1, 1) scale."""
        out = torch.zeros(*codes.shape, DIM, device=codes.device)
        shift = self.code_bits
        for stage in self.stages:
            shift -= stage.bits
            c = (codes >> shift) & ((1 << stage.bits) - 1)
            out += _table(stage.points, out.device)[c] / stage.gain
        return out.reshape(codes.shape[0], -1) * params.scale

    @property
    def _bytes(self) -> int:
        return self.code_bits // 8

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (rows, k) -> int32 (rows, ceil(k·code_bits/32)): each code's bytes, low byte first."""
        shifts = 8 * torch.arange(self._bytes, device=codes.device)
        b = (codes.long()[..., None] >> shifts) & 0xFF
        return pack_codes(b.reshape(codes.shape[0], -1), 8)

    def unpack(self, packed: torch.Tensor, cols: int) -> torch.Tensor:
        """Exact inverse of :meth:`pack`: (rows, cols) int64 codes."""
        b = unpack_codes(packed, 8, cols * self._bytes).long().reshape(packed.shape[0], cols, self._bytes)
        return (b << 8 * torch.arange(self._bytes, device=b.device)).sum(-1)
