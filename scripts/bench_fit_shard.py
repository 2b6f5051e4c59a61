"""Memory per process of a learned-transform fit under ``torchrun --nproc-per-node P`` (gloo, CPU):
the frozen decoder layers are sharded as they are read, so each process holds ≈ 1/P of them.

The random Llama of ``bench_fit.py --scale`` (hidden 768, intermediate 2048, vocabulary 32768, float32:
100.7M parameters at 8 layers, half of them embedding + lm_head) is saved as safetensors and fitted with
``ostquant-w4a4kv4`` (KLT init: it reads every layer) as ``orthoquant quantize`` streams it
(``open_model`` → ``prepare_model`` → ``fit_transforms``), ``--steps`` steps of one sequence per process,
in a fresh launch per case, for P = 1 and ``--processes``.

Each process measures from the point where its process group is up and its imports are done (its RSS
then is the fixed overhead of Python, torch, transformers and gloo, left out of every number) and
resets its high-water mark (VmHWM) at the end of each phase of the fit:

- ``rest``: ``prepare_model`` (embedding, final norm and lm_head read whole, the norm folded into the
  head in float64, in row blocks since d4df08d);
- ``load``: ``prepare_session`` (since d418a3f embedding and lm_head sharded first; each decoder layer
  read, norm-folded and sharded or kept; the KLT init, which gathers each layer once more);
- ``train``: the fit steps;
- ``deploy``: the fit's layers released and the learned residual folded into embedding and lm_head
  (float64; process 0 only);
- ``end``: what follows until the fit returns (on the other processes: releasing their layers).

``held`` is the RSS after ``load`` minus the RSS after ``rest``, over the decoder layers' bytes: the share
of the layers a process keeps (≈ 1 for one process, ≈ 1/P sharded; where the embedding and lm_head are
sharded in ``load`` too, the (1 − 1/P) of them freed there comes off it). ``load peak`` and ``train peak`` are
those phases' high-water marks above the RSS after ``rest``, over the layers' bytes; ``peak ÷ weights``
is the whole run's highest phase over all weight bytes, ``fit peak ÷ weights`` the same over the fit's own
phases (load and train, embedding and lm_head included), and ``fit overhead`` that peak minus 1/P of the
weights, in MiB: what a process holds beyond its share (activations, the logits of the loss, one gathered
layer, the transforms, and whatever is not sharded).

``--vocab`` sets the vocabulary: the default gives the embedding and lm_head a third of the weights at 16
layers; ``--vocab 9728`` gives them Llama-3-8B's share (13%) at 16 layers. Before d418a3f the embedding and
lm_head were held whole by every process, and before d4df08d their folds made whole float64 copies.

    python scripts/bench_fit_shard.py --layers 16 --after HEAD --before acac9f7 --out runs/bench_fit_shard.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import markdown_table, publish  # first: orthoquant on the path
from bench_fit import export_revision

CHILD = r"""
import json, os, sys, torch
torch.set_num_threads(1)
a = json.loads(sys.argv[1])
from orthoquant import load_recipe
import orthoquant.fitting.fit as fit
from orthoquant.fitting.distributed import init_from_launch
from orthoquant.models.loading import open_model
from orthoquant.pipeline import make_plan, prepare_model
import torch.distributed.fsdp  # noqa: F401  (imported before the measurement: code, not the fit's memory)
cpu = torch.device("cpu")
recipe = load_recipe("ostquant-w4a4kv4", a["sets"])
init_from_launch(recipe, cpu)
def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
phases = {}
def phase_end(name):
    phases[name] = {"rss": status("VmRSS") - base, "peak": status("VmHWM") - base}
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on: the next phase's own
def timed_phase(name, fn):
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        phase_end(name)
        return out
    return run
for name, attr in (("load", "prepare_session"), ("train", "train"), ("deploy", "deploy")):
    setattr(fit, attr, timed_phase(name, getattr(fit, attr)))  # fit_transforms calls them by module name
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
model, _, spec, source, _ = open_model(a["model"], "float32", cpu)
plan = make_plan(model, spec, recipe)
prepare_model(model, spec, source, cpu, plan)
phase_end("rest")
windows = torch.randint(0, a["vocab"], (4, a["seqlen"]), generator=torch.Generator().manual_seed(0))
report = fit.fit_transforms(model, spec, recipe, plan, source, windows, cpu)
phase_end("end")
rank = int(os.environ.get("RANK", "0"))
with open(os.path.join(a["results"], f"rank{rank}.json"), "w") as f:  # not stdout: the ranks' lines interleave
    json.dump({"rank": rank, "base": base, "phases": phases, "steps_per_s": report.get("steps_per_s")}, f)
"""

VOCAB, HIDDEN, INTERMEDIATE = 32768, 768, 2048


def save_model(folder: Path, layers: int, vocab: int = VOCAB) -> dict:
    """The bench's random Llama with ``layers`` layers (and a small tokenizer, which loading needs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orthoquant.demo_data import train_tokenizer

    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=layers, num_attention_heads=HIDDEN // 64,
                         num_key_value_heads=HIDDEN // 192, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    train_tokenizer([" ".join(f"word{i % 89}" for i in range(5000))], 300, folder)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." not in n)
    return {"params": sum(p.numel() for p in model.parameters()), "weight_bytes": weights, "rest_bytes": rest,
            "layers_bytes": weights - rest}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(code: Path, model: Path, processes: int, args) -> list[dict]:
    """One fit under torchrun with the package at ``code``: each process's phases."""
    sets = [f"fitting.steps={args.steps}", "fitting.batch_size=1", "fitting.grad_accum=1", "fitting.qsur_samples=0",
            "fitting.eval_samples=0", "fitting.checkpoint_every=0"]
    results = Path(tempfile.mkdtemp(prefix="ranks-"))
    spec = {"model": str(model), "sets": sets, "vocab": args.vocab, "seqlen": args.seqlen, "results": str(results)}
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--nproc-per-node", str(processes), "--master-port", str(free_port()),
           "--no-python", sys.executable, "-c", CHILD, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(code))
    if proc.returncode:
        raise RuntimeError(f"fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(processes)]
    shutil.rmtree(results)
    return ranks


def summary(ranks: list[dict], sizes: dict) -> dict:
    """The measures of the module docstring, for the process where each is largest."""
    def worst(fn) -> float:
        return max(fn(r["phases"]) for r in ranks)

    layers, weights = sizes["layers_bytes"], sizes["weight_bytes"]
    fit_peak = worst(lambda p: max(p["load"]["peak"], p["train"]["peak"]))
    return {"held": worst(lambda p: p["load"]["rss"] - p["rest"]["rss"]) / layers,
            "load_peak": worst(lambda p: p["load"]["peak"] - p["rest"]["rss"]) / layers,
            "train_peak": worst(lambda p: p["train"]["peak"] - p["rest"]["rss"]) / layers,
            "peak": worst(lambda p: max(v["peak"] for v in p.values())) / sizes["weight_bytes"],
            "peak_phase": max(ranks[0]["phases"], key=lambda k: ranks[0]["phases"][k]["peak"]),
            "rest_mib": worst(lambda p: p["rest"]["rss"]) / 2**20,
            "rest_peak_mib": worst(lambda p: p["rest"]["peak"]) / 2**20,
            "deploy_peak_mib": worst(lambda p: p.get("deploy", {"peak": 0})["peak"]) / 2**20,
            "steps_per_s": min(r["steps_per_s"] or 0.0 for r in ranks),
            "fit_peak": fit_peak / weights, "fit_overhead_mib": (fit_peak - weights / len(ranks)) / 2**20}


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["code", "processes", "layers", "weights MiB (layers)", "held ÷ layers", "load peak ÷ layers",
         "train peak ÷ layers", "peak ÷ weights (phase)", "fit peak ÷ weights",
         "fit overhead MiB", "rest MiB (its peak)", "deploy peak MiB", "steps/s"],
        [[r["code"], str(r["processes"]), str(r["layers"]),
          f"{r['weight_bytes'] / 2**20:.0f} ({r['layers_bytes'] / 2**20:.0f})", f"{r['held']:.2f}",
          f"{r['load_peak']:.2f}", f"{r['train_peak']:.2f}", f"{r['peak']:.2f} ({r['peak_phase']})",
          f"{r['fit_peak']:.2f}", f"{r['fit_overhead_mib']:.0f}",
          f"{r['rest_mib']:.0f} ({r['rest_peak_mib']:.0f})", f"{r['deploy_peak_mib']:.0f}", f"{r['steps_per_s']:.4f}"]
         for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="torchrun --nproc-per-node (against 1)")
    parser.add_argument("--layers", default="8", help="depths, comma-separated")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary (9728: Llama-3-8B's embedding + head "
                                                                  "share of the weights at 16 layers)")
    parser.add_argument("--after", default=None, help="the package at this git revision instead of the working tree "
                                                         "(edits during the run cannot leak in)")
    parser.add_argument("--before", default=None, help="also run the package at this git revision")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    here, rows = Path(__file__).resolve().parents[1], []
    with tempfile.TemporaryDirectory() as tmp:
        versions = [("after", export_revision(args.after, Path(tmp) / "after") if args.after else here)]
        if args.before:
            versions.append(("before", export_revision(args.before, Path(tmp) / "before")))
        for layers in [int(n) for n in args.layers.split(",")]:
            sizes = save_model(Path(tmp) / f"llama-{layers}", layers, args.vocab)
            for (name, code), processes in ((v, p) for v in versions for p in (1, args.processes)):
                ranks = launch(code, Path(tmp) / f"llama-{layers}", processes, args)
                rows.append({"code": name, "processes": processes, "layers": layers, "vocab": args.vocab, **sizes,
                             **summary(ranks, sizes), "ranks": ranks})
                print(json.dumps(rows[-1]), flush=True)
    publish(table(rows), rows, args)


if __name__ == "__main__":
    main()
