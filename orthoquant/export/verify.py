"""Integrity and equivalence of exports.

- The manifest ``orthoquant_config.json`` lists the sha256 and size of every file of an export;
  :func:`check_manifest` recomputes them before anything is loaded, so a corrupt, truncated, swapped
  or stray weight file is an error naming the file, never a wrong model. Names are confined to the
  export folder and symbolic links are refused. The manifest gets its final name only after the
  export was verified; until then it is ``orthoquant_config.unverified.json``, which loaders refuse.
- :func:`compare_logits` runs a reference and a reloaded model on the same token batches;
  :func:`quiet_transformers` silences stock runtimes' load reports while the format's checks reload an export.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..integrity import atomic_write, record_problem, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "orthoquant_config.json"
# The manifest while the export is verified: loaders refuse a folder that has only this one, so an
# export killed during verification never looks verified.
PROVISIONAL_MANIFEST = "orthoquant_config.unverified.json"
FAILED_MANIFEST = "orthoquant_config.failed.json"
MANIFESTS = (MANIFEST, PROVISIONAL_MANIFEST, FAILED_MANIFEST)
# Files a loader could read: one that is not in the manifest is refused rather than ignored.
_LOADABLE = (".safetensors", ".json", ".bin", ".pt", ".pth", ".yaml", ".model", ".txt", ".jinja")


class CorruptExportError(UserError):
    """A file of an export does not match its manifest (hash, size, missing or unexpected)."""


class UnverifiedExportError(UserError):
    """An export whose verification failed or never finished."""


class ExportCheckError(UserError):
    """A reloaded export does not reproduce the run it was written from."""


def _entries(folder: Path) -> list[Path]:
    """Everything below ``folder`` except the manifests, symbolic links included (never followed)."""
    found = []
    for root, dirs, names in os.walk(folder):
        found += [Path(root, n) for n in names + [d for d in dirs if Path(root, d).is_symlink()]]
        dirs[:] = [d for d in dirs if not Path(root, d).is_symlink()]
    return sorted(p for p in found if p.relative_to(folder).as_posix() not in MANIFESTS)


def write_manifest(folder: Path, fields: dict[str, Any], name: str = MANIFEST) -> dict[str, Any]:
    """Write manifest ``name`` with ``fields`` plus the sha256 and size of every other file in ``folder``."""
    files = {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in _entries(folder)}
    manifest = {**fields, "files": files}
    update_manifest(folder, manifest, name)
    return manifest


def update_manifest(folder: Path, manifest: dict[str, Any], name: str = MANIFEST) -> None:
    """Rewrite a manifest (it is not hashed itself, so check results can be added after writing)."""
    atomic_write(folder / name, lambda p: p.write_text(json.dumps(manifest, indent=2, sort_keys=True)))


def read_manifest(folder: Path, name: str = MANIFEST) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / name
    if name == MANIFEST and not path.is_file():
        unverified = [m for m in (PROVISIONAL_MANIFEST, FAILED_MANIFEST) if (folder / m).is_file()]
        if unverified:
            raise UnverifiedExportError(
                f"{folder} is an unverified export ({unverified[0]}: its verification failed or did not finish); "
                "it is not loaded: export the run again")
        raise UserError(f"{folder} is not an orthoquant export (no {MANIFEST})")
    if path.is_symlink() or not path.is_file():
        raise CorruptExportError(f"{path} is not a regular file")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptExportError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptExportError(f"{path} is corrupt: it lists no files")
    return manifest


def confined(folder: Path, name: str) -> Path:
    """The path of manifest entry ``name``, which must be a plain relative name inside ``folder``."""
    parts = PurePosixPath(name).parts
    if not isinstance(name, str) or not parts or PurePosixPath(name).is_absolute() or "\\" in name \
            or any(p in ("..", ".") for p in parts):
        raise CorruptExportError(f"{folder / MANIFEST} lists {name!r}, which is not a file inside the export")
    path = folder
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise CorruptExportError(f"{path} is a symbolic link; an export holds regular files only")
    return path


def check_manifest(folder: Path | str, name: str = MANIFEST) -> dict[str, Any]:
    """Verify every file of an export against its manifest; returns the manifest.

    :param name: the manifest to check against (the provisional one while the export is verified).
    :raises CorruptExportError: naming the first file that is missing, truncated, altered, unexpected,
        a symbolic link or outside the folder.
    :raises UnverifiedExportError: the export's verification failed or never finished.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, name)
    for entry_name, entry in sorted(manifest["files"].items()):
        path = confined(folder, entry_name)
        problem = record_problem(path, entry)
        if problem is not None:
            raise CorruptExportError(f"{path} {problem} (checked against {name})")
    for path in _entries(folder):
        if path.is_symlink():
            raise CorruptExportError(f"{path} is a symbolic link; an export holds regular files only")
        rel = path.relative_to(folder).as_posix()
        if rel not in manifest["files"] and path.suffix in _LOADABLE:
            raise CorruptExportError(f"{path} is not part of the export (not listed in {name})")
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


@contextmanager
def quiet_transformers():
    """Silence transformers' load reports (unexpected CT keys such as input_global_scale) and warnings."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def relative_tolerance(dtype: torch.dtype) -> float:
    """Allowed relative logit difference for a reload that is not bit-exact by construction.

    float32: 1e-5; 16-bit: a small multiple of the format's own rounding (one ulp = ``eps``).
    """
    return 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
