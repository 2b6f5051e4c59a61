"""Bit packing of unsigned codes, exact and vectorised.

Two layouts are supported:

- :func:`pack_codes`: b-bit codes (2 <= b <= 8) as one little-endian bit stream per row, LSB first, cut
  into int32 words. Code ``i`` occupies stream bits ``[b·i, b·(i+1))``, so for b dividing 32 word ``w``
  holds codes ``w·32/b ..`` at bit offsets ``b·(i mod 32/b)`` (GPTQ's and compressed-tensors' int4/int8
  layout), and for b = 3, 5, 6, 7 codes cross word boundaries, 32 codes filling exactly ``b`` words
  (GPTQ's 3-bit layout, compressed-tensors' dense pack-quantized layout). A row of ``cols`` codes takes
  ``ceil(cols·b / 32)`` words; the unused high bits of the last word are zero.
- :func:`pack_nibbles`: two 4-bit codes per byte, the even column in the low nibble (compressed-tensors'
  ``nvfp4-pack-quantized`` / E2M1 layout).

Rows are packed independently; large tensors are processed in row chunks to bound the int64 scratch.
"""
from __future__ import annotations

import math

import torch

_STREAM = 32  # codes per block: 32 codes of b bits fill exactly b int32 words
_WORD = 1 << 32
_CHUNK_CODES = 1 << 22  # codes per row chunk (about 100 MiB of int64 scratch)


def _bit_layout(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each of the 32 codes of a block sits: (word index, bit shift, spills into the next word)."""
    offset = torch.arange(_STREAM, dtype=torch.int64) * bits
    word, shift = offset // 32, offset % 32
    return word, shift, shift + bits > 32


def _check(codes: torch.Tensor, bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing takes 2..8 bits")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (rows, cols), got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code {int(codes.max())} does not fit in {bits} bits")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with the same bit pattern (two's complement)."""
    return torch.where(words >= _WORD // 2, words - _WORD, words).to(torch.int32)


def _row_chunks(rows: int, cols: int) -> range:
    """Starts of row chunks of about ``_CHUNK_CODES`` codes; empty when there is nothing to pack."""
    step = max(1, _CHUNK_CODES // max(cols, 1))
    return range(0, rows if cols else 0, step)


def _pack_block(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n_blocks, 32) int64 codes -> (rows, n_blocks, bits) int64 unsigned words."""
    word, shift, spill = _bit_layout(bits)
    out = torch.zeros(*codes.shape[:-1], bits, dtype=torch.int64)
    # Bit fields never overlap, so adding the pieces is the same as OR-ing them.
    out.index_add_(-1, word, (codes << shift) & (_WORD - 1))
    if spill.any():
        high = codes[..., spill] >> (32 - shift[spill])
        out.index_add_(-1, word[spill] + 1, high)
    return out


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes into int32 words along the last axis (see the module docstring).

    :param codes: (rows, cols) integer codes in ``[0, 2**bits)``, usually uint8.
    :param bits: bits per code, 2..8.
    :return: (rows, ceil(cols·bits/32)) int32.
    """
    _check(codes, bits)
    rows, cols = codes.shape
    n_blocks = math.ceil(cols / _STREAM)
    words = math.ceil(cols * bits / 32)
    out = torch.zeros(rows, words, dtype=torch.int32, device=codes.device)
    chunks = _row_chunks(rows, cols)
    for r in chunks:
        chunk = codes[r:r + chunks.step].to(torch.int64)
        chunk = torch.nn.functional.pad(chunk, (0, n_blocks * _STREAM - cols))
        packed = _pack_block(chunk.reshape(-1, n_blocks, _STREAM), bits)
        out[r:r + chunk.shape[0]] = _to_int32(packed.reshape(chunk.shape[0], -1)[:, :words])
    return out


def _unpack_block(words: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n_blocks, bits) int64 unsigned words -> (rows, n_blocks, 32) int64 codes."""
    word, shift, spill = _bit_layout(bits)
    mask = (1 << bits) - 1
    codes = words[..., word] >> shift
    # A spilling code takes its high bits from the low bits of the next word.
    nxt = words[..., (word + 1).clamp(max=bits - 1)] << (32 - shift)
    return (codes | torch.where(spill, nxt, torch.zeros_like(nxt))) & mask


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_codes`.

    :param packed: (rows, ceil(cols·bits/32)) int32.
    :param bits: bits per code, 2..8.
    :param cols: number of codes per row before packing (drops the padding).
    :return: (rows, cols) uint8.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing takes 2..8 bits")
    rows, words = packed.shape
    if words != math.ceil(cols * bits / 32):
        raise ValueError(f"{words} words per row cannot hold {cols} codes of {bits} bits")
    n_blocks = math.ceil(cols / _STREAM)
    out = torch.zeros(rows, cols, dtype=torch.uint8, device=packed.device)
    chunks = _row_chunks(rows, cols)
    for r in chunks:
        chunk = packed[r:r + chunks.step].to(torch.int64) & (_WORD - 1)
        chunk = torch.nn.functional.pad(chunk, (0, n_blocks * bits - words))
        codes = _unpack_block(chunk.reshape(-1, n_blocks, bits), bits)
        out[r:r + chunk.shape[0]] = codes.reshape(chunk.shape[0], -1)[:, :cols].to(torch.uint8)
    return out


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, column ``2j`` in the low nibble and ``2j + 1`` in the high one.

    :param codes: (rows, cols) codes in ``[0, 16)``; an odd last column is padded with a zero nibble.
    :return: (rows, ceil(cols/2)) uint8.
    """
    _check(codes, 4)
    c = codes.to(torch.uint8)
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_nibbles`.

    :param packed: (rows, ceil(cols/2)) uint8.
    :param cols: number of codes per row before packing.
    :return: (rows, cols) uint8.
    """
    if packed.shape[-1] != math.ceil(cols / 2):
        raise ValueError(f"{packed.shape[-1]} bytes per row cannot hold {cols} nibbles")
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=-1)
    return pairs.reshape(packed.shape[0], 2 * packed.shape[-1])[:, :cols]
