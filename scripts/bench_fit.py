"""Benchmark learned transforms on the demo model: fitting speed and memory, and perplexity of FP, RTN,
QuaRot (Hadamard only), SpinQuant and OSTQuant at W4A16 and W4A4KV4.

For every recipe the model is loaded fresh, quantized in memory on the same calibration windows (train
split of the demo corpus) and evaluated on the held-out test split. Fitted recipes also report the
fit's optimiser steps per second, its first/last loss and QSUR^(1/d) per site before and after
fitting (mean over layers). ``peak_mib`` is the peak of the whole quantization: CUDA's
``max_memory_allocated``, or on CPU the process RSS high-water mark above its level before (sampled).

The SpinQuant/OSTQuant presets group the o_proj input per head (their paper setting; 128 on Llama, the
model's head_dim here). Fitted recipes train on every packed window of the train text (``--no-fit-data``:
on the calibration windows); ``KL to FP`` is the held-out per-token KL to the unquantized model. Step counts and batches default to the presets'; lower
them on a CPU:

    python scripts/make_demo_model.py          # builds ~/.cache/orthoquant/demo-llama once
    python scripts/bench_fit.py --steps 30 --grad-accum 2 --out runs/bench_fit.json
    python scripts/bench_fit.py --device cuda --out runs/bench_fit_gpu.json

``--scale`` measures the fit's memory and speed instead (no demo model needed): a random Llama
(hidden 768, intermediate 2048, vocabulary 32768: ≥ 100M parameters at 8 layers, float32) is cut to
2, 4 and 8 layers and fitted with ``ostquant-w4a4kv4`` in a fresh process per case; the ratio is the
process's peak RSS (VmHWM, reset once the model is built and prepared) with ``fitting.steps`` steps
minus its peak with ``fitting.steps=0``, over the model's weight bytes. ``--before REV`` runs the
same cases with the package as of git revision REV too (speed before/after in one run, same machine and load):

    python scripts/bench_fit.py --scale --before d46398d --out runs/bench_fit_scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from _bench import PeakMemory, markdown_table, publish, timed  # first: orthoquant on the path
from orthoquant import load_recipe, quantize
from orthoquant.data import calibration_windows, evaluation_tokens, fitting_windows, perplexity_windows
from orthoquant.demo import cache_dir
from orthoquant.evaluate.ppl import perplexity

RECIPES = ("fp16", "rtn-w4a16", "quarot-w4a16", "ostquant-w4a16",
           "rtn-w4a4kv4", "quarot-w4a4kv4", "spinquant-had-w4a4kv4", "spinquant-w4a4kv4", "ostquant-w4a4kv4")


def recipe_sets(name: str, args, head_dim: int) -> list[str]:
    sets = [f"calibration.nsamples={args.nsamples}", f"calibration.seqlen={args.seqlen}", "calibration.batch_size=8"]
    if name.startswith(("spinquant-w", "ostquant")):
        sets.append(f"fitting.seqlen={args.seqlen}")
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


@torch.no_grad()
def log_probs(model, windows: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    return [torch.log_softmax(model(w.to(device)).logits.float(), -1).cpu() for w in windows.split(8)]


def kl_to_fp(model, fp: list[torch.Tensor], windows: torch.Tensor, device: torch.device) -> float:
    """Mean per-token KL(FP ‖ model) on the held-out windows."""
    total = sum((p.exp() * (p - q)).sum().item() for p, q in zip(fp, log_probs(model, windows, device)))
    return total / windows.numel()


def run_one(name: str, args, calib: torch.Tensor, held_out: torch.Tensor, device: torch.device,
            fit_windows: torch.Tensor | None = None, fp: list[torch.Tensor] | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    recipe = load_recipe(name, recipe_sets(name, args, model.config.head_dim))
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(device) as mem:
        _, seconds = timed(lambda: quantize(model, recipe, calib, out=Path(tmp) / "run", device=device,
                                            fit_windows=fit_windows))
        metrics = json.loads((Path(tmp) / "run" / "run.json").read_text())["metrics"]
    peak = mem.high_mib if device.type == "cuda" else mem.peak_mib  # CUDA: the whole allocator peak (doc)
    row = {"recipe": name, "ppl": perplexity(model, held_out, device, batch_size=8),
           "quantize_s": seconds, "peak_mib": peak}
    if fp is not None:
        row["kl"] = kl_to_fp(model, fp, held_out, device)
    if "fitting" in metrics:
        row["fit"] = summary(metrics["fitting"])
    return row


def markdown(rows: list[dict]) -> str:
    def cells(r: dict) -> list[str]:
        fit = r.get("fit") or {}
        loss = f"{fit['first_loss']:.4f} → {fit['last_loss']:.4f}" if fit.get("first_loss") is not None else ""
        sps = f"{fit['steps_per_s']:.3f}" if fit.get("steps_per_s") else ""
        kl = f"{r['kl']:.5f}" if "kl" in r else ""
        return [r["recipe"], f"{r['ppl']:.3f}", kl, f"{r['quantize_s']:.1f}", f"{r['peak_mib']:.0f}", sps, loss]

    return markdown_table(["recipe", "ppl", "KL to FP", "quantize s", "peak MiB", "fit steps/s", "loss first → last"],
                          [cells(r) for r in rows])


SCALE_CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
a = json.loads(sys.argv[1])
from transformers import LlamaConfig, LlamaForCausalLM
from orthoquant import load_recipe
from orthoquant.fitting import fit_transforms
from orthoquant.models.loading import InMemorySource
from orthoquant.models.generic import spec_for
from orthoquant.pipeline import make_plan, prepare_model
config = LlamaConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                     num_hidden_layers=a["layers"], num_attention_heads=a["hidden"] // 64,
                     num_key_value_heads=a["hidden"] // 192, max_position_embeddings=4096, tie_word_embeddings=False,
                     architectures=["LlamaForCausalLM"])
from orthoquant.device import use_mmap_for_large_blocks
use_mmap_for_large_blocks()  # as the CLI does before building a model
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
recipe = load_recipe(a["recipe"], a["sets"])
spec, cpu = spec_for(model.config), torch.device("cpu")
plan = make_plan(model, spec, recipe)
prepare_model(model, spec, InMemorySource(), cpu, plan)
windows = torch.randint(0, a["vocab"], (a["windows"], a["seqlen"]), generator=torch.Generator().manual_seed(0))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here: the model's own build peak is not the fit's
report = fit_transforms(model, spec, recipe, plan, InMemorySource(), windows, cpu)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
params = sum(p.numel() for p in model.parameters())
print("RESULT " + json.dumps({"hwm": int(hwm) * 1024, "weight_bytes": weight_bytes,
                              "steps_per_s": report.get("steps_per_s"), "params": params}))
"""


def scale_case(code: Path, layers: int, steps: int, args, offload: str = "none") -> dict:
    """One fit in a fresh process with the package at ``code``; its peak RSS and speed."""
    import subprocess

    sets = [f"fitting.steps={steps}", f"fitting.batch_size={args.batch_size}", f"fitting.grad_accum={args.grad_accum}",
            "fitting.qsur_samples=0", "fitting.top_k=1000", "fitting.checkpoint_every=0"]
    if name_has_eval(code):  # the held-out loss is extra work the code before had no counterpart of
        sets.append("fitting.eval_samples=0")
    if offload != "none":
        sets.append(f"fitting.offload={offload}")
    spec = dict(vocab=32768, hidden=768, intermediate=2048, layers=layers, recipe=args.scale_recipe, sets=sets,
                windows=args.batch_size * args.grad_accum * 2, seqlen=args.seqlen)
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCALE_CHILD, json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=str(code))
    if proc.returncode:
        raise RuntimeError(f"fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])


def name_has_eval(code: Path) -> bool:
    """Whether the package at ``code`` has ``fitting.eval_samples`` (its schema moved out of config.py since)."""
    return any("eval_samples" in f.read_text() for f in (code / "orthoquant").rglob("*.py"))


def export_revision(rev: str, into: Path) -> Path:
    """The package as of git revision ``rev``, extracted under ``into``."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "orthoquant"], capture_output=True, check=True)
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def scale_main(args) -> None:
    here = Path(__file__).resolve().parents[1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        after = export_revision(args.after, Path(tmp) / "after") if args.after else here
        versions = [("after", after)] + ([("before", export_revision(args.before, Path(tmp) / "before"))]
                                         if args.before else [])
        cases = [(name, code, "none") for name, code in versions] + [("after", after, "cpu")]
        for layers in [int(n) for n in args.layers.split(",")]:
            for name, code, offload in cases:
                base = scale_case(code, layers, 0, args, offload)
                fit = scale_case(code, layers, args.steps, args, offload)
                rows.append({"code": name, "offload": offload, "layers": layers, "params": fit["params"],
                             "weight_mib": fit["weight_bytes"] / 2**20, "base_mib": base["hwm"] / 2**20,
                             "fit_mib": fit["hwm"] / 2**20, "extra_mib": (fit["hwm"] - base["hwm"]) / 2**20,
                             "ratio": (fit["hwm"] - base["hwm"]) / fit["weight_bytes"],
                             "steps_per_s": fit["steps_per_s"]})
                print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(
        ["code", "offload", "layers", "params", "weights MiB", "fit − no-fit peak MiB", "ratio", "steps/s"],
        [[r["code"], r["offload"], str(r["layers"]), f"{r['params'] / 1e6:.1f}M", f"{r['weight_mib']:.0f}",
          f"{r['extra_mib']:.0f}", f"{r['ratio']:.2f}", f"{r['steps_per_s']:.4f}"] for r in rows])
    publish(table, rows, args)


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
    parser.add_argument("--fit-data", action=argparse.BooleanOptionalAction, default=True,
                        help="fit on every packed window of the train text (off: on the calibration windows)")
    parser.add_argument("--scale", action="store_true", help="fit memory/speed versus depth (see above)")
    parser.add_argument("--before", default=None, help="--scale: also run the package at this git revision")
    parser.add_argument("--after", default=None, help="--scale: the package at this git revision instead of the "
                                                         "working tree (edits during the run cannot leak in)")
    parser.add_argument("--layers", default="2,4,8", help="--scale: depths")
    parser.add_argument("--scale-recipe", default="ostquant-w4a4kv4")
    parser.add_argument("--batch-size", type=int, default=2, help="--scale: sequences per micro-batch")
    parser.add_argument("--seqlen-scale", dest="seqlen_scale", type=int, default=256)
    args = parser.parse_args()
    if args.scale:
        args.seqlen = args.seqlen_scale
        args.steps, args.grad_accum = args.steps or 2, args.grad_accum or 2
        return scale_main(args)
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
    # the fit's own data, as the presets' (every packed window of the train text), not GPTQ's windows
    fit_windows = fitting_windows(tokenizer, str(corpus / "train.txt"), 0, args.seqlen) if args.fit_data else None
    from transformers import AutoModelForCausalLM

    fp = log_probs(AutoModelForCausalLM.from_pretrained(args.model).to(device), held_out, device)
    rows = []
    for name in args.recipes.split(","):
        rows.append(run_one(name, args, calib, held_out, device, fit_windows, fp))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    publish(table, rows, args)


if __name__ == "__main__":
    main()
