"""Benchmark QuIP#: E8P lattice codebooks against integer formats at 2, 3 and 4 bits.

Three parts, written to ``--out`` as JSON and printed as markdown tables:

1. **Synthetic layers** (``--sizes``): correlated activations with outlier channels, H = E[x xᵀ] in
   closed form (:func:`_bench.synthetic_layer`). For each bit width and method: the relative
   proxy loss ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` and the encode speed, weights per second of one solve.
2. **Real layers**: the linears of one decoder layer of the demo model, with H from its own
   calibration text (skipped when the demo model is not built).
3. **Perplexity** of the demo model quantized with the QuIP# presets and integer baselines, on the
   held-out ``demo-corpus/test.txt`` (seqlen 256).

Methods (INT: asymmetric per-channel with MSE clip search; E8P: one RMS scale per matrix):
``int-rtn``, ``int-gptq``, ``rht+int-gptq`` (quip-gptq), ``rht+e8p-rtn`` (quip-rtn),
``rht+e8p-ldlq`` (quip-ldlq), ``rht+e8p-ldlq-tune`` (quip-ldlq-tune, 5 refinement passes).

    python scripts/bench_quip.py                      # CPU defaults, about 15 minutes on 2 cores
    python scripts/bench_quip.py --sizes 512x512 --no-ppl
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import torch

from _bench import markdown_table, synthetic_layer, timed  # first: orthoquant on the path
from orthoquant.config import QuantSpec, SolverSpec
from orthoquant.data.windows import calibration_windows
from orthoquant.demo import cache_dir
from orthoquant.evaluate.run_eval import evaluate
from orthoquant.formats import make_format
from orthoquant.pipeline import quantize_pretrained
from orthoquant.recipes import load_recipe
from orthoquant.progress import setup_logging, setup_threads
from orthoquant.solvers import SOLVERS, proxy_loss
from orthoquant.stats import collect_input_stats

log = logging.getLogger("bench_quip")
BITS = (2, 3, 4)
METHODS = {  # label -> (solver, format)
    "int-rtn": ("rtn", "int"), "int-gptq": ("gptq", "int"), "rht+int-gptq": ("quip-gptq", "int"),
    "rht+e8p-rtn": ("quip-rtn", "e8p"), "rht+e8p-ldlq": ("quip-ldlq", "e8p"),
    "rht+e8p-ldlq-tune": ("quip-ldlq-tune", "e8p"),
}
# (label, preset, --set overrides) of the perplexity table
PPL_RUNS = (
    ("rtn-w4a16", "rtn-w4a16", ()), ("gptq-w4a16", "gptq-w4a16", ()), ("quip-int4", "quip-int4", ()),
    ("quip-e8p-4bit", "quip-e8p-4bit", ()), ("gptq-w3a16 (asym, per channel)", "gptq-w4a16",
                                              ("weights.bits=3", "weights.symmetric=false")),
    ("gptq-w3a16-g128", "gptq-w3a16-g128", ()), ("quip-e8p-3bit", "quip-e8p-3bit", ()),
    ("gptq-w2a16 (asym, per channel)", "gptq-w4a16", ("weights.bits=2", "weights.symmetric=false")),
    ("quip-e8p-2bit, no refinement", "quip-e8p-2bit", ("solver.name=quip-ldlq",)),
    ("quip-e8p-2bit", "quip-e8p-2bit", ()),
)


def quant_spec(fmt: str, bits: int) -> QuantSpec:
    if fmt == "e8p":
        return QuantSpec(format="e8p", bits=bits, group_size=0)
    return QuantSpec(bits=bits, symmetric=False, clip_search=True)


def bench_layer(name: str, W: torch.Tensor, H: torch.Tensor) -> list[dict]:
    """Every method at every bit width on one layer: relative proxy loss and weights per second."""
    energy = proxy_loss(W, torch.zeros_like(W), H)
    rows = []
    for bits in BITS:
        for label, (solver, fmt) in METHODS.items():
            spec, fmt_obj = SolverSpec(name=solver), make_format(quant_spec(fmt, bits))
            res, seconds = timed(lambda: SOLVERS.get(solver).solve(W, H, fmt_obj, spec))
            rows.append(dict(layer=name, bits=bits, method=label, rel_loss=res.loss / energy,
                             seconds=seconds, weights_per_s=W.numel() / seconds))
        log.info("%s: %d bits done", name, bits)
    return rows


def real_layers(model_dir: Path, nsamples: int, seqlen: int, index: int) -> dict[str, tuple]:
    """(W, H) of every linear of decoder layer ``index`` of the model, H from its calibration text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = calibration_windows(tokenizer, str(cache_dir() / "demo-corpus" / "train.txt"), nsamples, seqlen)
    layer = model.model.layers[index]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    with collect_input_stats(linears) as stats, torch.no_grad():
        for batch in windows.split(8):
            model(batch)
    return {f"layer{index}.{n}": (m.weight.detach().float(), stats[n].H) for n, m in linears.items()}


def perplexities(model_dir: Path, out: Path, nsamples: int, seqlen: int) -> list[dict]:
    """Held-out perplexity of the FP model and of every entry of :data:`PPL_RUNS`."""
    corpus, cpu = cache_dir() / "demo-corpus", torch.device("cpu")
    held_out = str(corpus / "test.txt")
    rows = [dict(run="FP (unquantized)", ppl=evaluate(str(model_dir), [held_out], seqlen, cpu)["ppl"]["test.txt"],
                 seconds=0.0)]
    for label, preset, sets in PPL_RUNS:
        overrides = [f"calibration.source={corpus / 'train.txt'}", f"calibration.nsamples={nsamples}",
                     f"calibration.seqlen={seqlen}", *sets]
        folder = out / "runs" / re.sub(r"[^A-Za-z0-9.-]+", "_", label)  # a finished run is reused as it is
        run, seconds = timed(lambda: quantize_pretrained(str(model_dir), load_recipe(preset, overrides), folder, cpu))
        ppl = evaluate(str(run.path), [held_out], seqlen, cpu)["ppl"]["test.txt"]
        rows.append(dict(run=label, ppl=ppl, seconds=seconds))
        log.info("%s: ppl %.3f (%.0f s)", label, ppl, seconds)
    return rows


def loss_table(rows: list[dict], layers: list[str]) -> str:
    """Markdown: one row per (layer, bits), one column per method, cells 'rel. loss (Mw/s)'."""
    cells = {(r["layer"], r["bits"], r["method"]): r for r in rows}
    return markdown_table(["layer", "bits", *METHODS], [
        [layer, str(bits)] + [f"{cells[layer, bits, m]['rel_loss']:.4f} "
                              f"({cells[layer, bits, m]['weights_per_s'] / 1e6:.2f})" for m in METHODS]
        for layer in layers for bits in BITS])


def ppl_table(rows: list[dict], seqlen: int) -> str:
    fp = rows[0]["ppl"]
    return markdown_table(["recipe", f"held-out ppl (seqlen {seqlen})", "vs FP", "quantize s"],
                          [[r["run"], f"{r['ppl']:.3f}", f"{r['ppl'] / fp - 1:+.2%}", f"{r['seconds']:.0f}"]
                           for r in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1024x1024,1024x3072,3072x1024", help="synthetic OUTxIN layers")
    p.add_argument("--model", type=Path, default=cache_dir() / "demo-llama")
    p.add_argument("--layer", type=int, default=1, help="decoder layer of the real-layer table")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--ppl", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=Path("runs/bench_quip"))
    args = p.parse_args()
    setup_logging()
    setup_threads()
    result = dict(meta=dict(threads=torch.get_num_threads(), torch=torch.__version__, sizes=args.sizes))
    layers = {f"synthetic {s}": synthetic_layer(*(int(v) for v in s.split("x")), "cpu") for s in args.sizes.split(",")}
    have_model = (args.model / "config.json").is_file()
    if have_model:
        layers.update(real_layers(args.model, args.nsamples, args.seqlen, args.layer))
    else:
        log.info("no demo model in %s (build it with scripts/make_demo_model.py): synthetic layers only", args.model)
    result["layers"] = [row for name, (W, H) in layers.items() for row in bench_layer(name, W, H)]
    text = ["## Relative proxy loss tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) (encode speed, M weights/s)", "",
            loss_table(result["layers"], list(layers))]
    if have_model and args.ppl:
        result["ppl"] = perplexities(args.model, args.out, args.nsamples, args.seqlen)
        text += ["", "## Demo model perplexity", "", ppl_table(result["ppl"], args.seqlen)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
