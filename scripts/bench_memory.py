#!/usr/bin/env python
"""Peak memory of `orthoquant quantize` versus model depth: it must stay flat.

For each depth a random Llama of that many layers is saved as safetensors, then quantized in a fresh
process whose peak is its VmHWM. The model grows linearly with depth; the runner holds one decoder
layer at a time, so peak RSS should not.

Not ru_maxrss: at exec Linux folds the pre-exec address space's peak (here this script's, which built
and saved the largest model so far) into the child's ru_maxrss, so it would grow with depth whatever
the quantizer does. VmHWM is the high-water mark of the child's own address space since exec.

    python scripts/bench_memory.py [--layers 2,4,8,16] [--hidden 1024] [--intermediate 2816] [--out runs/bench_memory.json]

The mixture-of-experts row (a tiny-expert Qwen3-MoE at 2, 4 and 8 layers, measured by this script's
:func:`peak_rss_mb`) is ``scripts/bench_moe.py --mode memory``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import resource, sys
from orthoquant.cli import main
code = main(sys.argv[1:])
status = {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith(("Vm", "Rss"))}
print("PEAK_KB", status["VmHWM"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print("STATUS", " ".join(f"{k}:{status[k]}" for k in ("RssAnon", "RssFile")))
sys.exit(code)
"""


def make_model(folder: Path, layers: int, hidden: int, intermediate: int, tokenizer) -> int:
    """Save a random Llama with ``layers`` layers; returns its parameter bytes (float32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) * 4


def peak_rss_mb(model: Path, calib: Path, out: Path) -> float:
    # GPTQ holds the most per layer (Hessians, inverse factors); the clip search only costs time
    cmd = [sys.executable, "-c", _CHILD, "quantize", str(model), "--recipe", "gptq-w4a16", "--set",
           "weights.clip_search=false", "--calib", str(calib), "--nsamples", "8", "--seqlen", "128",
           "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"quantize failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    hwm_kb, maxrss_kb = [l for l in proc.stdout.splitlines() if l.startswith("PEAK_KB")][-1].split()[1:]
    status = [l for l in proc.stdout.splitlines() if l.startswith("STATUS")][-1]
    print(f"  {model.name}: peak {int(hwm_kb) / 1024:.0f} MB (ru_maxrss, with this script's peak: "
          f"{int(maxrss_kb) / 1024:.0f} MB); at exit {status[7:]}", file=sys.stderr)
    return int(hwm_kb) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2,4,8,16")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--repeats", type=int, default=3, help="runs per depth; the median peak is reported")
    p.add_argument("--out", type=Path, default=Path("runs/bench_memory.json"))
    args = p.parse_args()
    from orthoquant.demo import train_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = " ".join(f"token{i % 97} word{i % 13}" for i in range(60000))
        calib = tmp / "calib.txt"
        calib.write_text(text)
        tokenizer = train_tokenizer([text], 320, None)
        for n in [int(x) for x in args.layers.split(",")]:
            model_bytes = make_model(tmp / f"m{n}", n, args.hidden, args.intermediate, tokenizer)
            peaks = sorted(peak_rss_mb(tmp / f"m{n}", calib, tmp / f"run{n}-{r}") for r in range(args.repeats))
            rss = peaks[len(peaks) // 2]
            rows.append({"layers": n, "model_mb": model_bytes / 2**20, "peak_rss_mb": rss, "peaks_mb": peaks})
            print(f"layers {n}: model {model_bytes / 2**20:.0f} MB, peak RSS {rss:.0f} MB", file=sys.stderr)
    base = rows[0]["peak_rss_mb"]
    lines = ["| layers | model (MB, fp32) | median peak RSS (MB) | all runs | peak / peak at fewest layers |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['layers']} | {r['model_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{', '.join(f'{p:.0f}' for p in r['peaks_mb'])} | {r['peak_rss_mb'] / base:.2f} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hidden": args.hidden, "intermediate": args.intermediate,
                                    "peak": "VmHWM of the quantize process", "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
