"""Verified reading of safetensors checkpoints: every header is checked when the model is opened,
every tensor read is counted, and the checkpoint is compared with the model skeleton up front.

The header checks are safetensors' own (``safe_open``: ``read_metadata`` and ``Metadata::validate``
of the Rust crate), done in Python so that each failure names the file and the tensor and so that
the tensors are read with plain file I/O later (pages of a memory-mapped shard count in the
process's resident set once touched): the header length fits the file, the header is a JSON object,
every tensor has a known dtype, a shape of non-negative integers and offsets whose span is exactly
shape × dtype size, the tensors tile the data section with no gap or overlap, and the data section
ends exactly at the end of the file (so a file cut by one byte is refused). ``tests/models/test_trust_loading.py``
checks that these verdicts agree with ``safe_open``'s.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_LENGTH_BYTES = 8
_MAX_HEADER = 100_000_000  # safetensors' MAX_HEADER_SIZE
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
                "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                "F8_E8M0": "float8_e8m0fnu"}
# safetensors dtype name -> torch dtype, for those this torch build has
DTYPES = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: ``begin``/``end`` are absolute byte offsets in ``file``."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _entry(path: Path, key: str, info, data_start: int) -> TensorEntry:
    where = f"{path}: tensor {key}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise UserError(f"{where}: the header entry needs dtype, shape and data_offsets")
    if info["dtype"] not in DTYPES:
        raise UserError(f"{where}: unknown dtype {info['dtype']!r} (known: {', '.join(DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_natural(n) for n in shape):
        raise UserError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(n) for n in offsets):
        raise UserError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")
    dtype = DTYPES[info["dtype"]]
    size = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != size:
        raise UserError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but shape "
                        f"{shape} of {info['dtype']} needs {size}")
    return TensorEntry(path, key, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _natural(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _header_json(path: Path, file_size: int) -> tuple[dict, int]:
    """The parsed header object and the offset where the data section starts."""
    if file_size < _LENGTH_BYTES:
        raise UserError(f"{path}: {file_size} bytes is too short for a safetensors file (truncated?)")
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(_LENGTH_BYTES), "little")
        if length > _MAX_HEADER or _LENGTH_BYTES + length > file_size:
            raise UserError(f"{path}: the header claims {length} bytes but the file has {file_size} "
                            "(truncated or not a safetensors file)")
        raw = f.read(length)
    try:
        text = raw.decode("utf-8")
        header = json.loads(text) if text.startswith("{") else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise UserError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    return header, _LENGTH_BYTES + length


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, after safetensors' checks; see the module docstring.

    Reads only the header (8 + its length bytes), whatever the file's size.
    """
    file_size = path.stat().st_size
    header, data_start = _header_json(path, file_size)
    entries = sorted((_entry(path, key, info, data_start) for key, info in header.items()),
                     key=lambda e: (e.begin, e.end))
    position, previous = data_start, "the header"
    for e in entries:  # safetensors' validate: the tensors tile the data section in offset order
        if e.end > file_size:
            raise UserError(f"{path}: tensor {e.key}: data_offsets end at byte {e.end}, past the end of the "
                            f"file ({file_size} bytes; truncated?)")
        if e.begin != position:
            problem = "overlap" if e.begin < position else "leave a gap after"
            raise UserError(f"{path}: tensor {e.key}: data_offsets start at {e.begin - data_start}, which would "
                            f"{problem} {previous} (it ends at {position - data_start})")
        position, previous = e.end, f"tensor {e.key}"
    if position != file_size:  # no tensor ends past the file (checked above): bytes no tensor owns
        raise UserError(f"{path}: the header says the data ends at byte {position} but the file has "
                        f"{file_size} bytes (trailing bytes: not the file its header describes)")
    return {e.key: e for e in entries}


def read_entry(entry: TensorEntry) -> torch.Tensor:
    """One tensor read with plain file I/O; a short read (the file shrank since it was opened) is an error."""
    buf = bytearray(entry.end - entry.begin)
    view, got = memoryview(buf), 0
    with open(entry.file, "rb") as f:
        f.seek(entry.begin)
        while got < len(buf) and (n := f.readinto(view[got:])):  # a read may return less than asked
            got += n
    if got != len(buf):
        raise UserError(f"{entry.file}: tensor {entry.key}: read {got} of {len(buf)} bytes "
                        "(the file was truncated or changed while reading)")
    if not buf:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(buf, dtype=entry.dtype).reshape(entry.shape)


def _shard_path(folder: Path, index: Path, name) -> Path:
    # a shard is a file of the folder: no path that climbs out of it or elsewhere
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise UserError(f"{index}: shard name {name!r} is not a file name inside {folder}")
    path = folder / name
    if not path.is_file():
        raise UserError(f"{index} names shard {name}, which does not exist in {folder}")
    return path


def _index_map(folder: Path) -> dict[str, Path]:
    index = folder / INDEX
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{index}: not a valid index ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: no weight_map of tensor names to shard files")
    return {key: _shard_path(folder, index, name) for key, name in weight_map.items()}


def open_checkpoint(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of a folder's checkpoint (``model.safetensors`` or an index and its shards), each
    shard's header verified and each indexed tensor found in its shard."""
    if (folder / INDEX).is_file():
        files = _index_map(folder)
        headers = {path: read_header(path) for path in sorted(set(files.values()))}
        missing = [(key, path) for key, path in files.items() if key not in headers[path]]
        if missing:
            key, path = missing[0]
            raise UserError(f"{folder / INDEX} places tensor {key} in {path.name}, which does not hold it"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return {key: headers[path][key] for key, path in files.items()}
    if (folder / SINGLE).is_file():
        return read_header(folder / SINGLE)
    raise UserError(f"{folder} holds no safetensors weights (model.safetensors or an index)")


def _unexpected(entries: dict[str, TensorEntry], skeleton: nn.Module) -> list[str]:
    """Stored tensors the skeleton has no place for, less those transformers ignores when loading
    (old checkpoints' per-layer ``rotary_emb.inv_freq``, the class's own patterns)."""
    known = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)} | {n for n, _ in skeleton.named_buffers()}
    ignored = [re.compile(p) for p in [r"rotary_emb\.inv_freq", *(skeleton._keys_to_ignore_on_load_unexpected or ())]]
    return sorted(k for k in entries if k not in known and not any(p.search(k) for p in ignored))


def check_skeleton(entries: dict[str, TensorEntry], skeleton: nn.Module, aliases: dict[str, str],
                   config_file: Path) -> None:
    """Every parameter of ``skeleton`` (built from ``config_file``) has a stored tensor of its shape
    and kind (floating point or not), and every stored tensor has a place in it (a config with fewer
    layers than the weights is a mismatch, not a smaller model); the cast to the run's dtype is the
    loader's."""
    if unexpected := _unexpected(entries, skeleton):
        e = entries[unexpected[0]]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UserError(f"{e.file}: tensor {e.key}{more} has no place in the model {config_file} describes; "
                        "the config and the weights do not match")
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        key = name if name in entries else aliases.get(name, name)
        if key not in entries:
            raise UserError(f"tensor {name} is missing from the checkpoint in {config_file.parent}")
        e = entries[key]
        if e.shape != tuple(param.shape):
            raise UserError(f"{e.file}: tensor {key} has shape {list(e.shape)}, but {config_file} implies "
                            f"{list(param.shape)}; the config and the weights do not match")
        if e.dtype.is_floating_point != param.dtype.is_floating_point:
            raise UserError(f"{e.file}: tensor {key} is stored as {e.dtype}, but the model's {name} is "
                            f"{param.dtype}")
