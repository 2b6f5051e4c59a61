#!/usr/bin/env python
"""One unattended check of orthoquant on a GPU machine, writing one JSON (``--out``).

Sections, in order, each timed and recorded (an error is recorded and the next section runs; the
JSON is rewritten after every section, so a run cut short by ``timeout`` keeps what it measured):

1. ``env``: device, torch, bf16/fp32 GEMM rates;
2. ``hadamard``: the CUDA fast-Hadamard kernel against the torch butterfly (time, max difference)
   at n = 4096, 8192 (kernel) and 14336 (torch only: 28·512);
3. ``gptq``: GPTQ at 4096², 4096×14336 and 14336×4096 against the GEMM rate
   (``scripts/bench_solvers.py``'s measurement);
4. ``model``: a random-init model in bf16 saved on local disk with a small BPE tokenizer trained on
   a synthetic text (also the calibration text): Llama-3-8B-shaped by default, ``--shape 1b`` for a
   Llama-3.2-1B shape, ``--tiny`` for a 2-layer toy (CPU smoke test);
5. ``quarot``: ``orthoquant quantize --recipe quarot-w4a4kv4`` end to end, 128 × 2048 calibration;
6. ``fit`` / ``fit_offload``: a 20-step ``ostquant-w4a4kv4`` fit (RTN after it, so the fit dominates)
   without and with ``fitting.offload=cpu``: steps/s and peak device memory of the fit.

    bash scripts/gpu_check.sh                       # on the GPU machine: <= 8 minutes, runs/gpu_check.json
    python scripts/gpu_check.py --tiny --device cpu --out /tmp/gpu_check.json   # smoke test anywhere
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocabulary
    "8b": (4096, 14336, 32, 32, 8, 128256),
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "tiny": (256, 512, 2, 4, 2, 1000),
}


def gemm_rate(device: str, dtype: torch.dtype, n: int = 4096) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = min(timed(lambda: a @ b, device)[1] for _ in range(3))
    return 2 * n**3 / best


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def section_env(args) -> dict:
    n = 1024 if args.tiny else 4096
    info = {"torch": torch.__version__, "device": args.device, "shape": args.shape,
            "fp32_tflops": gemm_rate(args.device, torch.float32, n) / 1e12}
    if args.device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), bf16_tflops=gemm_rate(args.device, torch.bfloat16, n) / 1e12)
    return info


def section_hadamard(args) -> dict:
    """The CUDA kernel (where it is provably our matrix) against the torch butterfly, fp32 rows."""
    from orthoquant.hadamard import hadamard_factor
    from orthoquant.hadamard.cuda import hadamard_transform, kernel_usable
    from orthoquant.hadamard.butterfly import butterfly as _fast

    rows, out = (64 if args.tiny else 8192), {}
    for n in ((256, 512) if args.tiny else (4096, 8192, 14336)):
        x, (k, m) = torch.randn(rows, n, device=args.device), hadamard_factor(n)
        torch_path = lambda: _fast(x, k, m, False, use_out=True)  # noqa: E731
        reference = torch_path()  # warm-up
        row = {"torch_path_s": min(timed(torch_path, args.device)[1] for _ in range(3)),
               "kernel": bool(args.device == "cuda" and k == 1 and kernel_usable(n, x.dtype, x.device))}
        if row["kernel"]:
            y = hadamard_transform(x)  # warm-up
            row["kernel_s"] = min(timed(lambda: hadamard_transform(x), args.device)[1] for _ in range(3))
            row["max_abs_diff"] = (y - reference).abs().max().item()
        out[str(n)] = row
    return out


def section_gptq(args) -> dict:
    spec = importlib.util.spec_from_file_location("bench_solvers", ROOT / "scripts" / "bench_solvers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    opts = argparse.Namespace(device=args.device, bits=4, group_size=-1, blocksize=128, act_order=True, repeats=1)
    sizes = ((256, 256), (256, 512)) if args.tiny else ((4096, 4096), (4096, 14336), (14336, 4096))
    return {f"{m}x{n}": bench.bench_size(m, n, opts) for m, n in sizes}


def synthetic_text(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    words, size = [], 0
    while size < chars:
        w = rng.choice(lexicon) + (".\n" if rng.random() < 0.05 else " ")
        words.append(w)
        size += len(w)
    return "".join(words)


def section_model(args) -> dict:
    """The random model and its tokenizer under ``args.work / "model"``, the text under ``.../text.txt``."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaConfig, LlamaForCausalLM

    from orthoquant.demo_data import train_tokenizer

    hidden, inter, layers, heads, kv, vocab = SHAPES[args.shape]
    folder, text = args.work / "model", args.work / "text.txt"
    corpus = synthetic_text(300_000 if args.tiny else 6_000_000)
    text.write_text(corpus)
    train_tokenizer([corpus[:2_000_000]], 512, folder)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        value = (torch.ones(p.shape) if p.ndim == 1 else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        set_module_tensor_to_device(model, name, "cpu", value=value.to(torch.bfloat16))
    model.save_pretrained(folder, max_shard_size="5GB")
    return {"params": sum(p.numel() for p in model.parameters()), "folder": str(folder)}


def quantize_cli(args, run: str, recipe: str, sets: list[str], nsamples: int = 128) -> dict:
    """``orthoquant quantize`` in a subprocess; wall time and the run's metrics."""
    n, seqlen = (8, 64) if args.tiny else (nsamples, 2048)
    cmd = [sys.executable, "-m", "orthoquant.cli", "quantize", str(args.work / "model"), "--recipe", recipe,
           "--calib", str(args.work / "text.txt"), "--nsamples", str(n), "--seqlen", str(seqlen),
           "--device", args.device, "--out", str(args.work / run), *[a for s in sets for a in ("--set", s)]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.section_timeout)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return {"wall_s": seconds, "metrics": json.loads((args.work / run / "run.json").read_text())["metrics"]}


def section_quarot(args) -> dict:
    result = quantize_cli(args, "quarot", "quarot-w4a4kv4", [])
    return {"wall_s": result["wall_s"], "layers": len([k for k in result["metrics"] if k.isdigit()])}


def fit_sets(args, offload: str) -> list[str]:
    seqlen = 64 if args.tiny else 2048
    return ["solver.name=rtn", f"fitting.steps={2 if args.tiny else 20}", "fitting.batch_size=1",
            "fitting.grad_accum=4", f"fitting.source={args.work / 'text.txt'}", "fitting.nsamples=64",
            f"fitting.seqlen={seqlen}", "fitting.qsur_samples=0", "fitting.eval_samples=0",
            "fitting.checkpoint_every=0", f"fitting.offload={offload}"]


def section_fit(args, offload: str = "none") -> dict:
    # a few calibration windows: the RTN pass after the fit is not what this section times
    fit = quantize_cli(args, f"fit-{offload}", "ostquant-w4a4kv4", fit_sets(args, offload), nsamples=16)
    fit = fit["metrics"]["fitting"]
    peak = fit.get("peak_memory_bytes")
    return {"steps_per_s": fit["steps_per_s"], "peak_device_gib": peak / 2**30 if peak else None,
            "first_loss": fit["losses"][0], "last_loss": fit["losses"][-1]}


SECTIONS = [("env", section_env), ("hadamard", section_hadamard), ("gptq", section_gptq),
            ("model", section_model), ("quarot", section_quarot), ("fit", section_fit),
            ("fit_offload", lambda a: section_fit(a, "cpu"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=["8b", "1b"], default="8b")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy model and small sizes (CPU smoke test)")
    p.add_argument("--work", type=Path, default=Path("/tmp/orthoquant-gpu-check"), help="local disk for models")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check.json")
    p.add_argument("--budget", type=float, default=450, help="seconds; later sections are skipped past it")
    p.add_argument("--section-timeout", type=float, default=300)
    args = p.parse_args()
    args.shape = "tiny" if args.tiny else args.shape
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    began, report = time.perf_counter(), {"sections": {}}
    for name, fn in SECTIONS:
        elapsed = time.perf_counter() - began
        if elapsed > args.budget:
            report["sections"][name] = {"skipped": f"budget of {args.budget:.0f} s spent"}
            continue
        start = time.perf_counter()
        try:
            result = {"ok": True, **fn(args)}
        except Exception as e:  # record and go on: one failed section must not lose the others
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[-3000:]}
        result["seconds"] = time.perf_counter() - start
        report["sections"][name] = result
        report["total_s"] = time.perf_counter() - began
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"{name}: {'ok' if result['ok'] else result['error'][:200]} ({result['seconds']:.1f} s)", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
