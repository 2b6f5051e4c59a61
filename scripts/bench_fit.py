"""Benchmark learned transforms on the demo model: fitting speed and memory, and perplexity of FP, RTN,
QuaRot (Hadamard only), SpinQuant and OSTQuant at W4A16 and W4A4KV4.

For every recipe the model is loaded fresh, quantized in memory on the same calibration windows (train
split of the demo corpus) and evaluated on the held-out test split. Fitted recipes also report the
fit's optimiser steps per second, its first/last loss and QSUR^(1/d) per site before and after
fitting (mean over layers). ``peak_mib`` is the peak of the whole quantization: CUDA's
``max_memory_allocated``, or on CPU the process RSS high-water mark above its level before (sampled).

The o_proj input group of the SpinQuant/OSTQuant presets is set to the model's head_dim (their
paper setting is "per head", 128 on Llama). Step counts and batches default to the presets'; lower
them on a CPU:

    python scripts/make_demo_model.py          # builds ~/.cache/orthoquant/demo-llama once
    python scripts/bench_fit.py --steps 30 --grad-accum 2 --out runs/bench_fit.json
    python scripts/bench_fit.py --device cuda --out runs/bench_fit_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

try:
    import orthoquant  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orthoquant import load_recipe, quantize  # noqa: E402
from orthoquant.data import calibration_windows, evaluation_tokens, perplexity_windows  # noqa: E402
from orthoquant.demo import cache_dir  # noqa: E402
from orthoquant.evaluate.ppl import perplexity  # noqa: E402

RECIPES = ("fp16", "rtn-w4a16", "quarot-w4a16", "ostquant-w4a16",
           "rtn-w4a4kv4", "quarot-w4a4kv4", "spinquant-had-w4a4kv4", "spinquant-w4a4kv4", "ostquant-w4a4kv4")


class PeakRSS:
    """Process RSS high-water mark above the level at start, sampled every 5 ms in a thread."""

    def __init__(self) -> None:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def recipe_sets(name: str, args, head_dim: int) -> list[str]:
    sets = [f"calibration.nsamples={args.nsamples}", f"calibration.seqlen={args.seqlen}", "calibration.batch_size=8"]
    if name.startswith(("spinquant", "ostquant")) and "w4a4" in name:
        sets.append(f"overrides=[{{pattern: 'self_attn\\.o_proj$', activations: {{group_size: {head_dim}}}}}]")
    if name.startswith(("spinquant-w", "ostquant")):
        sets += [f"fitting.{k}={v}" for k, v in (("steps", args.steps), ("grad_accum", args.grad_accum),
                                                  ("qsur_samples", args.qsur_samples)) if v is not None]
    return sets


def summary(fitting: dict) -> dict:
    out = {k: fitting.get(k) for k in ("steps_per_s", "seconds", "orthogonality_error")}
    losses = fitting.get("losses") or [None]
    out.update(first_loss=losses[0], last_loss=losses[-1])
    for when in ("qsur_before", "qsur_after"):
        if when in fitting:
            out[when] = {site: sum(v) / len(v) for site, v in fitting[when].items()}
    return out


def run_one(name: str, args, calib: torch.Tensor, held_out: torch.Tensor, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    recipe = load_recipe(name, recipe_sets(name, args, model.config.head_dim))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
        start = time.perf_counter()
        quantize(model, recipe, calib, out=Path(tmp) / "run", device=device)
        seconds = time.perf_counter() - start
        metrics = json.loads((Path(tmp) / "run" / "run.json").read_text())["metrics"]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss.mib
    row = {"recipe": name, "ppl": perplexity(model, held_out, device, batch_size=8),
           "quantize_s": seconds, "peak_mib": peak}
    if "fitting" in metrics:
        row["fit"] = summary(metrics["fitting"])
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | ppl | quantize s | peak MiB | fit steps/s | loss first → last |", "|---|---|---|---|---|---|"]
    for r in rows:
        fit = r.get("fit") or {}
        loss = f"{fit['first_loss']:.4f} → {fit['last_loss']:.4f}" if fit.get("first_loss") is not None else ""
        sps = f"{fit['steps_per_s']:.3f}" if fit.get("steps_per_s") else ""
        cells = (r["recipe"], f"{r['ppl']:.3f}", f"{r['quantize_s']:.1f}", f"{r['peak_mib']:.0f}", sps, loss)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(cache_dir() / "demo-llama"))
    parser.add_argument("--corpus", default=str(cache_dir() / "demo-corpus"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--nsamples", type=int, default=128, help="calibration (and fitting) windows")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="fitting steps (preset: 100)")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (preset: 4/8)")
    parser.add_argument("--qsur-samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"no model in {args.model}: build the demo model first (python scripts/make_demo_model.py)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer, device = AutoTokenizer.from_pretrained(args.model), torch.device(args.device)
    corpus = Path(args.corpus)
    calib = calibration_windows(tokenizer, str(corpus / "train.txt"), args.nsamples, args.seqlen, seed=0)
    tokens = evaluation_tokens(tokenizer, str(corpus / "test.txt"), args.seqlen)
    held_out = perplexity_windows(tokens, args.seqlen)[: args.eval_windows]
    rows = []
    for name in args.recipes.split(","):
        rows.append(run_one(name, args, calib, held_out, device))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "table": table}, indent=2))


if __name__ == "__main__":
    main()
