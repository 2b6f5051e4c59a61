#!/usr/bin/env python
"""Peak memory of `orthoquant export` against that of the `quantize` run it exports.

A random Llama (~100 MB in float32 by default) is quantized once; each (format, --verify) case is then
exported in a fresh process whose peak is its VmHWM (see scripts/bench_memory.py for why not ru_maxrss).
``--orthoquant`` runs the export with another orthoquant source tree on PYTHONPATH (e.g. a checkout of the
commit before streamed verification, which has no --verify: its cases run with its one behaviour).

    python scripts/bench_export_memory.py [--layers 8] [--hidden 512] [--intermediate 1536] [--orthoquant DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_BENCH_MEMORY = Path(__file__).with_name("bench_memory.py")
_CHILD = _BENCH_MEMORY.read_text().split('_CHILD = """', 1)[1].split('"""', 1)[0]


def _bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", _BENCH_MEMORY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_mb(args: list[str], pythonpath: str | None = None) -> float:
    """VmHWM (MB) of ``orthoquant ARGS`` run in a fresh process."""
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"orthoquant {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return int([l for l in proc.stdout.splitlines() if l.startswith("PEAK_KB")][-1].split()[1]) / 1024


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
    from orthoquant.demo import train_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = " ".join(f"token{i % 97} word{i % 13}" for i in range(60000))
        (tmp / "calib.txt").write_text(text)
        model_bytes = _bench_memory().make_model(tmp / "model", args.layers, args.hidden, args.intermediate,
                                                 train_tokenizer([text], 320, None))
        quantize = peak_mb(["quantize", str(tmp / "model"), "--recipe", "rtn-w4a16", "--calib", str(tmp / "calib.txt"),
                            "--nsamples", "8", "--seqlen", "128", "--device", "cpu", "--out", str(tmp / "run")])
        rows.append({"case": "quantize (rtn-w4a16)", "peak_mb": quantize})
        cases = [(f, ["--verify", v], f"this tree, --verify {v}", None) for f in args.formats.split(",")
                 for v in args.verify.split(",")]
        cases += [(f, [], "--orthoquant tree", args.orthoquant) for f in args.formats.split(",") if args.orthoquant]
        for i, (fmt, extra, label, path) in enumerate(cases):
            peak = peak_mb(["export", str(tmp / "run"), "--format", fmt, "--out", str(tmp / f"e{i}"), *extra], path)
            rows.append({"case": f"export {fmt}: {label}", "peak_mb": peak})
            print(f"{rows[-1]['case']}: {peak:.0f} MB", file=sys.stderr)
    print(f"model: {model_bytes / 2**20:.0f} MB float32, {args.layers} layers; one layer "
          f"{model_bytes / 2**20 / args.layers:.0f} MB at most")
    print("| case | peak RSS (MB) | over quantize's peak (MB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['peak_mb']:.0f} | {r['peak_mb'] - quantize:+.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"model_mb": model_bytes / 2**20, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
