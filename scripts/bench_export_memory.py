#!/usr/bin/env python
"""Peak memory of `orthoquant export` against that of the `quantize` run it exports.

A random Llama (~100 MB in float32 by default) is quantized once; each (format, --verify) case is then
exported in a fresh process whose peak is its VmHWM (see :func:`_bench.cli_peak` for why not ru_maxrss).
``--orthoquant`` runs the export with another orthoquant source tree on PYTHONPATH (e.g. a checkout of the
commit before streamed verification, which has no --verify: its cases run with its one behaviour).

    python scripts/bench_export_memory.py [--layers 8] [--hidden 512] [--intermediate 1536] [--orthoquant DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _bench import calibration_text, cli_peak, markdown_table, random_llama


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--formats", default="native,compressed-tensors")
    p.add_argument("--verify", default="full,weights,none", help="modes to measure (this tree)")
    p.add_argument("--orthoquant", help="another orthoquant source tree to measure its export too")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib, tokenizer = calibration_text(tmp)
        model_bytes = random_llama(tmp / "model", args.layers, args.hidden, args.intermediate, tokenizer)
        quantize = cli_peak(["quantize", str(tmp / "model"), "--recipe", "rtn-w4a16", "--calib", str(calib),
                             "--nsamples", "8", "--seqlen", "128", "--device", "cpu", "--out", str(tmp / "run")])
        quantize = quantize.peak_mb
        rows.append({"case": "quantize (rtn-w4a16)", "peak_mb": quantize})
        cases = [(f, ["--verify", v], f"this tree, --verify {v}", None) for f in args.formats.split(",")
                 for v in args.verify.split(",")]
        cases += [(f, [], "--orthoquant tree", args.orthoquant) for f in args.formats.split(",") if args.orthoquant]
        for i, (fmt, extra, label, path) in enumerate(cases):
            peak = cli_peak(["export", str(tmp / "run"), "--format", fmt, "--out", str(tmp / f"e{i}"), *extra],
                            path).peak_mb
            rows.append({"case": f"export {fmt}: {label}", "peak_mb": peak})
            print(f"{rows[-1]['case']}: {peak:.0f} MB", file=sys.stderr)
    print(f"model: {model_bytes / 2**20:.0f} MB float32, {args.layers} layers; one layer "
          f"{model_bytes / 2**20 / args.layers:.0f} MB at most")
    print(markdown_table(["case", "peak RSS (MB)", "over quantize's peak (MB)"],
                         [[r["case"], f"{r['peak_mb']:.0f}", f"{r['peak_mb'] - quantize:+.0f}"] for r in rows]))
    if args.json:
        args.json.write_text(json.dumps({"model_mb": model_bytes / 2**20, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
