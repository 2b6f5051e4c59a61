"""Benchmark the fast Hadamard transform against a dense ``x @ Had_n`` matmul on CPU (fp32).

For each n: ``apply_hadamard`` on its no-grad path (mixed-radix GEMM stages with ``out=``), on its
autograd path (``differentiable=True``, timed under no_grad so only the kernels count), a radix-2
ping-pong butterfly (research/ecosystem.md §5, plus the same H_K stage) for comparison, and dense
``x @ H`` with H [n, n] built beforehand (not timed). Each time is the min of ``--repeats`` runs
after one warm-up.
Dense is skipped (``null``) when H would exceed ``--dense-max-gb``; nothing is extrapolated.
Then the demo model's held-out perplexity for ``rtn-w4a4kv4``, ``quarot-rtn-w4a4kv4``,
``quarot-w4a4kv4`` and ``quarot-w4a16`` (skipped with ``--no-ppl``; the demo model must be built:
``python scripts/make_demo_model.py``). Writes JSON to ``--out`` and markdown tables next to it (same
name, ``.md``).

    python scripts/bench_hadamard.py [--tokens 2048] [--sizes 4096,11008,14336,18944] [--threads N] [--no-ppl]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from pathlib import Path

import torch

from _bench import markdown_table, repeat_times  # first: orthoquant on the path
from orthoquant.demo import MARKER, cache_dir
from orthoquant.evaluate.preset_table import preset_perplexities, preset_table
from orthoquant.hadamard import apply_hadamard, hadamard_base, hadamard_factor, hadamard_matrix

logger = logging.getLogger("bench_hadamard")
PPL_PRESETS = ["rtn-w4a4kv4", "quarot-rtn-w4a4kv4", "quarot-w4a4kv4", "quarot-w4a16"]


def radix2(x: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """Radix-2 ping-pong butterfly over the 2^m axis (log2 m passes), then the H_Kᵀ stage."""
    n = k * m
    src = x.mul(n**-0.5).view(-1, m)
    dst = torch.empty_like(src)
    h = 1
    while h < m:
        s, d = src.view(-1, m // (2 * h), 2, h), dst.view(-1, m // (2 * h), 2, h)
        torch.add(s[:, :, 0], s[:, :, 1], out=d[:, :, 0])
        torch.sub(s[:, :, 0], s[:, :, 1], out=d[:, :, 1])
        src, dst = dst, src
        h *= 2
    if k > 1:
        torch.matmul(hadamard_base(k).to(src).T, src.view(-1, k, m), out=dst.view(-1, k, m))
        src = dst
    return src.view(-1, n)


def bench_size(n: int, tokens: int, repeats: int, dense_max_gb: float) -> dict:
    """Times (ms) and errors for one width n."""
    k, m = hadamard_factor(n)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(n))
    row = {"n": n, "K": k, "M": m, "tokens": tokens}
    with torch.no_grad():
        fast = apply_hadamard(x, differentiable=False)
        row["fast_ms"] = 1e3 * repeat_times(lambda: apply_hadamard(x, differentiable=False), repeats).best
        row["autograd_path_ms"] = 1e3 * repeat_times(lambda: apply_hadamard(x, differentiable=True), repeats).best
        row["radix2_ms"] = 1e3 * repeat_times(lambda: radix2(x, k, m), repeats).best
        row["radix2_max_abs_diff"] = (radix2(x, k, m) - fast).abs().max().item()
        row["dense_ms"] = row["max_abs_diff_vs_dense"] = None
        if n * n * 4 / 2**30 <= dense_max_gb:
            h = hadamard_matrix(n, torch.float32)
            row["dense_ms"] = 1e3 * repeat_times(lambda: x @ h, repeats).best
            row["max_abs_diff_vs_dense"] = (fast - x @ h).abs().max().item()
            del h
    if row["dense_ms"] is not None:
        row["speedup_fast"] = row["dense_ms"] / row["fast_ms"]
        row["speedup_autograd_path"] = row["dense_ms"] / row["autograd_path_ms"]
    logger.info("n=%d: %s", n, {k: v for k, v in row.items() if k != "n"})
    return row


def markdown(rows: list[dict], threads: int) -> str:
    """A markdown table of the rows."""
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    header = ["n", "K·2^m", "fast, no grad", "fast, autograd path", "radix-2 butterfly", "dense x@H",
              "speed-up no grad", "speed-up autograd"]
    cells = [[str(r["n"]), f"{r['K']}·{r['M']}", fmt(r["fast_ms"], ".1f"), fmt(r["autograd_path_ms"], ".1f"),
              fmt(r["radix2_ms"], ".1f"), fmt(r["dense_ms"], ".0f"), f"{fmt(r.get('speedup_fast'), '.1f')}×",
              f"{fmt(r.get('speedup_autograd_path'), '.1f')}×"] for r in rows]
    return (f"fp32, {rows[0]['tokens']} tokens, {threads} thread(s), min of repeats (ms)\n\n"
            + markdown_table(header, cells) + "\n")


def demo_perplexities(out_dir: Path, nsamples: int, seqlen: int) -> tuple[list[dict], str]:
    """FP and :data:`PPL_PRESETS` on the demo model's held-out test split; rows and a markdown table."""
    model, corpus = cache_dir() / "demo-llama", cache_dir() / "demo-corpus"
    if not (model / MARKER).is_file():
        raise SystemExit(f"no demo model in {model}: run scripts/make_demo_model.py first, or pass --no-ppl")
    rows = preset_perplexities(str(model), PPL_PRESETS, str(corpus / "train.txt"), str(corpus / "test.txt"),
                               out_dir, nsamples=nsamples, seqlen=seqlen)
    return [vars(r) for r in rows], preset_table(rows, seqlen)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--sizes", default="4096,11008,14336,18944", help="comma-separated widths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dense-max-gb", type=float, default=4.0, help="skip dense when H is larger")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_hadamard.json"))
    ap.add_argument("--no-ppl", action="store_true", help="skip the demo-model perplexity table")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows for the perplexity runs")
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [bench_size(n, args.tokens, args.repeats, args.dense_max_gb) for n in sizes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": threads,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_1min_at_end": os.getloadavg()[0],  # other jobs on the box inflate every column
    }
    ppl_rows, ppl_md = ([], "") if args.no_ppl else demo_perplexities(args.out.with_suffix(""), args.nsamples,
                                                                       args.seqlen)
    meta["loadavg_1min_at_end"] = os.getloadavg()[0]
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "demo_ppl": ppl_rows}, indent=2) + "\n")
    load = f"\nload average at the end: {meta['loadavg_1min_at_end']:.1f} on {meta['cpus']} CPUs\n"
    table = markdown(rows, threads) + load + (f"\nDemo model, held-out test split:\n\n{ppl_md}\n" if ppl_md else "")
    args.out.with_suffix(".md").write_text(table)
    logger.info("wrote %s\n%s", args.out, table)


if __name__ == "__main__":
    main()
