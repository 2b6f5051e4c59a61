#!/usr/bin/env python
"""Export the demo model in every format a preset fits, reload each export and report sizes and checks.

For each (preset, format, dtype) of :data:`CASES` the demo model is quantized once (run folders in
``--out/runs``, reused when finished) and exported with :func:`orthoquant.export.export_run`, which
reloads the checkpoint (``orthoquant.load_quantized``, and stock transformers where the format is
stock-loadable) and compares logits with the run before it reports. A format that cannot hold a
preset must refuse with a clear error; those refusals are recorded, and a case expected to refuse that
does not (or one expected to export that refuses) is a failure.

    python scripts/make_demo_model.py    # once
    python scripts/bench_export.py [--out runs/bench_export]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from _bench import markdown_table  # first: orthoquant on the path
from orthoquant.demo import MARKER, cache_dir
from orthoquant.errors import UserError
from orthoquant.evaluate.preset_table import quantize_case
from orthoquant.export import export_run
from orthoquant.progress import setup_logging, setup_threads

log = logging.getLogger("bench_export")
CT, GPTQ, NATIVE = "compressed-tensors", "gptq", "native"
# (preset, format, dtype, expected to export). Scales are rounded to their storage dtype when quantizing,
# never at export: GPTQ checkpoints store float16 scales and a bf16 export bf16 ones, so those cases
# quantize with weights.scale_dtype set (:func:`scale_dtype`); a run with float32 scales is refused.
CASES = [
    ("gptq-w4a16", CT, "float32", True), ("gptq-w4a16", GPTQ, "float32", True),
    ("gptq-w4a16", NATIVE, "float32", True),
    ("gptq-w4a16-g128", CT, "float32", True), ("gptq-w4a16-g128", GPTQ, "float32", True),
    ("quarot-w4a16", CT, "float32", True), ("quarot-w4a16", CT, "bfloat16", True),
    ("quarot-w4a16", GPTQ, "float32", True), ("quarot-w4a16", NATIVE, "float32", True),
    ("rtn-w8a8", CT, "float32", True), ("rtn-w8a8-fp8-kv8", CT, "float32", True),
    ("rtn-w8a8-fp8-kv8", NATIVE, "float32", True),
    ("gptq-mxfp4", CT, "float32", True), ("gptq-nvfp4", CT, "float32", True),
    ("gptq-nvfp4", NATIVE, "float32", True),
    ("quarot-w4a4kv4", NATIVE, "float32", True), ("quarot-w4a4kv4", CT, "float32", False),
    ("quarot-w4a4kv4", GPTQ, "float32", False),
    ("wush-mxfp4", NATIVE, "float32", True), ("wush-mxfp4", CT, "float32", False),
]


def scale_dtype(fmt: str, dtype: str) -> str | None:
    """The weights.scale_dtype a case's run needs (None: the preset's own)."""
    return "float16" if fmt == GPTQ else ("bfloat16" if dtype == "bfloat16" else None)


def run_for(preset: str, scales: str | None, runs: Path, model: Path, corpus: Path, nsamples: int,
            seqlen: int) -> Path:
    """The finished run folder of ``preset`` on the demo model (quantized now if not there yet)."""
    sets = [f"weights.scale_dtype={scales}"] if scales else []
    name = preset + (f"-{scales}-scales" if scales else "")
    return quantize_case(str(model), preset, sets, str(corpus / "train.txt"), runs / name, nsamples=nsamples,
                         seqlen=seqlen)


def export_case(run: Path, fmt: str, dtype: str, out: Path) -> dict:
    """One export: its report, or the refusal's message."""
    shutil.rmtree(out, ignore_errors=True)
    try:
        report = export_run(run, out, fmt, getattr(torch, dtype))
    except UserError as e:
        return {"refused": str(e)}
    return {"sizes": report["sizes"], "checks": report["checks"]}


def check_cell(result) -> str:
    if not isinstance(result, dict):
        return str(result)
    return "bit-exact" if result["bit_exact"] else f"rel {result['max_rel_diff']:.1e}"


def markdown(rows: list[dict]) -> str:
    return markdown_table(["preset", "format", "dtype", "linears B/param", "checkpoint B/param", "reload checks"],
                          [[r["preset"], r["format"], r["dtype"], *result_cells(r)] for r in rows])


def result_cells(r: dict) -> list[str]:
    """The sizes and checks of one case, or its refusal."""
    if "refused" in r:
        status = "refused as expected" if not r["expected"] else "**refused (unexpected)**"
        return ["–", "–", f"{status}: {r['refused'][:90]}"]
    s = r["sizes"]
    checks = "; ".join(f"{k}: {check_cell(v)}" for k, v in r["checks"].items())
    return [f"{s['linear_bytes_per_param']:.4f}", f"{s['checkpoint_bytes_per_param']:.4f}", checks]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_export"))
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--presets", help="only these presets (comma-separated)")
    args = p.parse_args(argv)
    setup_logging()
    setup_threads()
    model, corpus = cache_dir() / "demo-llama", cache_dir() / "demo-corpus"
    if not (model / MARKER).is_file():
        sys.exit(f"no demo model in {model}: run scripts/make_demo_model.py first")
    wanted = set(args.presets.split(",")) if args.presets else None
    rows = []
    for preset, fmt, dtype, expected in CASES:
        if wanted is not None and preset not in wanted:
            continue
        run = run_for(preset, scale_dtype(fmt, dtype) if expected else None, args.out / "runs", model, corpus, args.nsamples,
                      args.seqlen)
        result = export_case(run, fmt, dtype, args.out / "exports" / f"{preset}.{fmt}.{dtype}")
        rows.append({"preset": preset, "format": fmt, "dtype": dtype, "expected": expected, **result})
        log.info("%s %s %s: %s", preset, fmt, dtype, result.get("refused") or result["sizes"])
    text = markdown(rows)
    (args.out / "bench_export.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "bench_export.md").write_text(text + "\n")
    print(text)
    unexpected = [r for r in rows if ("refused" in r) == r["expected"]]
    for r in unexpected:
        log.error("%s %s %s: %s", r["preset"], r["format"], r["dtype"],
                  r.get("refused", "exported, but this format should have refused"))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
