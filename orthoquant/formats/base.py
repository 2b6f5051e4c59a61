"""The number-format interface shared by every weight, activation and KV-cache quantizer.

A format turns a 2-D float tensor ``x`` of shape (rows, cols) into unsigned integer *codes* of the same
shape plus scale parameters that broadcast over groups of columns:

- ``group_size == -1``: one scale per row (per output channel for weights, per token for activations);
- ``group_size == 0``: one scale for the whole tensor;
- ``group_size == g > 0``: one scale per row and per run of ``g`` consecutive columns (or per ``g_idx``
  entry when GPTQ's act-order permutes columns).

Codes are always unsigned, in ``[0, 2**bits)``, so one packer serves every format. Decoding is exact and
deterministic, which makes "store codes, reload, same outputs" hold bit for bit.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import QuantSpec
from ..errors import ConfigError
from ..registry import Registry
from .packing import pack_codes, unpack_codes

FORMATS: Registry[type["QuantFormat"]] = Registry("number format")

_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class QParams:
    """Scale parameters of one quantized tensor.

    :param scale: (rows or 1, n_groups) float32, already rounded to the format's storage dtype.
    :param zero: (rows or 1, n_groups) float32 holding integers, or None for formats without zero points.
    :param global_scale: () float32 per-tensor factor (NVFP4, MXFP4's 3/4 rule), or None.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def columns(self, cols: int, g_idx: torch.Tensor | None = None) -> "QParams":
        """These parameters expanded to one entry per column (``cols`` columns)."""
        return QParams(expand_groups(self.scale, cols, g_idx),
                       None if self.zero is None else expand_groups(self.zero, cols, g_idx),
                       self.global_scale)


def expand_groups(t: torch.Tensor, cols: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Broadcast a per-group tensor (rows, n_groups) to per-column (rows, cols)."""
    if g_idx is not None:
        return t[:, g_idx]
    groups = t.shape[-1]
    if cols % groups:
        raise ValueError(f"{cols} columns do not split into {groups} groups")
    return t.repeat_interleave(cols // groups, dim=-1) if groups > 1 else t


@dataclass
class QuantizedTensor:
    """A quantized 2-D tensor: codes plus the parameters that decode them.

    :param codes: (rows, cols) uint8 unsigned codes (unpacked).
    :param params: scales of the groups.
    :param g_idx: (cols,) int64 group of each column when groups are not contiguous (act-order), else None.
    """

    codes: torch.Tensor
    params: QParams
    g_idx: torch.Tensor | None = None


class QuantFormat(ABC):
    """A number format together with its scale granularity, built from a :class:`QuantSpec`.

    Subclasses implement :meth:`fit` (choose scales), :meth:`encode` and :meth:`decode`; the rest
    (quantize, dequantize, fake-quant with a straight-through gradient, packing) is shared.
    """

    name: ClassVar[str]
    # weights coded together along a row: 1 for scalar formats, 8 for the E8 lattice (solvers step by it)
    vector_size: ClassVar[int] = 1

    def __init__(self, spec: QuantSpec) -> None:
        # what ``spec`` may ask of this format was checked when it was built (orthoquant.choices.FORMAT_CHECKS)
        self.spec = spec
        self.bits = spec.bits
        self.group_size = spec.group_size
        if spec.scale_dtype not in _SCALE_DTYPES:  # "auto" is resolved from the model when quantizing
            raise ConfigError(f"scale_dtype={spec.scale_dtype!r} has no dtype yet: quantize resolves 'auto' from "
                              "the model's dtype (orthoquant.autoscale.resolve_auto_scales)")
        self.scale_dtype = _SCALE_DTYPES[spec.scale_dtype]

    def check_shape(self, rows: int, cols: int) -> None:
        """Raise :class:`ConfigError` when a (rows, cols) tensor cannot be quantized in this format:
        the checks quantizing makes, run on a meta tensor so that they cost nothing before any weight is read."""
        self.grouped(torch.empty(rows, cols, device="meta"))

    # --- the three format-specific operations --------------------------------------------------
    @abstractmethod
    def fit(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> QParams:
        """Scales for ``x`` (rows, cols), one per group along the last axis.

        :param global_scale: a per-tensor factor fixed by the caller (GPTQ fits it once on the whole
            weight, then fits group scales slice by slice); None computes it from ``x``.
        """

    @abstractmethod
    def encode(self, x: torch.Tensor, params: QParams) -> torch.Tensor:
        """Codes of ``x`` (rows, k) under ``params`` expanded to k columns (see :meth:`QParams.columns`)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, params: QParams) -> torch.Tensor:
        """Float32 values of ``codes`` (rows, k) under per-column ``params``."""

    def encode_decode(self, x: torch.Tensor, params: QParams) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encode(x), decode(encode(x)))`` for per-column ``params``; formats may share work between them
        (GPTQ calls it once per column, where each saved kernel call counts)."""
        codes = self.encode(x, params)
        return codes, self.decode(codes, params)

    # --- shared machinery ----------------------------------------------------------------------
    def global_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-tensor factor of ``x`` for formats that have one, else None."""
        return None

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` (rows, cols) as (rows or 1, n_groups, group) following the granularity."""
        rows, cols = x.shape
        if self.group_size == 0:
            return x.reshape(1, 1, rows * cols)
        if self.group_size == -1:
            return x.reshape(rows, 1, cols)
        if cols % self.group_size:
            raise ConfigError(
                f"group_size {self.group_size} does not divide the {cols} columns of a {rows}x{cols} tensor"
            )
        return x.reshape(rows, cols // self.group_size, self.group_size)

    def round_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """Round scales to their storage dtype now, so that exported checkpoints decode identically.

        A nonzero scale that underflows to 0 in a 16-bit dtype becomes the dtype's smallest value of its
        sign instead, so that encoding never divides by zero.
        """
        rounded = scale.to(self.scale_dtype).float()
        info = torch.finfo(self.scale_dtype)
        return torch.where((rounded == 0) & (scale != 0), torch.sign(scale) * info.tiny * info.eps, rounded)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        x = x.float()
        params = self.fit(x)
        return QuantizedTensor(self.encode(x, params.columns(x.shape[-1])), params)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return self.decode(q.codes, q.params.columns(q.codes.shape[-1], q.g_idx))

    def quantize_dequantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Round trip of a 2-D tensor through the format (no gradient); ``global_scale`` as in :meth:`fit`."""
        x = x.float()
        params = self.fit(x, global_scale).columns(x.shape[-1])
        return self.decode(self.encode(x, params), params)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` (..., d) row-wise over its last axis, straight-through gradient."""
        shape, dtype = x.shape, x.dtype
        q = self.quantize_dequantize(x.detach().reshape(-1, shape[-1])).reshape(shape).to(dtype)
        return x + (q - x).detach() if x.requires_grad else q

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (rows, cols) -> int32 (rows, ceil(cols·bits/32)): an LSB-first bit stream along columns.

        For bits dividing 32 that is ``32 // bits`` codes per word; see :mod:`.packing` for 3/5/6/7 bits.
        """
        return pack_codes(codes, self.bits)

    def unpack(self, packed: torch.Tensor, cols: int) -> torch.Tensor:
        return unpack_codes(packed, self.bits, cols)


def make_format(spec: QuantSpec) -> QuantFormat:
    """The format object described by ``spec`` (looked up by ``spec.format``; importing this module ran
    ``orthoquant.formats``' ``__init__`` first, which registers every format)."""
    return FORMATS.get(spec.format)(spec)
