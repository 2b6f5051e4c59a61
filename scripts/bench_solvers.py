"""Benchmark the GPTQ solver: time, peak memory, FLOP rate against dense GEMM, MSE clip search, loss vs RTN.

For each layer size out x in (W is out x in) it reports:
- ``gptq_s``: wall time of a ``solve_gptq`` call (INT sym per channel by default, act-order on), the best of
  ``--repeats`` (one call on a shared CPU can take twice as long), including its proxy loss
  ``tr(ΔW H ΔWᵀ)``, which it takes from its own residuals in O(m·n);
- ``loss_s`` / ``loss_rel_err``: a direct product ``tr(ΔW H ΔWᵀ)`` (another m·n² of GEMMs, which the
  solver no longer pays) and the relative difference of the solver's loss from it;
- ``peak_mib``: extra memory at the peak of that call: ``torch.cuda.max_memory_allocated`` on CUDA, the
  process RSS high-water mark above the level before the call on CPU (sampled every 2 ms);
- ``gemm_frac``: achieved rate ``(m·n² + n³) / gptq_s`` (column updates, then Cholesky and inverse) over the
  dense fp32 GEMM rate of this machine, timed in the same run on a 4096³ matmul (target ≥ 1/3): at the
  start (the table's header) and again right before each size's GPTQ call (``gemm_gflops``, which its
  fractions use, as the rate of a CPU shared with other jobs drifts);
- ``clip_fit_s`` / ``gptq_clip_s``: the MSE clip search alone (one ``fit`` of the whole weight) and GPTQ
  with ``QuantSpec(clip_search=True)``; ``clip_vs_gptq`` is ``clip_fit_s / gptq_s``;
- ``loss_gptq / loss_rtn``: layer losses with ``H = E[x xᵀ]`` of synthetic correlated activations
  ``x = z·A + ε``, z ~ N(0, diag(1/(k+1))) of rank 256, A ~ N(0, 1), ε with log-normal per-channel
  scales (outlier channels); H is that expectation in closed form (``Aᵀ diag(s) A + diag(σ²)``), so
  building it costs 256·n² instead of N·n².

The run also times float32 Cholesky factorisations of a 4096x4096 matrix (n³/3 flops): one LAPACK call
(``lapack_cholesky_gflops``) and the blocked one GPTQ uses (``cholesky_gflops``, see
:mod:`orthoquant.solvers.cholesky`); the factorisation is most of the time of wide layers.

Defaults are the Llama-3-8B shapes 4096x4096, 4096x14336 and 14336x4096: about 9 minutes on one CPU
thread (the 14336-input Cholesky alone takes ~40 s there). ``--sizes 1024x1024,1024x3584,3584x1024``
is a quick check.

    python scripts/bench_solvers.py --device cuda
    python scripts/bench_solvers.py --sizes 1024x1024,1024x3584,3584x1024 --out runs/bench_small.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from _bench import PeakMemory, markdown_table, repeat_times, synthetic_layer, timed  # first: orthoquant on the path
from orthoquant.config import QuantSpec, SolverSpec
from orthoquant.formats import make_format
from orthoquant.solvers import SOLVERS, proxy_loss
from orthoquant.solvers.cholesky import cholesky_lower_
from orthoquant.solvers.gptq import solve_gptq

DEFAULT_SIZES = "4096x4096,4096x14336,14336x4096"


def gemm_rate(device: str, n: int = 4096, repeats: int = 3) -> float:
    """Dense fp32 matmul rate (FLOP/s) of this machine: best of ``repeats`` n³ products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / repeat_times(lambda: a @ b, repeats, device).best


def cholesky_rates(device: str, n: int = 4096, repeats: int = 2) -> tuple[float, float]:
    """Float32 Cholesky rates (FLOP/s, n³/3 flops) of one LAPACK call and of GPTQ's blocked form."""
    a = torch.randn(n, n, device=device) / n**0.5
    spd = a @ a.T + torch.eye(n, device=device)
    timed(lambda: torch.linalg.cholesky_ex(spd[:256, :256]), device)  # warm-up
    lapack = repeat_times(lambda: torch.linalg.cholesky_ex(spd), repeats, device, warmup=False).best
    blocked = repeat_times(lambda: cholesky_lower_(spd.clone()), repeats, device, warmup=False).best
    return n**3 / 3 / lapack, n**3 / 3 / blocked


def bench_size(m: int, n: int, args) -> dict:
    """Every measurement of one layer size, as a JSON-ready dict."""
    W, H = synthetic_layer(m, n, args.device)
    spec = SolverSpec(name="gptq", blocksize=args.blocksize, act_order=args.act_order)
    qspec = dict(bits=args.bits, symmetric=True, group_size=args.group_size)
    fmt, fmt_clip = make_format(QuantSpec(**qspec)), make_format(QuantSpec(**qspec, clip_search=True))
    solve_gptq(W[:8, :128], H[:128, :128], fmt, spec)  # warm-up of the kernels
    rate = gemm_rate(args.device)
    with PeakMemory(args.device) as mem:
        res, t_gptq = timed(lambda: solve_gptq(W, H, fmt, spec), args.device)
    if args.repeats > 1:
        t_gptq = min(t_gptq, repeat_times(lambda: solve_gptq(W, H, fmt, spec), args.repeats - 1, args.device,
                                          warmup=False).best)
    direct, t_loss = timed(lambda: proxy_loss(W, res.weight, H), args.device)
    rtn, t_rtn = timed(lambda: SOLVERS.get("rtn").solve(W, H, fmt, None), args.device)
    _, t_clip_fit = timed(lambda: fmt_clip.fit(W), args.device)
    res_clip, t_gptq_clip = timed(lambda: solve_gptq(W, H, fmt_clip, spec), args.device)
    flops = m * n**2 + n**3
    return dict(size=f"{m}x{n}", gemm_gflops=rate / 1e9, gptq_s=t_gptq, loss_s=t_loss,
                loss_rel_err=abs(res.loss - direct) / direct, peak_mib=mem.peak_mib,
                gflops=flops / t_gptq / 1e9, gemm_frac=flops / t_gptq / rate, rtn_s=t_rtn,
                clip_fit_s=t_clip_fit, clip_vs_gptq=t_clip_fit / t_gptq, gptq_clip_s=t_gptq_clip,
                loss_gptq=res.loss, loss_rtn=rtn.loss, loss_ratio=res.loss / rtn.loss, loss_gptq_clip=res_clip.loss)


def markdown(rows: list[dict], meta: dict) -> str:
    cols = ["size", "gemm_gflops", "gptq_s", "loss_s", "loss_rel_err", "peak_mib", "gflops", "gemm_frac",
            "rtn_s", "clip_fit_s", "clip_vs_gptq", "gptq_clip_s", "loss_ratio"]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return (f"fp32 GFLOP/s at the start: GEMM {meta['gemm_gflops']:.1f}, Cholesky (n=4096) "
            f"{meta['cholesky_gflops']:.1f} blocked, {meta['lapack_cholesky_gflops']:.1f} LAPACK\n\n"
            + markdown_table(cols, [[fmt(r[c]) for c in cols] for r in rows]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated OUTxIN layers (default {DEFAULT_SIZES})")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=-1, help="-1 per channel (default), 0 per tensor, g > 0")
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--repeats", type=int, default=2, help="GPTQ calls per size; the fastest is reported")
    p.add_argument("--out", type=Path, default=Path("runs/bench_solvers.json"))
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMM rate, as GPTQ runs it
    rate, (lapack, chol) = gemm_rate(args.device), cholesky_rates(args.device)
    rows = []
    for size in args.sizes.split(","):
        m, n = (int(v) for v in size.lower().split("x"))
        rows.append(bench_size(m, n, args))
        print(f"{size}: {rows[-1]['gptq_s']:.2f} s", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=args.device, threads=torch.get_num_threads(), torch=torch.__version__,
                gemm_gflops=rate / 1e9, cholesky_gflops=chol / 1e9, lapack_cholesky_gflops=lapack / 1e9,
                bits=args.bits, group_size=args.group_size, blocksize=args.blocksize, act_order=args.act_order,
                repeats=args.repeats)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
