"""Integrity and equivalence of exports.

- The manifest ``orthoquant_config.json`` lists the sha256 and size of every file of an export;
  :func:`check_manifest` recomputes them before anything is loaded, so a corrupt, truncated, swapped
  or stray weight file is an error naming the file, never a wrong model.
- :func:`compare_logits` runs a reference and a reloaded model on the same token batches.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "orthoquant_config.json"
# Files a loader could read: one that is not in the manifest is refused rather than ignored.
_LOADABLE = (".safetensors", ".json", ".bin", ".pt", ".pth", ".yaml", ".model", ".txt", ".jinja")
_CHUNK = 1 << 20


class CorruptExportError(UserError):
    """A file of an export does not match its manifest (hash, size, missing or unexpected)."""


class ExportCheckError(UserError):
    """A reloaded export does not reproduce the run it was written from."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _export_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write ``MANIFEST`` with ``fields`` plus the sha256 and size of every other file in ``folder``."""
    files = {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in _export_files(folder)}
    manifest = {**fields, "files": files}
    update_manifest(folder, manifest)
    return manifest


def update_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Rewrite the manifest (it is not hashed itself, so check results can be added after writing)."""
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not an orthoquant export (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptExportError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptExportError(f"{path} is corrupt: it lists no files")
    return manifest


def check_manifest(folder: Path | str) -> dict[str, Any]:
    """Verify every file of an export against its manifest; returns the manifest.

    :raises CorruptExportError: naming the first file that is missing, truncated, altered or unexpected.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            raise CorruptExportError(f"{path} is missing from the export (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CorruptExportError(f"{path} is {size} bytes, the manifest says {entry['bytes']} "
                                     "(truncated or altered)")
        if sha256_file(path) != entry["sha256"]:
            raise CorruptExportError(f"{path} does not match its sha256 in {MANIFEST} (corrupt or altered)")
    for path in _export_files(folder):
        name = path.relative_to(folder).as_posix()
        if name not in manifest["files"] and path.suffix in _LOADABLE:
            raise CorruptExportError(f"{path} is not part of the export (not listed in {MANIFEST})")
    return manifest


def check_batches(config, n_batches: int = 2, batch: int = 2, seqlen: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic random token batches (n_batches of (batch, seqlen)) within the model's limits."""
    limit = getattr(config, "max_position_embeddings", None) or seqlen
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (batch, min(seqlen, limit)), generator=g) for _ in range(n_batches)]


@torch.no_grad()
def compare_logits(reference: nn.Module, candidate: nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Largest absolute logit difference relative to the largest reference logit, over ``batches``.

    :returns: {"max_rel_diff": float, "bit_exact": bool, "batches": [shape, ...]}.
    """
    worst, exact, scale = 0.0, True, 0.0
    for tokens in batches:
        a = reference(tokens).logits.float()
        b = candidate(tokens.to(next(candidate.parameters()).device)).logits.float().to(a.device)
        exact = exact and torch.equal(a, b)
        worst = max(worst, float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
    return {"max_rel_diff": worst / max(scale, 1e-30), "bit_exact": exact,
            "batches": [list(t.shape) for t in batches]}


@torch.no_grad()
def compare_weights(reference: nn.Module, candidate: nn.Module, names: list[str]) -> dict[str, Any]:
    """Largest relative difference of the named modules' weights (max |a - b| / max |a| per module)."""
    worst, exact = 0.0, True
    for name in names:
        a = reference.get_submodule(name).weight.float()
        b = candidate.get_submodule(name).weight.float().to(a.device)
        exact = exact and torch.equal(a, b)
        worst = max(worst, float((a - b).abs().max()) / max(float(a.abs().max()), 1e-30))
    return {"max_rel_diff": worst, "bit_exact": exact, "modules": len(names)}


def relative_tolerance(dtype: torch.dtype) -> float:
    """Allowed relative logit difference for a reload that is not bit-exact by construction.

    float32: 1e-5; 16-bit: a small multiple of the format's own rounding (one ulp = ``eps``).
    """
    return 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
