#!/usr/bin/env python
"""Peak memory of `orthoquant quantize` versus model depth: it must stay flat.

For each depth a random Llama of that many layers is saved as safetensors, then quantized in a fresh
process whose peak is its VmHWM. The model grows linearly with depth; the runner holds one decoder
layer at a time, so peak RSS should not.

Not ru_maxrss: at exec Linux folds the pre-exec address space's peak (here this script's, which built
and saved the largest model so far) into the child's ru_maxrss, so it would grow with depth whatever
the quantizer does (see :func:`_bench.cli_peak`).

    python scripts/bench_memory.py [--layers 2,4,8,16] [--hidden 1024] [--intermediate 2816] [--out runs/bench_memory.json]

The mixture-of-experts row (a tiny-expert Qwen3-MoE at 2, 4 and 8 layers, measured by this script's
:func:`peak_rss_mb`) is ``scripts/bench_moe.py --mode memory``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _bench import calibration_text, cli_peak, markdown_table, random_llama


def peak_rss_mb(model: Path, calib: Path, out: Path) -> float:
    # GPTQ holds the most per layer (Hessians, inverse factors); the clip search only costs time
    peak = cli_peak(["quantize", str(model), "--recipe", "gptq-w4a16", "--set", "weights.clip_search=false",
                     "--calib", str(calib), "--nsamples", "8", "--seqlen", "128", "--device", "cpu", "--out", str(out)])
    print(f"  {model.name}: peak {peak.peak_mb:.0f} MB (ru_maxrss, with this script's peak: "
          f"{peak.maxrss_mb:.0f} MB); at exit {peak.at_exit}", file=sys.stderr)
    return peak.peak_mb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2,4,8,16")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--repeats", type=int, default=3, help="runs per depth; the median peak is reported")
    p.add_argument("--out", type=Path, default=Path("runs/bench_memory.json"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib, tokenizer = calibration_text(tmp)
        for n in [int(x) for x in args.layers.split(",")]:
            model_bytes = random_llama(tmp / f"m{n}", n, args.hidden, args.intermediate, tokenizer)
            peaks = sorted(peak_rss_mb(tmp / f"m{n}", calib, tmp / f"run{n}-{r}") for r in range(args.repeats))
            rss = peaks[len(peaks) // 2]
            rows.append({"layers": n, "model_mb": model_bytes / 2**20, "peak_rss_mb": rss, "peaks_mb": peaks})
            print(f"layers {n}: model {model_bytes / 2**20:.0f} MB, peak RSS {rss:.0f} MB", file=sys.stderr)
    base = rows[0]["peak_rss_mb"]
    text = markdown_table(
        ["layers", "model (MB, fp32)", "median peak RSS (MB)", "all runs", "peak / peak at fewest layers"],
        [[str(r["layers"]), f"{r['model_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
          ", ".join(f"{p:.0f}" for p in r["peaks_mb"]), f"{r['peak_rss_mb'] / base:.2f}"] for r in rows])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hidden": args.hidden, "intermediate": args.intermediate,
                                    "peak": "VmHWM of the quantize process", "rows": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
