#!/usr/bin/env python
"""Scoring time of the demo's FP4-activation rows as the fake-quant was and as it is, in one process.

Three paths (:data:`PATHS`): the codes path (``decode(encode(x))``) with one quantizer per linear, as
before; the fused FP4 path (``FP4Format.quantize_dequantize``) still per linear; and the fused path with
q/k/v and gate/up sharing one quantization of the tensor they read (``SharedQuantizer``), as now.
Each row is the demo's case quantized as the demo does (a finished run folder in ``--out`` is reused),
opened once, and scored on the first ``--windows`` held-out windows (the demo's text: test then valid
split) at batch 1, one torch thread, as ``make demo`` scores. The paths take turns on chunks of
``--chunk`` windows (the order reverses every chunk), so load changes on a shared machine hit all alike;
the FP model takes its turn too, for the time the paths spend beyond it. Every window's loss must be
the same float64 under every path (exit 1 otherwise). Writes ``bench_fakequant.json`` and ``.md`` into ``--out``.

    PYTHONPATH=. python scripts/bench_fakequant.py [--windows 300] [--presets PRESET@key=value,...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable
from unittest import mock

# first: an installed orthoquant comes first, else this checkout's (run with PYTHONPATH=<checkout> to
# measure a checkout over an installed one; codes_path refuses an installed one that predates the fused path)
from _bench import markdown_table, timed

import orthoquant
import torch
from demo import DEFAULT_CASES, held_out_text  # scripts/demo.py: the demo's rows and text

from orthoquant.data import evaluation_tokens, perplexity_windows
from orthoquant.demo import MARKER, cache_dir
from orthoquant.evaluate.ppl import window_losses
from orthoquant.evaluate.preset_table import parse_case, quantize_case, run_folder_name
from orthoquant.evaluate.run_eval import LOADERS
from orthoquant.fakequant.inputs import SharedQuantizer
from orthoquant.formats.base import QuantFormat
from orthoquant.formats.fp4 import FP4Format
from orthoquant.recipes import load_recipe

log = logging.getLogger("bench_fakequant")
FP4_FORMATS = ("mxfp4", "nvfp4")
CPU = torch.device("cpu")


def codes_path():
    """While active, FP4 formats fake-quantize through codes again (the pre-fused path, kept as the base class's)."""
    if "quantize_dequantize" not in vars(FP4Format):  # an installed older orthoquant shadows this checkout
        raise SystemExit(f"{orthoquant.__file__} has no fused FP4 path to compare; run with PYTHONPATH=<this checkout>")
    return mock.patch.object(FP4Format, "quantize_dequantize", QuantFormat.quantize_dequantize)


def per_linear():
    """While active, every linear quantizes its input itself, even where q/k/v or gate/up read the same tensor."""
    return mock.patch.object(SharedQuantizer, "__call__", lambda self, x: self.op(x))


# path -> the patches that make it; the first is the code as it was, the last as it is
PATHS = {"codes, per linear": (codes_path, per_linear), "fused, per linear": (per_linear,), "fused, shared": ()}
BEFORE = list(PATHS)[0]


@contextmanager
def path(name: str):
    with ExitStack() as stack:
        for patch in PATHS[name]:
            stack.enter_context(patch())
        yield


def fp4_cases(presets: str | None) -> list[tuple[str, str, list[str]]]:
    """The demo's rows whose activations are FP4, or the ``--presets`` given."""
    cases = DEFAULT_CASES if presets is None else [parse_case(p) for p in presets.split(",") if p]
    return [c for c in cases if (a := load_recipe(c[1], c[2]).activations) is not None and a.format in FP4_FORMATS]


FP = "FP model"  # timed in the same rotation: the time every path spends beyond the fake-quant


def scorers(quantized, fp_model) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Per-window losses of a chunk of windows: the FP model's, and the run's under each of :data:`PATHS`."""
    def under(name: str):
        def score(part: torch.Tensor) -> torch.Tensor:
            with path(name):
                return window_losses(quantized, part, CPU, 1)
        return score

    return {FP: lambda part: window_losses(fp_model, part, CPU, 1), **{name: under(name) for name in PATHS}}


def score_interleaved(score: dict[str, Callable], windows: torch.Tensor, chunk: int) -> dict[str, dict]:
    """Seconds and per-window losses over ``windows`` of each scorer, taking turns chunk by chunk."""
    out = {name: {"seconds": 0.0, "losses": []} for name in score}
    for fn in score.values():  # untimed: the first forwards allocate and load kernels
        fn(windows[:1])
    for i, part in enumerate(windows.split(chunk)):
        for name in (list(score) if i % 2 == 0 else list(reversed(score))):
            losses, seconds = timed(lambda: score[name](part))
            out[name]["losses"].append(losses)
            out[name]["seconds"] += seconds
    return {name: {"seconds": r["seconds"], "losses": torch.cat(r["losses"])} for name, r in out.items()}


def bench_row(label: str, run: Path, fp_model, windows: torch.Tensor, chunk: int) -> dict:
    loaded = LOADERS["run"](str(run), CPU, "auto", False)
    scored = score_interleaved(scorers(loaded.model, fp_model), windows, chunk)
    before, fp_s = scored[BEFORE], scored[FP]["seconds"]
    row = {"row": label, "run": str(run), "windows": len(windows), "fp_s": fp_s, "paths": {
        name: {"seconds": r["seconds"], "tok_s": windows.numel() / r["seconds"],
               "speedup": before["seconds"] / r["seconds"], "beyond_fp_share": 1 - fp_s / r["seconds"],
               "losses_identical": torch.equal(r["losses"], before["losses"]),
               "max_abs_loss_diff": float((r["losses"] - before["losses"]).abs().max())}
        for name, r in scored.items() if name != FP}, "ppl": float(before["losses"].mean().exp())}
    row["losses_identical"] = all(p["losses_identical"] for p in row["paths"].values())
    log.info("%s", row)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['windows']} held-out windows of {meta['seqlen']} tokens, batch 1, {meta['threads']} thread; "
             f"load average {meta['load_before']} before, {meta['load_after']} after ({meta['cpus']} CPUs). "
             "Seconds (tok/s, speed-up, share of the time beyond the FP model's, timed in the same rotation); "
             "every path's per-window losses compared with the first's.", ""]

    def cells(r: dict) -> list[str]:
        return [r["row"], f"{r['fp_s']:.1f} s",
                *(f"{p['seconds']:.1f} s ({p['tok_s']:.0f} tok/s, {p['speedup']:.2f}×, {p['beyond_fp_share']:.0%})"
                  for p in r["paths"].values()), str(r["losses_identical"]), f"{r['ppl']:.4f}"]

    header = ["row", FP, *PATHS, "losses identical", "ppl"]
    return "\n".join(lines) + "\n" + markdown_table(header, [cells(r) for r in rows]) + "\n"


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
    calib = str(corpus / "train.txt")
    runs = [(label, quantize_case(str(model), preset, sets, calib, args.out / run_folder_name(label),
                                  nsamples=args.nsamples, seqlen=args.seqlen)) for label, preset, sets in cases]
    loaded = LOADERS["model"](str(model), CPU, "auto", False)
    windows = perplexity_windows(evaluation_tokens(loaded.tokenizer, str(held_out), args.seqlen), args.seqlen)
    windows = windows[:args.windows or None]
    load_before = os.getloadavg()
    rows = [bench_row(label, run, loaded.model, windows, args.chunk) for label, run in runs]
    meta = {"windows": len(windows), "seqlen": args.seqlen, "threads": torch.get_num_threads(),
            "load_before": [round(v, 2) for v in load_before],
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
