"""Which exports a finished run serves exactly: recorded in run.json when quantizing finishes, and named
by ``orthoquant export`` when it refuses a format or dtype (before anything is written).

    "exports": {"native": {"dtypes": ["float32", "bfloat16", "float16"], "refused": {}},
                "compressed-tensors": {"dtypes": ["float32", "bfloat16"], "refused": {"float16": "<why>"}},
                "gptq": {"dtypes": [], "refused": {"float32": "<why>", ...}}}

``dtypes`` are the ``--dtype`` values the format accepts for this run. Every entry is the verdict of the
format's own check, the one ``export`` runs before writing, so the record and the export agree; the
record only adds that a user learns it right after quantizing, without trying.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..device import DTYPES
from ..errors import UserError
from ..runfolder import RunFolder, write_json
from .base import EXPORT_FORMATS, ExportFormat
from .contents import RunContents

EXPORT_DTYPES = ("float32", "bfloat16", "float16")  # float32 first: the widest, so its refusal is structural


def check_format(fmt: ExportFormat, contents: RunContents, dtype: torch.dtype) -> None:
    """Whether ``fmt`` can write this run in ``dtype``: the model's layout, then the format's own check."""
    arch = contents.arch
    if (arch.transposed and fmt.name != "native") or (not arch.stock_layout and fmt.name == "gptq"):
        raise UserError(f"{contents.config.architectures[0]} stores its linears as transposed Conv1D, fused (qkv_proj) "
                        f"or with (1 + γ) norms, which the {fmt.name} writer does not lay out; export it with "
                        "--format native" + ("" if arch.transposed else " or compressed-tensors"))
    fmt.check(contents, dtype)


def _refusal(fmt: ExportFormat, contents: RunContents, dtype: torch.dtype) -> str | None:
    try:
        check_format(fmt, contents, dtype)
    except UserError as e:
        return str(e)
    return None


def served(fmt: ExportFormat, contents: RunContents) -> dict[str, Any]:
    """{"dtypes": export dtypes ``fmt`` accepts for the run, "refused": {dtype: reason}}."""
    widest = _refusal(fmt, contents, torch.float32)
    reasons = {}
    for name in EXPORT_DTYPES:
        checked_alone = widest is None and fmt.dtype_checked and name != "float32"
        reasons[name] = _refusal(fmt, contents, DTYPES[name]) if checked_alone else widest
    return {"dtypes": [n for n, r in reasons.items() if r is None],
            "refused": {n: r for n, r in reasons.items() if r is not None}}


def exportability(contents: RunContents) -> dict[str, dict[str, Any]]:
    """Format name -> :func:`served`, for every registered export format."""
    return {name: served(EXPORT_FORMATS.get(name), contents) for name in EXPORT_FORMATS.names()}


def record_exports(run_dir: Path | str) -> dict[str, dict[str, Any]]:
    """Compute :func:`exportability` of a finished run and store it as run.json's ``exports``."""
    contents = RunContents(run_dir)
    record = exportability(contents)
    run = RunFolder(run_dir)
    write_json(run.info_path, {**run.info(), "exports": record})
    return record


def recorded_summary(contents: RunContents) -> str | None:
    """One line naming what the run serves, from its record (None: a run quantized before the record)."""
    record = contents.run.info().get("exports")
    if not isinstance(record, dict):
        return None
    parts = [f"{name} ({', '.join(entry['dtypes'])})" for name, entry in record.items()
             if isinstance(entry, dict) and entry.get("dtypes")]
    return f"this run serves {'; '.join(parts) or 'no export'} exactly"
