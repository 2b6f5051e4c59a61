#!/usr/bin/env python
"""The offline demo: build (once) a small Llama trained on the standard library's sources, quantize it
with one recipe per method family at the settings that separate them, print held-out perplexities
(FP vs each) as a markdown table, row by row as they finish, then write `orthoquant report` with charts.

    python scripts/demo.py [--presets a,b,...] [--nsamples 32] [--seqlen 256] [--out runs/demo]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from orthoquant.recipes import preset_names
from orthoquant.demo import build_demo_model, cache_dir
from orthoquant.errors import UserError
from orthoquant.evaluate.preset_table import (parse_case, preset_perplexities, run_folder_name, table_header,
                                              table_row, write_preset_table)
from orthoquant.evaluate.report import build_report
from orthoquant.progress import setup_logging, setup_threads

log = logging.getLogger("demo")
# One row per method family, at the setting that separates it from its baseline: W4A4KV4 (INT4
# weights, activations and KV cache) for RTN / GPTQ / the rotation methods, MXFP4 for WUSH (against
# GPTQ there), 2 bits for QuIP# (against GPTQ INT2 with groups of 32, 2.5 bits per weight).
SHORT_FIT = ["fitting.steps=24", "fitting.grad_accum=1", "fitting.qsur_samples=0", "fitting.checkpoint_every=0"]
DEFAULT_CASES = [
    ("RTN W4A4KV4", "rtn-w4a4kv4", []),
    ("GPTQ W4A4KV4", "rtn-w4a4kv4", ["solver.name=gptq"]),
    ("QuaRot W4A4KV4", "quarot-w4a4kv4", []),
    ("SpinQuant-Hadamard W4A4KV4", "spinquant-had-w4a4kv4", []),
    ("OSTQuant W4A4KV4 (24-step fit)", "ostquant-w4a4kv4", SHORT_FIT),
    ("GPTQ MXFP4", "gptq-mxfp4", []),
    ("WUSH MXFP4", "wush-mxfp4", []),
    ("GPTQ INT2 g32", "gptq-w4a16-g128", ["weights.bits=2", "weights.group_size=32"]),
    ("QuIP# E8P 2-bit", "quip-e8p-2bit", []),
]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=None,
                   help="comma-separated presets instead of the method families (those not shipped in this "
                        "build are skipped); PRESET@key=value@... applies --set overrides, e.g. "
                        "rtn-w4a16@weights.group_size=128")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N held-out windows")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    return p.parse_args(argv)


def chosen_cases(presets: str | None) -> list[tuple[str, str, list[str]]]:
    if presets is None:
        return DEFAULT_CASES
    cases = [parse_case(entry) for entry in presets.split(",") if entry]
    available = set(preset_names())
    skipped = [label for label, preset, _ in cases if preset not in available]
    if skipped:
        log.info("presets not in this build, skipped: %s", ", ".join(skipped))
    return [c for c in cases if c[1] in available]


def held_out_text(corpus: Path, out: Path) -> Path:
    """Both held-out splits (test, then valid: files the model never trained on) as one text: ~1750
    windows of 256 tokens, so that the gaps between neighbouring rows exceed their paired noise."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "held_out.txt"
    path.write_text((corpus / "test.txt").read_text(encoding="utf-8") + "\n\n" +
                    (corpus / "valid.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    setup_threads()
    model = build_demo_model()  # times 1 vs 2 training threads itself
    torch.set_num_threads(1)  # the rows are small ops: a second thread on shared cores made them 10-40x slower
    start = time.perf_counter()
    corpus = cache_dir() / "demo-corpus"
    cases = chosen_cases(args.presets)
    printed: list = []

    def show(row) -> None:  # each row as soon as it is measured; the first is FP
        if not printed:
            print(table_header(args.seqlen))
        printed.append(row)
        print(table_row(row, printed[0]), flush=True)

    held_out = held_out_text(corpus, args.out)
    rows = preset_perplexities(str(model), cases, str(corpus / "train.txt"), str(held_out), args.out,
                               nsamples=args.nsamples, seqlen=args.seqlen, max_windows=args.max_windows,
                               device=torch.device("cpu"), on_row=show)
    print("\n" + write_preset_table(rows, args.seqlen, args.out))
    runs = [f"FP={args.out / 'fp.json'}"] + [f"{label.replace('=', ':')}={args.out / run_folder_name(label)}"
                                            for label, _, _ in cases]  # a report label holds no '=
    report = build_report(runs, args.out / "report")
    print(f"\nreport: {args.out / 'report' / 'report.md'} (charts: {', '.join(report['charts'])}); "
          f"{time.perf_counter() - start:.0f} s after the model build")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(2)
