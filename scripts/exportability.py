#!/usr/bin/env python
"""The exportability matrix: every preset, quantized at its default settings (``scale_dtype: auto``) on a
tiny model (width 128, for group size 128) in each model dtype, and which export formats and ``--dtype``
values its run serves exactly, as recorded in run.json (:mod:`orthoquant.export.exportable`). Fitting
presets fit for a few steps only: fitting changes no scale dtype or layout, so exportability is the same.

    python scripts/exportability.py [--dtypes bfloat16,float16,float32] [--presets A,B] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from orthoquant import quantize
from orthoquant.recipes import load_recipe, preset_names
from orthoquant.device import DTYPES
from orthoquant.models.tiny import tiny_model
from orthoquant.progress import setup_threads

FORMATS = ("compressed-tensors", "gptq", "native")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUICK = ["calibration.batch_size=4"]
QUICK_FIT = ["fitting.steps=2", "fitting.qsur_samples=0", "fitting.checkpoint_every=0", "fitting.batch_size=2",
             "fitting.grad_accum=1"]


def exports_of(preset: str, dtype: torch.dtype, folder: Path) -> dict:
    """run.json's ``exports`` of ``preset`` quantized on a tiny llama in ``dtype``."""
    recipe = load_recipe(preset)
    recipe = recipe.with_overrides(QUICK + (QUICK_FIT if recipe.fitting is not None else []))
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", vocab_size=256, dtype=dtype, hidden_size=128, intermediate_size=256)
    quantize(model, recipe, windows, out=folder)
    return json.loads((folder / "run.json").read_text())["exports"]


def cell(entry: dict) -> str:
    """``bf16 fp16 fp32`` for the served dtypes, ``no`` (reason on the side) when none."""
    return " ".join(SHORT[d] for d in entry["dtypes"]) or "no"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="bfloat16,float16,float32", help="model dtypes, comma-separated")
    p.add_argument("--presets", default="", help="comma-separated subset (default: every preset)")
    p.add_argument("--json", type=Path, help="also write the matrix with every refusal's reason here")
    args = p.parse_args(argv)
    setup_threads()
    presets = args.presets.split(",") if args.presets else [n for n in preset_names() if load_recipe(n).weights]
    matrix = {}
    print("| preset | model dtype | " + " | ".join(FORMATS) + " |\n|---|---|" + "---|" * len(FORMATS), flush=True)
    for name in args.dtypes.split(","):
        for preset in presets:
            folder = Path(tempfile.mkdtemp(prefix="exportability-"))
            try:
                exports = exports_of(preset, DTYPES[name], folder / "run")
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            matrix[f"{preset}/{name}"] = exports
            print(f"| {preset} | {name} | " + " | ".join(cell(exports[f]) for f in FORMATS) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(matrix, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
