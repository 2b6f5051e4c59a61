"""``orthoquant export RUN --format compressed-tensors|gptq|native --out DIR``: write, reload, compare,
and print the size in bytes per parameter. Kept import-light: the CLI loads it for every command."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from ..cli import Command

_DTYPES = ("float32", "bfloat16", "float16")


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a finished run folder (orthoquant quantize --out)")
    p.add_argument("--format", required=True, help="compressed-tensors, gptq or native")
    p.add_argument("--out", required=True, type=Path, help="an empty or new folder")
    p.add_argument("--dtype", choices=_DTYPES, help="dtype of full-precision tensors (default: the run's)")
    p.add_argument("--calib", help="text for static activation scales a format needs (NVFP4 in "
                                   "compressed-tensors); default: the recipe's calibration source")
    p.add_argument("--batches", type=int, default=2, help="token batches the reload is compared on")
    p.add_argument("--verify", choices=("full", "stock", "weights", "none"), default="full",
                   help="compare with the run layer by layer (one layer of each resident): full = weights, layer "
                        "outputs and logits; stock = full, then reload in the stock runtimes (transformers, "
                        "gptqmodel: whole models in memory); weights = weights only; none = skip (recorded in "
                        "the manifest; loaders warn)")
    p.add_argument("--force", action="store_true",
                   help="export although a fused group (q/k/v, gate/up) is split across schemes (warns instead)")
    p.add_argument("--device", default="cpu", help="where the verification computes (cpu, cuda, cuda:N)")
    p.add_argument("--max-shard-size", type=parse_size, metavar="SIZE",
                   help="size cap of a safetensors shard for compressed-tensors and gptq, e.g. 5GB or 500MB "
                        "(default 5GB); one decoder layer is never split")
    p.add_argument("--json", type=Path, help="also write the report here")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .api import export_run

    dtype = getattr(torch, args.dtype) if args.dtype else None
    report = export_run(args.run, args.out, args.format, dtype, args.calib, args.batches, args.max_shard_size,
                        verify=args.verify, device=args.device, force=args.force)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return report


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``1.5GiB`` or ``1000000`` (GB = 10^9, as Hugging Face)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def format_report(report: dict[str, Any]) -> str:
    """The human summary: sizes, then one line per reload check."""
    s = report["sizes"]
    lines = [f"exported {report['format']} ({report['dtype']}) into {report['out']}",
             f"quantized linears: {s['linear_bytes_per_param']:.4f} bytes/parameter ({s['linear_params']:,} weights)",
             f"whole checkpoint:  {s['checkpoint_bytes_per_param']:.4f} bytes/parameter "
             f"({s['params']:,} parameters, {s['checkpoint_bytes']:,} bytes)",
             "reload checks:"]
    for name, result in report["checks"].items():
        if isinstance(result, dict):
            diff = f"max relative logit difference {result['max_rel_diff']:.3g}"
            exact = "bit-exact" if result["bit_exact"] else diff
            note = f" ({result['note']})" if result.get("note") else ""
            label = result.get("label", name)  # what was loaded, and what orthoquant re-applied to it
            lines.append(f"  {label:20s} {exact}{note}")
        else:
            lines.append(f"  {name:20s} {result}")
    return "\n".join(lines)


COMMAND = Command("write a finished run as a checkpoint, reload it and compare", _add_args, _run)
