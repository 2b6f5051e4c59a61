"""FP4 E2M1 block formats: MXFP4 (OCP MX, E8M0 scales) and NVFP4 (E4M3 scales, FP32 tensor scale).

An E2M1 code is ``sign << 3 | m`` where ``m`` indexes the magnitudes ``{0, .5, 1, 1.5, 2, 3, 4, 6}``;
rounding is to nearest with ties to the even code (the even mantissa), magnitudes above 6 saturate, and a
negative input that rounds to zero keeps its sign (code 8, −0). A value decodes as
``e2m1(code) · scale · global_scale`` (``global_scale`` None reads as 1):

- ``mxfp4`` (group 32): ``scale = 2^(⌊log2 amax⌋ − 2)``, a power of two stored as E8M0.
  ``scale_rule='spec'`` (the OCP MX spec's rule) has no global factor, so a block max in [6s, 8s)
  clips to 6s. ``scale_rule='three_quarters'`` (WUSH, FP-Quant) encodes ``x·¾/s`` and decodes with a
  4/3 factor carried as ``global_scale``: the block max lands in [3, 6) and never clips.
  compressed-tensors 0.20.1 (``generate_mx_scales`` / ``round_to_power_2``) does neither: it rounds the
  exponent *up* when amax's mantissa is ≥ 1.75 (it adds 2^(m−2) ulps before masking), giving
  ``2^(⌊log2 amax⌋ − 1)`` for those blocks (about 19% of a Gaussian tensor's) — the block max then lands
  in [3.5, 4) instead of clipping from [7, 8). Exports do not need that rule: a checkpoint stores our
  E8M0 scales (any power of two is valid) and our codes, which decode exactly; only compressed-tensors'
  own simulation of dynamic MXFP4 *activations* differs, and the export check reports those logits as
  not checked (``export/compressed_tensors/stock.py``).
- ``nvfp4`` (group 16): ``global_scale = amax_tensor / (448·6)`` in FP32 and
  ``scale = e4m3(amax_block / (6·global_scale))``; compressed-tensors stores ``1 / global_scale``.
"""
from __future__ import annotations

import logging

import torch

from ..choices import FP4_BLOCKS
from .base import FORMATS, QParams, QuantFormat

logger = logging.getLogger(__name__)

E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_VALUES = torch.cat([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])  # indexed by code, code 8 is −0
E2M1_MAX = 6.0
_MIDPOINTS = (E2M1_MAGNITUDES[1:] + E2M1_MAGNITUDES[:-1]) / 2
E4M3_MAX = 448.0
E4M3_MIN = 2.0**-9  # smallest positive (subnormal) E4M3 value
E8M0_EXP_RANGE = (-127, 127)


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of already-scaled values ``y`` (any shape): nearest, ties to even, saturating.

    :return: uint8 codes in [0, 16), same shape as ``y``.
    """
    a = y.abs().clamp(max=E2M1_MAX)
    mids = _MIDPOINTS.to(a.device)
    lo = torch.bucketize(a, mids, right=False)  # a on a midpoint -> the lower neighbour
    hi = torch.bucketize(a, mids, right=True)  # a on a midpoint -> the upper neighbour
    mag = torch.where((lo != hi) & (lo % 2 == 1), hi, lo)
    return (mag | (torch.signbit(y).to(mag.dtype) << 3)).to(torch.uint8)


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """``e2m1_decode(e2m1_encode(y))`` bit for bit (−0, saturation, NaN → ±6 included), without codes.

    Each stretch of the grid is evenly spaced, so the nearest value there is ``step · round(a / step)``
    with power-of-two steps (exact) and ``torch.round``'s ties to even, which are the even codes' ties:
    0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2 (step ½ on [0, 2]), 2.5 → 2, 3.5 → 4 (step 1 on [2, 4]),
    5 → 4 (step 2 on [4, 6]). Each piece is clamped to its stretch, so the two that do not apply sit at
    their ends (2 and 4) and the sum minus 6 is the one that does: clamps, roundings and exact adds
    only, because comparisons, ``where`` and ``bucketize`` are 5–30× slower per element on CPU.

    :param y: float32 values already divided by their scale (any shape).
    :return: float32 E2M1 values, same shape.
    """
    a = y.abs()
    q = a.clamp(2.0, 4.0).round_()  # [2, 4] by 1
    q.add_(a.mul(2.0).clamp_(max=4.0).round_(), alpha=0.5)  # [0, 2] by ½
    q.add_(a.mul_(0.5).clamp_(2.0, 3.0).round_(), alpha=2.0)  # [4, 6] by 2; saturates above
    # NaN passes the clamps; the encoder's bucketize sorts it past the last midpoint, to 6
    return q.sub_(6.0).nan_to_num_(nan=E2M1_MAX).copysign_(y)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E2M1 ``codes`` (any shape)."""
    return E2M1_VALUES.to(codes.device)[codes.long()]


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """⌊log2 x⌋ for positive float ``x``, exact (from the binary exponent, no log rounding)."""
    return torch.frexp(x.float()).exponent.to(torch.int32) - 1


def round_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Pass powers of two through E8M0 storage (a no-op that documents and asserts the dtype)."""
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    return scale if e8m0 is None else scale.to(e8m0).float()


class FP4Format(QuantFormat):
    """Shared E2M1 coding; subclasses choose the block size and how scales are fitted."""

    group: int

    def block_amax(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, n_blocks) clipped absolute maximum of each block of ``x`` (rows, cols)."""
        return self.grouped(x.float()).abs().amax(-1) * self.spec.clip_ratio

    @staticmethod
    def _total_scale(params: QParams) -> torch.Tensor:
        gs = params.global_scale
        return params.scale if gs is None else params.scale * gs

    def encode(self, x: torch.Tensor, params: QParams) -> torch.Tensor:
        return e2m1_encode(x.float() / self._total_scale(params))

    def decode(self, codes: torch.Tensor, params: QParams) -> torch.Tensor:
        # q·s is exact (s is a power of two or an E4M3 value), so only the global factor rounds.
        v = e2m1_decode(codes) * params.scale
        return v if params.global_scale is None else v * params.global_scale

    def quantize_dequantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``decode(encode(x))`` bit for bit, fused (the activation fake-quant's hot path): values by
        :func:`e2m1_round` instead of codes, and each block's scale broadcast over its block instead of
        expanded to every column; the same float32 operations on the same operands in the same order."""
        x = x.float()
        params = self.fit(x, global_scale)
        scale = params.scale.unsqueeze(-1)  # (rows, n_blocks, 1) against grouped (rows, n_blocks, group)
        gs = params.global_scale
        values = e2m1_round(self.grouped(x) / (scale if gs is None else scale * gs)).mul_(scale)
        return (values if gs is None else values.mul_(gs)).reshape(x.shape)


@FORMATS.register("mxfp4")
class MXFP4Format(FP4Format):
    """MXFP4: blocks of 32 with a power-of-two (E8M0) scale; see the module docstring for the rules."""

    name = "mxfp4"
    group = FP4_BLOCKS[name]

    def global_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """() float32 4/3 under the three-quarters rule (the dequantisation factor), else None."""
        return torch.tensor(4.0 / 3.0, device=x.device) if self.spec.scale_rule == "three_quarters" else None

    def fit(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> QParams:
        amax = self.block_amax(x)
        # An all-zero block gets 2^0 (any positive scale codes it as zeros) rather than frexp(0)'s 2^-3.
        exp = torch.where(amax > 0, floor_log2(amax) - 2, torch.zeros_like(amax, dtype=torch.int32))
        scale = torch.ldexp(torch.ones_like(amax), exp.clamp(*E8M0_EXP_RANGE).float())
        return QParams(round_e8m0(scale), global_scale=self.global_scale(x))


@FORMATS.register("nvfp4")
class NVFP4Format(FP4Format):
    """NVFP4: blocks of 16 with E4M3 scales under a per-tensor FP32 scale."""

    name = "nvfp4"
    group = FP4_BLOCKS[name]

    def global_scale(self, x: torch.Tensor) -> torch.Tensor:
        """() float32 per-tensor scale ``amax / (448·6)`` (1 for an all-zero tensor).

        Computed as the float32 reciprocal of the float32 ``448·6 / amax`` that compressed-tensors
        stores (and readers invert), rather than as ``amax / (448·6)`` directly: the two can differ in
        the last bit, and a 1-ulp weight change flips 4-bit activation roundings downstream.
        """
        amax = x.detach().float().abs().max()
        if amax == 0:
            logger.debug("nvfp4: all-zero tensor, global scale set to 1")
            return torch.ones((), device=x.device)
        return 1 / ((E4M3_MAX * E2M1_MAX) / amax)

    def fit(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> QParams:
        gs = self.global_scale(x) if global_scale is None else global_scale.float().reshape(())
        gs = gs.to(x.device)
        # Clamping keeps the scale a positive, finite E4M3 value: zero blocks and values far below the
        # tensor maximum get the smallest subnormal, a caller's small global scale cannot overflow.
        scale = (self.block_amax(x) / (E2M1_MAX * gs)).clamp(E4M3_MIN, E4M3_MAX)
        return QParams(scale.to(torch.float8_e4m3fn).float(), global_scale=gs)
