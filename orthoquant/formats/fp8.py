"""FP8 E4M3 (``float8_e4m3fn``) with a scale per channel/token (-1), tensor (0) or group (g > 0).

``scale = clip·amax / 448`` rounded to ``scale_dtype``; the code of ``x`` is the uint8 bit pattern of
``float8_e4m3fn(x / scale)`` (round to nearest even, saturated at ±448 so that a scale rounded down by
its storage dtype cannot produce NaN), and decoding reinterprets the code as E4M3 and multiplies by the
scale. This is the layout of compressed-tensors' ``float-quantized`` checkpoints (E4M3 weight, FP32 scale).
"""
from __future__ import annotations

import torch

from .base import FORMATS, QParams, QuantFormat

E4M3_MAX = 448.0


@FORMATS.register("fp8")
class FP8Format(QuantFormat):
    """FP8 E4M3; see the module docstring."""

    name = "fp8"

    def fit(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> QParams:
        """Scales (rows or 1, n_groups) of ``x`` (rows, cols); ``global_scale`` is unused."""
        amax = self.grouped(x.float()).abs().amax(-1) * self.spec.clip_ratio
        scale = amax / E4M3_MAX
        # An all-zero group gets scale 1: any positive value codes it as zeros.
        return QParams(self.round_scale(torch.where(scale > 0, scale, torch.ones_like(scale))))

    def encode(self, x: torch.Tensor, params: QParams) -> torch.Tensor:
        y = (x.float() / params.scale).clamp(-E4M3_MAX, E4M3_MAX)
        return y.to(torch.float8_e4m3fn).view(torch.uint8)

    def decode(self, codes: torch.Tensor, params: QParams) -> torch.Tensor:
        return codes.contiguous().view(torch.float8_e4m3fn).float() * params.scale
