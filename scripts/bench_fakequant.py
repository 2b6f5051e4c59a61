#!/usr/bin/env python
"""Scoring time of the demo's FP4-activation rows with the codes path (``decode(encode(x))``, as before
the fused fake-quant) against the fused path (``FP4Format.quantize_dequantize``), in one process.

Each row is the demo's case quantized as the demo does (a finished run folder in ``--out`` is reused),
opened once, and scored on the first ``--windows`` held-out windows (the demo's text: test then valid
split) at batch 1, one torch thread, as ``make demo`` scores. The two paths take turns on chunks of
``--chunk`` windows (which goes first alternates), so load changes on a shared machine hit both alike;
the FP model is timed on the same windows for reference. Every window's loss must be the same float64
under both paths (exit 1 otherwise). Writes ``bench_fakequant.json`` and ``.md`` into ``--out``.

    python scripts/bench_fakequant.py [--windows 300] [--presets PRESET@key=value,...] [--out runs/bench_fakequant]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

try:  # an installed orthoquant comes first: run with PYTHONPATH=<checkout> to measure a checkout
    import orthoquant
except ImportError:  # a checkout that is not installed: scripts/ is on the path, the package is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import orthoquant

import torch  # noqa: E402
from demo import DEFAULT_CASES, held_out_text  # noqa: E402  (scripts/demo.py: the demo's rows and text)

from orthoquant.config import load_recipe  # noqa: E402
from orthoquant.data import evaluation_tokens, perplexity_windows  # noqa: E402
from orthoquant.demo import MARKER, cache_dir  # noqa: E402
from orthoquant.evaluate.ppl import window_losses  # noqa: E402
from orthoquant.evaluate.preset_table import parse_case, quantize_case, run_folder_name  # noqa: E402
from orthoquant.evaluate.run_eval import LOADERS  # noqa: E402
from orthoquant.formats.base import QuantFormat  # noqa: E402
from orthoquant.formats.fp4 import FP4Format  # noqa: E402

log = logging.getLogger("bench_fakequant")
FP4_FORMATS = ("mxfp4", "nvfp4")
CPU = torch.device("cpu")


def codes_path():
    """While active, FP4 formats fake-quantize through codes again (the pre-fused path, kept as the base class's)."""
    if "quantize_dequantize" not in vars(FP4Format):  # an installed older orthoquant shadows this checkout
        raise SystemExit(f"{orthoquant.__file__} has no fused FP4 path to compare; run with PYTHONPATH=<this checkout>")
    return mock.patch.object(FP4Format, "quantize_dequantize", QuantFormat.quantize_dequantize)


PATHS = {"codes": codes_path, "fused": nullcontext}


def fp4_cases(presets: str | None) -> list[tuple[str, str, list[str]]]:
    """The demo's rows whose activations are FP4, or the ``--presets`` given."""
    cases = DEFAULT_CASES if presets is None else [parse_case(p) for p in presets.split(",") if p]
    return [c for c in cases if (a := load_recipe(c[1], c[2]).activations) is not None and a.format in FP4_FORMATS]


def score_interleaved(model, windows: torch.Tensor, chunk: int) -> dict[str, dict]:
    """Per path: seconds and per-window losses over ``windows``, the paths alternating chunk by chunk."""
    out = {name: {"seconds": 0.0, "losses": []} for name in PATHS}
    for name in PATHS:  # untimed: a model's first forwards allocate and load kernels
        with PATHS[name]():
            window_losses(model, windows[:1], CPU, 1)
    for i, part in enumerate(windows.split(chunk)):
        order = list(PATHS) if i % 2 == 0 else list(reversed(PATHS))
        for name in order:
            with PATHS[name]():
                start = time.perf_counter()
                out[name]["losses"].append(window_losses(model, part, CPU, 1))
                out[name]["seconds"] += time.perf_counter() - start
    return {name: {"seconds": r["seconds"], "losses": torch.cat(r["losses"])} for name, r in out.items()}


def fp_seconds(model_dir: str, windows: torch.Tensor) -> float:
    loaded = LOADERS["model"](model_dir, CPU, "auto", False)
    window_losses(loaded.model, windows[:1], CPU, 1)  # untimed warm-up, as for the rows
    start = time.perf_counter()
    window_losses(loaded.model, windows, CPU, 1)
    return time.perf_counter() - start


def bench_row(label: str, run: Path, windows: torch.Tensor, chunk: int, fp_s: float) -> dict:
    loaded = LOADERS["run"](str(run), CPU, "auto", False)
    scored = score_interleaved(loaded.model, windows, chunk)
    old, new = scored["codes"], scored["fused"]
    tokens = windows.numel()
    row = {"row": label, "run": str(run), "windows": len(windows),
           "codes_s": old["seconds"], "fused_s": new["seconds"], "speedup": old["seconds"] / new["seconds"],
           "codes_tok_s": tokens / old["seconds"], "fused_tok_s": tokens / new["seconds"],
           "fake_quant_share_codes": 1 - fp_s / old["seconds"], "fake_quant_share_fused": 1 - fp_s / new["seconds"],
           "losses_identical": torch.equal(old["losses"], new["losses"]),
           "max_abs_loss_diff": float((old["losses"] - new["losses"]).abs().max()),
           "ppl": float(new["losses"].mean().exp())}
    log.info("%s", row)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['windows']} held-out windows of {meta['seqlen']} tokens, batch 1, {meta['threads']} thread; "
             f"FP model {meta['fp_s']:.1f} s ({meta['fp_tok_s']:.0f} tok/s); load average "
             f"{meta['load_before']} before, {meta['load_after']} after ({meta['cpus']} CPUs)", "",
             "| row | codes path s | fused s | speed-up | codes tok/s | fused tok/s | fake-quant share codes → fused "
             "| losses identical | ppl |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['codes_s']:.1f} | {r['fused_s']:.1f} | {r['speedup']:.2f}× | "
                     f"{r['codes_tok_s']:.0f} | {r['fused_tok_s']:.0f} | {r['fake_quant_share_codes']:.0%} → "
                     f"{r['fake_quant_share_fused']:.0%} | {r['losses_identical']} | {r['ppl']:.4f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=300, help="held-out windows scored per path (0: all)")
    p.add_argument("--chunk", type=int, default=25, help="windows per turn of each path")
    p.add_argument("--presets", default=None, help="PRESET@key=value,... instead of the demo's FP4 rows")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("runs/bench_fakequant"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(1)  # as the demo scores
    model, corpus = cache_dir() / "demo-llama", cache_dir() / "demo-corpus"
    if not (model / MARKER).is_file():
        raise SystemExit(f"no demo model in {model}: run scripts/make_demo_model.py first")
    held_out = held_out_text(corpus, args.out)
    cases = fp4_cases(args.presets)
    if not cases:
        raise SystemExit("no case with FP4 activations to measure")
    runs = [(label, quantize_case(str(model), preset, sets, str(corpus / "train.txt"), args.out / run_folder_name(label),
                                  nsamples=args.nsamples, seqlen=args.seqlen)) for label, preset, sets in cases]
    loaded = LOADERS["model"](str(model), CPU, "auto", False)
    windows = perplexity_windows(evaluation_tokens(loaded.tokenizer, str(held_out), args.seqlen), args.seqlen)
    windows = windows[:args.windows or None]
    load_before = os.getloadavg()
    fp_s = fp_seconds(str(model), windows)
    rows = [bench_row(label, run, windows, args.chunk, fp_s) for label, run in runs]
    meta = {"windows": len(windows), "seqlen": args.seqlen, "threads": torch.get_num_threads(), "fp_s": fp_s,
            "fp_tok_s": windows.numel() / fp_s, "load_before": [round(v, 2) for v in load_before],
            "load_after": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count(),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "orthoquant": str(Path(orthoquant.__file__).parent)}
    (args.out / "bench_fakequant.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    (args.out / "bench_fakequant.md").write_text(table)
    print(table)
    return 0 if all(r["losses_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
