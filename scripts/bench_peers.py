#!/usr/bin/env python
"""Benchmark orthoquant's weight-only recipes against a peer tool, Intel's AutoRound, on the demo model.

For each setting (``w4g128``, ``w3g128``, ``w2g64``) one table row per method: FP, RTN, GPTQ,
orthoquant rounding (``round-*``: learned rounding by block reconstruction from RTN codes, GPTQ's codes
kept per layer where they reconstruct better), rotation + rounding (``quarot-round-w4a16`` at the same
bits and group) and AutoRound, each with its held-out perplexity (demo-corpus ``test.txt``), gap to FP
and quantize time, all in one run on the same threads, every method storing float16 scales as AutoRound
does (:data:`PEER_SCALES`). The learned methods (both roundings and AutoRound)
run once per ``--seeds`` entry (ours with ``refine.seed``, AutoRound with ``seed = 42 + s``, its default at
s = 0): which weights flip depends on the batch order, and on the demo model the gap of one seed differs
from another's by about as much as the methods differ, so the table gives each method's mean gap over the
seeds and their range. Every method calibrates on the same token windows
(``--nsamples`` x ``--seqlen`` of ``train.txt``). Time is reported as wall seconds and as the process's
CPU seconds (``time.process_time``; AutoRound's measured in its worker process): on a machine shared
with other jobs the wall time follows their load, the CPU time much less, so ratios use CPU time.

AutoRound pins its own versions, so it lives in a separate virtual environment (see the README); this
script installs nothing. ``--peer-python`` names that environment's interpreter (default: this one); when
``auto_round`` is not importable there, the AutoRound row says so and the rest still runs. AutoRound
quantizes in a subprocess of that interpreter (this file with ``--worker``, importing no orthoquant) and
is evaluated there with stock transformers on the same windows; its FP perplexity, computed the same
way, is checked against orthoquant's so that both evaluation paths are known to agree.

    python scripts/bench_peers.py --peer-python /tmp/ar-venv/bin/python             # W4 g128, W3 g128
    python scripts/bench_peers.py --seeds 0,1,2 --settings w4g128 --peer-python /tmp/ar-venv/bin/python
    python scripts/bench_peers.py --settings w2g64 --peer-python /tmp/ar-venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_peers")
AUTOROUND_SEED = 42  # AutoRound's default seed: --seeds entry s runs it with 42 + s
# label -> (bits, group size, symmetric, orthoquant rounding preset)
SETTINGS = {"w4g128": (4, 128, True, "round-w4a16-g128"), "w3g128": (3, 128, True, "round-w3a16-g128"),
            "w2g64": (2, 64, False, "round-w2a16-g64")}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="w4g128,w3g128", help=f"comma-separated, of {list(SETTINGS)}")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--iters", type=int, default=200, help="steps per layer of both rounding methods")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the learned methods (runs per method)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N held-out windows")
    p.add_argument("--peer-python", default=sys.executable, help="interpreter of the AutoRound environment")
    p.add_argument("--out", type=Path, default=Path("runs/bench_peers"))
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run AutoRound from a job file
    return p.parse_args(argv)


def weight_sets(bits: int, group: int, symmetric: bool) -> list[str]:
    return [f"weights.bits={bits}", f"weights.group_size={group}", f"weights.symmetric={str(symmetric).lower()}"]


# AutoRound stores float16 scales; every orthoquant row here does too (the presets' ``auto`` would store
# bfloat16 for this float32 model, so that its runs also export to bfloat16 checkpoints: on the demo
# model that costs learned rounding ~0.06% of perplexity at W4, measured over three seeds).
PEER_SCALES = ["weights.scale_dtype=float16"]


def our_cases(setting: str, iters: int, seeds: list[int]) -> list[tuple[str, str, list[str], int | None]]:
    """(label, preset, overrides, seed) of orthoquant's runs at one setting: the learned ones once per seed."""
    bits, group, sym, rounding = SETTINGS[setting]
    w = weight_sets(bits, group, sym) + PEER_SCALES
    steps = [f"refine.iters={iters}"] + PEER_SCALES
    learned = [(f"{setting} orthoquant rounding", rounding, steps),
               (f"{setting} QuaRot + rounding", "quarot-round-w4a16", w + [f"refine.iters={iters}"])]
    return [(f"{setting} RTN", "rtn-w4a16", w, None), (f"{setting} GPTQ", "gptq-w4a16-g128", w, None),
            *[(label, preset, [*sets, f"refine.seed={seed}"], seed) for label, preset, sets in learned
              for seed in seeds]]


# --- the AutoRound worker (runs in the peer environment: torch, transformers, auto_round only) ------------
def nll_perplexity(model, windows) -> float:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows.split(1):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           reduction="sum").double())
            count += target.numel()
    return math.exp(total / count)


def run_worker(job_path: Path) -> None:
    import torch
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = json.loads(job_path.read_text())
    torch.set_num_threads(job["threads"])
    data = load_file(job["windows"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    fp = nll_perplexity(model, data["held_out"])
    calib = list(data["calib"].split(8))
    start, cpu = time.perf_counter(), time.process_time()
    ar = AutoRound(model, tokenizer, bits=job["bits"], group_size=job["group"], sym=job["sym"],
                   iters=job["iters"], nsamples=len(data["calib"]), seqlen=data["calib"].shape[1], batch_size=8,
                   dataset=calib, device_map="cpu", low_cpu_mem_usage=False, enable_torch_compile=False,
                   seed=job.get("seed", 42))
    quantized, _ = ar.quantize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    result = {"fp_ppl": fp, "ppl": nll_perplexity(quantized, data["held_out"]), "seconds": seconds,
              "cpu_seconds": cpu}
    Path(job["result"]).write_text(json.dumps(result))


# --- the benchmark ------------------------------------------------------------------------------------
def peer_available(python: str) -> str | None:
    """None when ``auto_round`` imports under ``python``, else why not (one line)."""
    probe = subprocess.run([python, "-c", "import auto_round, sys; sys.stdout.write(auto_round.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        log.info("AutoRound %s under %s", probe.stdout.strip(), python)
        return None
    return (probe.stderr.strip().splitlines() or ["no output"])[-1]


def run_autoround(python: str, model: Path, windows_file: Path, setting: str, iters: int, threads: int,
                  out: Path, seed: int) -> dict:
    bits, group, sym, _ = SETTINGS[setting]
    name = f"autoround-{setting}-seed{seed}"
    job = {"model": str(model), "windows": str(windows_file), "bits": bits, "group": group, "sym": sym,
           "iters": iters, "threads": threads, "seed": AUTOROUND_SEED + seed, "result": str(out / f"{name}.json")}
    job_file = out / f"{name}.job.json"
    job_file.write_text(json.dumps(job))
    subprocess.run([python, __file__, "--worker", str(job_file)], check=True)
    return json.loads(Path(job["result"]).read_text())


def save_windows(model: Path, corpus: Path, nsamples: int, seqlen: int, max_windows: int | None, out: Path) -> Path:
    """The calibration windows every method uses and the held-out windows AutoRound is evaluated on."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from orthoquant.data import calibration_windows, evaluation_tokens, perplexity_windows

    tokenizer = AutoTokenizer.from_pretrained(model)
    calib = calibration_windows(tokenizer, str(corpus / "train.txt"), nsamples, seqlen, seed=0)
    held = perplexity_windows(evaluation_tokens(tokenizer, str(corpus / "test.txt"), seqlen), seqlen)[:max_windows]
    path = out / "windows.safetensors"
    save_file({"calib": calib.contiguous(), "held_out": held.contiguous()}, str(path))
    return path


def autoround_row(args, model: Path, windows_file: Path, setting: str, seed: int, fp: float) -> dict:
    import torch

    peer = run_autoround(args.peer_python, model, windows_file, setting, args.iters, torch.get_num_threads(),
                         args.out, seed)
    log.info("AutoRound FP ppl %.6f vs orthoquant's %.6f", peer["fp_ppl"], fp)
    return {"setting": setting, "method": f"{setting} AutoRound", "seed": seed, "ppl": peer["ppl"],
            "seconds": peer["seconds"], "cpu_seconds": peer["cpu_seconds"], "fp_ppl_same_eval": peer["fp_ppl"]}


def held_out_ppl(target: str, corpus: Path, args) -> float:
    import torch

    from orthoquant.evaluate.run_eval import measure

    evaluation = measure(target, [str(corpus / "test.txt")], args.seqlen, torch.device("cpu"),
                         max_windows=args.max_windows)
    return evaluation.result["ppl"]["test.txt"]


def our_row(model: Path, corpus: Path, setting: str, case: tuple[str, str, list[str], int | None], args) -> dict:
    """Quantize one case into a fresh run folder (wall and process CPU time) and evaluate it."""
    import shutil

    from orthoquant.evaluate.preset_table import quantize_case, run_folder_name

    label, preset, sets, seed = case
    out = args.out / run_folder_name(label if seed is None else f"{label} seed {seed}")
    shutil.rmtree(out, ignore_errors=True)  # a finished run there would be reused, not timed
    start, cpu = time.perf_counter(), time.process_time()
    run = quantize_case(str(model), preset, sets, str(corpus / "train.txt"), out, nsamples=args.nsamples,
                        seqlen=args.seqlen)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    ppl = held_out_ppl(str(run), corpus, args)
    log.info("%s: ppl %.4f (%.0f s wall, %.0f s CPU)", label, ppl, seconds, cpu)
    return {"setting": setting, "method": label, "seed": seed, "ppl": ppl, "seconds": seconds, "cpu_seconds": cpu}


def table(rows: list[dict], seqlen: int) -> str:
    """One line per method: the mean over its runs (seeds) of perplexity, gap and times, and the gaps' range."""
    fp = rows[0]["ppl"]
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(r["method"], []).append(r)
    mean = lambda runs, key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    gptq = {runs[0]["setting"]: mean(runs, "cpu_seconds") for m, runs in methods.items() if m.endswith(" GPTQ")}
    lines = [f"| method | runs | held-out ppl (seqlen {seqlen}) | gap to FP | gap range | quantize s (wall) | CPU s "
             "| CPU / GPTQ |", "|---|---|---|---|---|---|---|---|"]
    for method, runs in methods.items():
        if runs[0].get("ppl") is None:
            lines.append(f"| {method} | | {runs[0]['note']} | | | | | |")
            continue
        gaps = [r["ppl"] / fp - 1 for r in runs]
        spread = f"{min(gaps):+.2%} … {max(gaps):+.2%}" if len(runs) > 1 else ""
        cpu, setting = mean(runs, "cpu_seconds"), runs[0]["setting"]
        ratio = f"{cpu / gptq[setting]:.1f}x" if setting in gptq and runs[0]["seconds"] else ""
        lines.append(f"| {method} | {len(runs)} | {mean(runs, 'ppl'):.4f} | {sum(gaps) / len(gaps):+.2%} | {spread} "
                     f"| {mean(runs, 'seconds'):.0f} | {cpu:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    import torch

    from orthoquant.demo import build_demo_model, cache_dir
    from orthoquant.progress import setup_logging, setup_threads

    setup_logging()
    setup_threads()
    settings = [s for s in args.settings.split(",") if s]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        print(f"bench_peers: error: --seeds {args.seeds!r} must be comma-separated integers", file=sys.stderr)
        return 2
    if not seeds or any(s < 0 for s in seeds):
        print(f"bench_peers: error: --seeds {args.seeds!r}: give one or more seeds >= 0", file=sys.stderr)
        return 2
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        print(f"bench_peers: error: unknown setting(s) {unknown}; choose from {list(SETTINGS)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    model, corpus = build_demo_model(), cache_dir() / "demo-corpus"
    windows_file = save_windows(model, corpus, args.nsamples, args.seqlen, args.max_windows, args.out)
    missing = peer_available(args.peer_python)
    fp = held_out_ppl(str(model), corpus, args)
    rows: list[dict] = [{"setting": "", "method": "FP", "ppl": fp, "seconds": 0.0, "cpu_seconds": 0.0}]
    for setting in settings:
        cases = our_cases(setting, args.iters, seeds)
        rows += [our_row(model, corpus, setting, case, args) for case in cases if case[3] is None]
        for seed in seeds:  # ours and AutoRound seed by seed: a drift in the machine's speed hits both alike
            rows += [our_row(model, corpus, setting, case, args) for case in cases if case[3] == seed]
            if missing is None:
                rows.append(autoround_row(args, model, windows_file, setting, seed, rows[0]["ppl"]))
        if missing is not None:
            rows.append({"setting": setting, "method": f"{setting} AutoRound", "ppl": None,
                         "note": f"not run: auto_round does not import under {args.peer_python} ({missing})"})
    text = table(rows, args.seqlen)
    (args.out / "results.md").write_text(text + "\n")
    payload = {"seqlen": args.seqlen, "nsamples": args.nsamples, "iters": args.iters, "seeds": seeds,
               "threads": torch.get_num_threads(), "rows": rows}
    (args.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
