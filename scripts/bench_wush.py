#!/usr/bin/env python
"""Benchmark WUSH against the block-Hadamard baseline and no transform, at W4A4 MXFP4, NVFP4 and INT4-g32.

Three parts, each for transform ∈ {none, blockhad, wush} × solver ∈ {rtn, gptq} (solver names ``rtn``,
``blockhad-gptq``, ``wush-gptq``, ...: the presets differ by that one field):

- ``synthetic``: layers out x in with correlated activations (rank-64 factor model, log-normal channel
  scales, 1% of channels 20x louder). H = E[x xᵀ] from calibration tokens, the error
  ``‖Q_a(x T) Q_w(W T⁻¹)ᵀ − x Wᵀ‖² / ‖x Wᵀ‖²`` on other tokens;
- ``real``: the same error on every linear of the model's decoder layers, inputs of the full-precision
  model (norm gains folded, as the pipeline does), mean over linears;
- ``ppl``: held-out perplexity of the model quantized with each setting.

Timing (synthetic and real layers): ``build_s`` builds every WUSH block of the layer at once (as RTN
does), ``gptq_s`` is plain GPTQ, ``wush_gptq_s`` WUSH-GPTQ, of which ``build_in_gptq_s`` builds the
per-block transforms. The model is the demo model (``~/.cache/orthoquant/demo-llama``) when it is
built, else the test-size model trained here in under a minute.

    python scripts/bench_wush.py --sizes 1024x1024,1024x2816,2816x1024 --out runs/bench_wush
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from _bench import factor_layer, markdown_table, second_moment, timed  # first: orthoquant on the path
from orthoquant import load_recipe, quantize
from orthoquant.config import QuantSpec, SolverSpec
from orthoquant.data import calibration_windows, evaluation_tokens, perplexity_windows
from orthoquant.demo import build_test_model, cache_dir
from orthoquant.evaluate.ppl import perplexity
from orthoquant.formats import make_format
from orthoquant.models.generic import spec_for
from orthoquant.models.surgery import fold_all_norms, layers_of, linears_of
from orthoquant.solvers import SOLVERS
from orthoquant.solvers.block_transformed import BlockRule, solve_gptq_blocks
from orthoquant.transforms.wush import wush_blocks

log = logging.getLogger("bench_wush")
CPU = torch.device("cpu")
FORMATS = {"mxfp4": QuantSpec(format="mxfp4", bits=4, group_size=32),
           "nvfp4": QuantSpec(format="nvfp4", bits=4, group_size=16),
           "int4-g32": QuantSpec(format="int", bits=4, symmetric=True, group_size=32)}
PRESETS = {"mxfp4": "wush-mxfp4", "nvfp4": "wush-nvfp4", "int4-g32": "wush-int4-g32"}
TRANSFORMS = {"none": "", "blockhad": "blockhad-", "wush": "wush-"}
METHODS = ("rtn", "gptq")
SETTINGS = [(t, m) for m in METHODS for t in TRANSFORMS]


def output_error(W: torch.Tensor, H: torch.Tensor, X: torch.Tensor, fmt, solver: str) -> tuple[float, float]:
    """(relative W4A4 output error on X, solve seconds) of one layer."""
    r, seconds = timed(lambda: SOLVERS.get(solver).solve(W, H, fmt, SolverSpec(name=solver)))
    x = X if r.input_transform is None else r.input_transform.forward(X)
    y = X @ W.T
    return float(((fmt.fake_quant(x) @ r.weight.T - y).norm() / y.norm()) ** 2), seconds


def transform_timing(W: torch.Tensor, H: torch.Tensor, fmt) -> dict[str, float]:
    """Seconds to build every WUSH block at once, of plain GPTQ, of WUSH-GPTQ and of its block builds."""
    d, spent = fmt.group_size, []

    def build(*args):
        T, s = timed(lambda: wush_blocks(*args))
        spent.append(s)
        return T

    counted = BlockRule(build, orthogonal=False, needs_hessian=True)
    solve_gptq_blocks(W[:8], H, fmt, SolverSpec(), counted)  # warm-up: first calls load kernels
    spent.clear()
    _, build_s = timed(lambda: wush_blocks(W, H, d))
    _, gptq_s = timed(lambda: SOLVERS.get("gptq").solve(W, H, fmt, SolverSpec(name="gptq")))
    _, wush_gptq_s = timed(lambda: solve_gptq_blocks(W, H, fmt, SolverSpec(), counted))
    return dict(build_s=build_s, gptq_s=gptq_s, wush_gptq_s=wush_gptq_s, build_in_gptq_s=sum(spent))


def layer_rows(W: torch.Tensor, H: torch.Tensor, X: torch.Tensor) -> dict[str, dict]:
    """Errors and solve times of every (format, transform, method), and the timing of each format."""
    out = {}
    for fname, spec in FORMATS.items():
        fmt = make_format(spec)
        row = {f"{t}-{m}": output_error(W, H, X, fmt, TRANSFORMS[t] + m) for t, m in SETTINGS}
        out[fname] = {"error": {k: e for k, (e, _) in row.items()}, "seconds": {k: s for k, (_, s) in row.items()},
                      "timing": transform_timing(W, H, fmt)}
    return out


def synthetic(sizes: list[tuple[int, int]], tokens: int) -> dict[str, dict]:
    results = {}
    for m, n in sizes:
        W, x = factor_layer(m, n, 2 * tokens, seed=m + n)
        log.info("synthetic layer %dx%d", m, n)
        results[f"{m}x{n}"] = layer_rows(W, second_moment(x[:tokens]), x[tokens:])
    return results


@torch.no_grad()
def captured_inputs(model, windows: torch.Tensor, max_tokens: int) -> dict[str, torch.Tensor]:
    """Inputs (≤ max_tokens, in) of every decoder-layer linear over ``windows``."""
    arch = spec_for(model.config)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(layers_of(model, arch)):
        for role, lin in linears_of(layer, arch).items():
            name = f"{i}.{role}"
            hooks.append(lin.register_forward_pre_hook(
                lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    model(windows)
    for h in hooks:
        h.remove()
    return {name: torch.cat(xs)[:max_tokens] for name, xs in seen.items()}


def real_layers(model_dir: Path, calib: torch.Tensor, held_out: torch.Tensor, max_tokens: int) -> dict:
    """Mean errors over all linears of the model, and the timing summed over them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    arch = spec_for(model.config)
    fold_all_norms(model, arch)  # the pipeline solves linears with the norm gains folded in
    H_in, X_in = captured_inputs(model, calib, 10**9), captured_inputs(model, held_out, max_tokens)
    weights = {f"{i}.{r}": lin.weight.detach().float() for i, layer in enumerate(layers_of(model, arch))
               for r, lin in linears_of(layer, arch).items()}
    per = {name: layer_rows(W, second_moment(H_in[name]), X_in[name]) for name, W in weights.items()}
    summary = {}
    for fname in FORMATS:
        rows = [per[name][fname] for name in per]
        summary[fname] = {"error": {k: sum(r["error"][k] for r in rows) / len(rows) for k in rows[0]["error"]},
                          "timing": {k: sum(r["timing"][k] for r in rows) for k in rows[0]["timing"]}}
    return summary


def perplexities(model_dir: Path, calib: torch.Tensor, held_out: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir)  # noqa: E731
    results = {"fp": perplexity(load(), held_out, CPU, batch_size=8)}
    for fname, preset in PRESETS.items():
        for t, m in SETTINGS:
            recipe = load_recipe(preset, [f"solver.name={TRANSFORMS[t] + m}", "calibration.batch_size=8"])
            model, seconds = timed(lambda: quantize(load(), recipe, calib))
            results[f"{fname}/{t}-{m}"] = perplexity(model, held_out, CPU, batch_size=8)
            log.info("%s %s-%s: ppl %.3f (%.1f s)", fname, t, m, results[f"{fname}/{t}-{m}"], seconds)
    return results


def error_table(title: str, rows: dict[str, dict]) -> str:
    def cells(layer: str, fname: str, r: dict) -> list[str]:
        tm = r["timing"]
        return ([layer, fname] + [f"{r['error'][f'{t}-{m}']:.4g}" for t, m in SETTINGS]
                + [f"{tm['build_s'] / tm['gptq_s']:.3f}", f"{tm['wush_gptq_s'] / tm['gptq_s']:.2f}"])

    return markdown_table([title, "format", *(f"{t} {m}" for t, m in SETTINGS), "build / GPTQ", "WUSH-GPTQ / GPTQ"],
                          [cells(layer, fname, r) for layer, formats in rows.items() for fname, r in formats.items()])


def ppl_table(ppl: dict, model: str) -> str:
    return markdown_table([f"{model} (FP {ppl['fp']:.3f})", *(f"{t} {m}" for t, m in SETTINGS)],
                          [[fname] + [f"{ppl[f'{fname}/{t}-{m}']:.3f}" for t, m in SETTINGS] for fname in FORMATS])


def model_and_corpus(work: Path) -> tuple[Path, Path, str]:
    demo = cache_dir() / "demo-llama"
    if (demo / ".complete").is_file():
        return demo, cache_dir() / "demo-corpus", "demo-llama"
    log.info("no demo model in %s: training the test-size model", demo)
    model = build_test_model(work)
    return model, work / "corpus", "test model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024x1024,1024x2816,2816x1024", help="synthetic layers out x in")
    p.add_argument("--tokens", type=int, default=4096, help="synthetic calibration (and test) tokens")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--max-windows", type=int, default=64, help="held-out windows for perplexity")
    p.add_argument("--layer-tokens", type=int, default=4096, help="held-out tokens per real layer")
    p.add_argument("--out", type=Path, default=Path("runs/bench_wush"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    results = {"synthetic": synthetic([tuple(map(int, s.split("x"))) for s in args.sizes.split(",")], args.tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoTokenizer

        model_dir, corpus, label = model_and_corpus(Path(tmp))
        tok = AutoTokenizer.from_pretrained(model_dir)
        calib = calibration_windows(tok, str(corpus / "train.txt"), args.nsamples, args.seqlen, seed=0)
        held = perplexity_windows(evaluation_tokens(tok, str(corpus / "valid.txt"), args.seqlen), args.seqlen)
        held = held[: args.max_windows]
        results["model"] = label
        results["real"] = real_layers(model_dir, calib, held, args.layer_tokens)
        results["ppl"] = perplexities(model_dir, calib, held)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_wush.json").write_text(json.dumps(results, indent=2))
    md = "\n\n".join([error_table("synthetic layer", results["synthetic"]),
                      error_table(f"{label}, mean over linears", {"all": results["real"]}),
                      ppl_table(results["ppl"], label)])
    (args.out / "bench_wush.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
