#!/usr/bin/env python
"""Mixture of experts: peak memory of `orthoquant quantize` versus depth, and GPTQ time per MoE layer
against a dense layer of the same active parameters.

- ``memory``: a random Qwen3-MoE (``--experts`` experts of width ``--expert-width``, top ``--top-k``) of
  2, 4 and 8 layers is saved and quantized with GPTQ W4 in a fresh process, measured exactly as
  ``bench_memory.py`` measures dense Llamas (VmHWM, median of ``--repeats``). The runner holds one decoder
  layer (all its experts) at a time, so the peak must stay flat while the model grows.
- ``gptq``: the same MoE layer and a dense Qwen3 layer whose MLP has the MoE's active width
  (top_k · expert width: the same parameters touch each token) are quantized in memory on the same
  calibration tokens; a layer's time is the runner's (calibration passes, Hessians, GPTQ of every linear),
  the median over layers, best of ``--repeats`` (the two models alternate, so both see the same load).
  The MoE solves ``experts · 3`` linears on ~top_k/experts of the tokens each, the dense layer 3 on all.

    python scripts/bench_moe.py [--mode memory,gptq] [--layers 2,4,8] [--out runs/bench_moe.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

from _bench import calibration_text, markdown_table, timed  # first: orthoquant on the path
from bench_memory import peak_rss_mb  # the same measurement as the dense rows


def moe_config(args, layers: int, vocab: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=layers,
                          num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128, head_dim=64,
                          num_experts=args.experts, num_experts_per_tok=args.top_k,
                          moe_intermediate_size=args.expert_width, intermediate_size=args.expert_width,
                          max_position_embeddings=512, tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"])


def dense_config(args, layers: int, vocab: int):
    """Qwen3 with the MoE's attention and an MLP as wide as the experts one token passes through."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=layers,
                       num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128, head_dim=64,
                       intermediate_size=args.top_k * args.expert_width, max_position_embeddings=512,
                       tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])


def build(config):
    import torch
    from transformers import AutoModelForCausalLM

    from orthoquant.models.tiny import randomize_

    torch.manual_seed(0)
    return randomize_(AutoModelForCausalLM.from_config(config)).eval()


def memory_rows(args, tmp: Path, calib: Path, tokenizer) -> list[dict]:
    rows = []
    for n in args.layers:
        folder = tmp / f"moe{n}"
        model = build(moe_config(args, n, len(tokenizer)))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
        del model
        peaks = sorted(peak_rss_mb(folder, calib, tmp / f"run{n}-{r}") for r in range(args.repeats))
        rows.append({"layers": n, "model_mb": model_mb, "peak_rss_mb": peaks[len(peaks) // 2], "peaks_mb": peaks})
        print(f"MoE layers {n}: model {model_mb:.0f} MB, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    return rows


def layer_seconds(config, windows, out: Path) -> list[float]:
    from orthoquant.recipes import load_recipe
    from orthoquant.pipeline import quantize

    recipe = load_recipe("gptq-w4a16", ["weights.clip_search=false"])
    quantize(build(config), recipe, windows, out=out)
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    return [metrics[str(i)]["seconds"] for i in range(config.num_hidden_layers)]


def gptq_rows(args, tmp: Path, windows, vocab: int) -> list[dict]:
    configs = {"MoE": moe_config(args, args.gptq_layers, vocab), "dense, same active parameters": dense_config(
        args, args.gptq_layers, vocab)}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.repeats):
        for name, config in configs.items():
            seconds = layer_seconds(config, windows, tmp / f"gptq-{len(times[name])}-{r}-{name[:3]}")
            times[name].append(statistics.median(seconds))
    rows = []
    for name, config in configs.items():
        model = build(config)
        layer = model.model.layers[0]
        total = sum(p.numel() for p in layer.parameters())
        active = total - (0 if name != "MoE" else sum(p.numel() for p in layer.mlp.experts.parameters())
                          * (1 - args.top_k / args.experts))
        rows.append({"layer": name, "params": total, "active_params": int(active), "seconds": min(times[name]),
                     "runs": times[name]})
    return rows


def memory_table(rows: list[dict]) -> str:
    base = rows[0]["peak_rss_mb"]
    return markdown_table(
        ["MoE layers", "model (MB, fp32)", "median peak RSS (MB)", "all runs", "peak / peak at fewest layers"],
        [[str(r["layers"]), f"{r['model_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
          ", ".join(f"{p:.0f}" for p in r["peaks_mb"]), f"{r['peak_rss_mb'] / base:.2f}"] for r in rows])


def gptq_table(rows: list[dict]) -> str:
    dense = rows[-1]["seconds"]
    return markdown_table(
        ["layer", "parameters", "active per token", "GPTQ s per layer (best median)", "all runs", "vs dense"],
        [[r["layer"], f"{r['params'] / 1e6:.2f} M", f"{r['active_params'] / 1e6:.2f} M", f"{r['seconds']:.2f}",
          ", ".join(f"{s:.2f}" for s in r["runs"]), f"{r['seconds'] / dense:.2f}×"] for r in rows])


def markdown(result: dict) -> str:
    """The tables of the modes run, memory first, a blank line before the GPTQ table."""
    lines = [memory_table(result["memory"])] if "memory" in result else []
    if "gptq" in result:
        lines += ["", gptq_table(result["gptq"])]
    return "\n".join(lines)


def run_modes(args, modes: set[str]) -> dict:
    """The rows of each mode in ``modes``, on one calibration text and tokenizer."""
    from orthoquant.data import calibration_windows

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib, tokenizer = calibration_text(tmp)
        if "memory" in modes:
            result["memory"] = memory_rows(args, tmp, calib, tokenizer)
        if "gptq" in modes:
            windows = calibration_windows(tokenizer, str(calib), 8, 128, 0)
            result["gptq"] = gptq_rows(args, tmp, windows, len(tokenizer))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="memory,gptq")
    p.add_argument("--layers", default="2,4,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-width", type=int, default=256)
    p.add_argument("--gptq-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("runs/bench_moe.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the starved-expert warnings of small calibration sets
    measured, seconds = timed(lambda: run_modes(args, set(args.mode.split(","))))
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"}, **measured, "seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
