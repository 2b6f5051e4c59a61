"""What makes two quantization runs the same run: the fingerprint a run folder records, and a diff of
two fingerprints that says in words what changed.

A resume is only correct when everything that shaped the stored layers is unchanged, so the
fingerprint covers the model's content (config.json, and every safetensors shard's size, header and
evenly spaced samples of its data: a rewritten checkpoint shows without hashing gigabytes),
the calibration text (sha256 of a local file or folder, or a hub dataset's id, config and split), the
calibration token windows themselves (a changed tokenizer), the dtype, the device kind, the
orthoquant version and the recipe.

Fingerprints of older run folders (``{"model": path, "recipe": ...}``) have no ``format`` key; they
are compared as they were written (:func:`legacy_fingerprint`).
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from .data.sources import SOURCES
from .integrity import sha256_file
from .version import __version__

FORMAT = 2
# safetensors refuses headers above 100 MB: reading more would hash tensor data, not a header.
_MAX_HEADER = 100 * 2**20
_SAMPLES, _SAMPLE_BYTES = 32, 64 * 2**10


def shard_sha256(path: Path, samples: int = _SAMPLES, chunk: int = _SAMPLE_BYTES) -> str:
    """sha256 of a safetensors file's length prefix, JSON header (names, dtypes, shapes, offsets) and
    ``samples`` evenly spaced ``chunk``-byte pieces of its data: about 2 MiB read per shard, however
    large, yet a rewrite with other values (fine-tuned, re-initialised) of the same shapes shows."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        digest.update(prefix + f.read(min(length, _MAX_HEADER)))
        start = f.tell()
        span = max(size - start - chunk, 0)
        for k in range(samples):
            f.seek(start + span * k // max(samples - 1, 1))
            digest.update(f.read(chunk))
    return digest.hexdigest()


def model_fingerprint(folder: Path, model_id: str) -> dict[str, Any]:
    """config.json's sha256 and, per safetensors shard, the sha256 of its header and sampled data
    (:func:`shard_sha256`) and its size.

    :param model_id: what the user named; kept only for hub ids (a local folder may move).
    """
    folder = Path(folder)
    shards = {p.name: {"sampled_sha256": shard_sha256(p), "bytes": p.stat().st_size}
              for p in sorted(folder.glob("*.safetensors"))}
    hub_id = None if Path(model_id).exists() else model_id
    return {"hub_id": hub_id, "config_sha256": sha256_file(folder / "config.json"), "weights": shards}


def _folder_sha256(folder: Path) -> str:
    """One digest over every file of a folder (a datasets ``save_to_disk`` folder): names and contents."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def calibration_fingerprint(source: str | None, windows: torch.Tensor) -> dict[str, Any]:
    """The calibration text's identity and the sha256 of the token windows cut from it."""
    record: dict[str, Any] = {"tokens_sha256": tensor_sha256(windows)}
    if source is None:  # in-memory windows: the tokens are all there is
        return record
    if source in SOURCES:  # a registered name wins over a file of the same name (see data.sources)
        spec = SOURCES.get(source)
        return {**record, "hub": {"id": spec.path, "config": spec.name, "split": spec.splits["calib"],
                                  "data_files": spec.data_files}}
    path = Path(source)
    text_sha256 = _folder_sha256(path) if path.is_dir() else sha256_file(path)
    return {**record, "file": path.name, "text_sha256": text_sha256}


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    header = f"{t.dtype}{tuple(t.shape)}".encode()
    return hashlib.sha256(header + t.view(torch.uint8).numpy().tobytes()).hexdigest()


def run_fingerprint(model: dict[str, Any], calibration: dict[str, Any], dtype: torch.dtype,
                    device: torch.device, recipe: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "model": model, "calibration": calibration,
            "dtype": str(dtype).removeprefix("torch."), "device": torch.device(device).type,
            "orthoquant": __version__, "recipe": recipe}


def legacy_fingerprint(model_id: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """What orthoquant before fingerprint format 2 recorded for a pretrained model."""
    return {"model": model_id if not Path(model_id).exists() else str(Path(model_id).resolve()),
            "recipe": recipe}


# --- saying what changed ------------------------------------------------------------------------
def _model_changes(old: dict, new: dict) -> list[str]:
    changes = []
    if old.get("hub_id") != new.get("hub_id"):
        changes.append(f"model {old.get('hub_id') or 'local folder'} → {new.get('hub_id') or 'local folder'}")
    if old.get("config_sha256") != new.get("config_sha256"):
        changes.append("the model's config.json differs")
    before, after = old.get("weights", {}), new.get("weights", {})
    changed = sorted(name for name in before.keys() & after.keys() if before[name] != after[name])
    if changed:
        changes.append(f"the model's weights differ ({', '.join(changed)} header/size/sampled bytes)")
    added, removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
    if added or removed:
        changes.append(f"the model's weight files differ (added {added or 'none'}, removed {removed or 'none'})")
    return changes


def _calibration_changes(old: dict, new: dict) -> list[str]:
    text_keys = ("hub", "file", "text_sha256")
    if any(old.get(k) != new.get(k) for k in text_keys):
        name = new.get("file") or (new.get("hub") or {}).get("id") or "in-memory windows"
        return [f"the calibration text differs ({name})"]
    if old.get("tokens_sha256") != new.get("tokens_sha256"):
        return ["the calibration tokens differ (same text: the tokenizer or the sampling changed)"]
    return []


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _recipe_changes(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = ", ".join(f"{k} {a.get(k)!r} → {b.get(k)!r}" for k in keys[:4])
    return [f"the recipe differs ({shown}{', ...' if len(keys) > 4 else ''})"] if keys else []


def _value_change(label: str) -> Callable[[Any, Any], list[str]]:
    return lambda old, new: [] if old == new else [f"{label} {old} → {new}"]


# fingerprint key -> what changed between two values of it (in the order changes are reported)
DESCRIBE: dict[str, Callable[[Any, Any], list[str]]] = {
    "model": lambda old, new: _model_changes(old or {}, new or {}),
    "calibration": lambda old, new: _calibration_changes(old or {}, new or {}),
    "dtype": _value_change("dtype"),
    "device": _value_change("device"),
    "orthoquant": _value_change("orthoquant version"),
    "recipe": lambda old, new: _recipe_changes(old or {}, new or {}),
}


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words; empty when they are the same."""
    if old == new:
        return []
    changes = [c for key, describe in DESCRIBE.items() for c in describe(old.get(key), new.get(key))]
    return changes or ["its fingerprint differs (written by another orthoquant version?)"]
