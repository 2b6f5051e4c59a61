"""Safetensors checkpoints in shards, as Hugging Face lays them out: written while the export streams the run
(:class:`ShardWriter`), read back with verified headers (:func:`read_tensors`).

The stock formats (compressed-tensors, GPTQ) write one run file (a decoder layer, or the model-level rest) at a
time, so an export holds about one shard, never the model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..models.checkpoint import open_checkpoint, read_entry

# Shards of stock checkpoints are written whole, so this bounds the memory an export holds.
DEFAULT_SHARD_BYTES = 5 * 10**9
INDEX = "model.safetensors.index.json"


class ShardWriter:
    """Writes a checkpoint's tensors into safetensors shards as they are produced, one group (a run
    file: a decoder layer, or the model-level rest) at a time, so that an export holds about one
    shard. Files are named as Hugging Face names them: ``model.safetensors`` when one shard holds
    everything, else ``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``.

    :param max_bytes: a shard is written when the next group would take it past this size; a group
        is never split, so a group larger than ``max_bytes`` gets a shard of its own.
    """

    def __init__(self, out: Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        if max_bytes <= 0:
            raise UserError(f"the maximum shard size must be positive, got {max_bytes} bytes")
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str], int]] = []  # temporary file, its keys, its tensor bytes
        self.keys: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue one group of tensors (full names); writes the pending shard first if the group would
        overflow it."""
        repeated = self.keys & tensors.keys()
        if repeated:
            raise ValueError(f"tensors written twice: {sorted(repeated)[:3]}")
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.keys |= tensors.keys()
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        """Write the pending tensors as one shard (under a temporary name until :meth:`finish`)."""
        if not self.pending:
            return
        path = self.out / f"shard-{len(self.written):05d}.safetensors.partial"
        save_file({k: v.contiguous() for k, v in self.pending.items()}, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is pending, name the shards and write the index; returns the shard file names."""
        self.flush()
        if len(self.written) == 1:
            self.written[0][0].replace(self.out / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, (path, keys, _) in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            path.replace(self.out / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": sum(size for *_, size in self.written)}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        return names


def read_tensors(folder: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint (``keep``: only the names it accepts, the
    others are never read), its headers verified and its shard names confined to ``folder``
    (:func:`~orthoquant.models.checkpoint.open_checkpoint`)."""
    return {key: read_entry(entry) for key, entry in open_checkpoint(folder).items() if keep is None or keep(key)}


def cast_floats(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to ``dtype``; integer ones (codes, indices) untouched."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
