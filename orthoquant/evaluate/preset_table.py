"""Held-out perplexity of one model quantized with several presets: the table the demo prints and the
benchmarks report (FP first, then each preset with its change against FP).

Every preset is quantized through :func:`orthoquant.pipeline.quantize_pretrained` into its own run
folder and evaluated exactly as quantized (:func:`orthoquant.evaluate.run_eval.evaluate`), so these
numbers are the ones ``orthoquant quantize`` + ``orthoquant eval`` give.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import load_recipe
from ..pipeline import quantize_pretrained
from .run_eval import evaluate

__all__ = ["Case", "PresetRow", "preset_perplexities", "parse_case", "quantize_case", "preset_table", "write_preset_table"]

log = logging.getLogger(__name__)
FP_LABEL = "FP (unquantized)"


@dataclass(frozen=True)
class PresetRow:
    """One line of the table: a preset's held-out perplexity and how long quantizing took."""

    name: str
    ppl: float
    seconds: float


Case = str | tuple[str, str, list[str]]  # a preset name, or (label, preset, --set overrides)


def parse_case(entry: str) -> tuple[str, str, list[str]]:
    """``PRESET@key=value@...`` (the demo's ``--presets`` syntax) -> (entry, PRESET, [key=value, ...])."""
    preset, *overrides = entry.split("@")
    return entry, preset, overrides


def _case(case: Case) -> tuple[str, str, list[str]]:
    return (case, case, []) if isinstance(case, str) else case


def quantize_case(model: str, preset: str, sets: list[str], calib: str, out: Path, *, nsamples: int,
                  seqlen: int, device: torch.device = torch.device("cpu")) -> Path:
    """The finished run folder ``out`` of ``preset`` (with ``sets`` overrides) calibrated on ``calib``;
    a finished run there with the same recipe is reused."""
    overrides = [f"calibration.source={calib}", f"calibration.nsamples={nsamples}", f"calibration.seqlen={seqlen}"]
    if load_recipe(preset).fitting is not None:  # a learned preset fits on the same text (all its windows)
        overrides += [f"fitting.source={calib}", f"fitting.seqlen={seqlen}"]
    overrides += sets
    return quantize_pretrained(model, load_recipe(preset, overrides), out, device).path


def preset_perplexities(model: str, cases: list[Case], calib: str, held_out: str, out_dir: Path, *,
                        nsamples: int, seqlen: int, max_windows: int | None = None,
                        device: torch.device = torch.device("cpu")) -> list[PresetRow]:
    """FP and each case's perplexity on ``held_out``; run folders go to ``out_dir/<label>``.

    A case is a preset name or ``(label, preset, overrides)`` for a preset with ``--set`` changes.
    """
    label = Path(held_out).name

    def score(target: str) -> float:
        return evaluate(target, [held_out], seqlen, device, max_windows=max_windows)["ppl"][label]

    rows = [PresetRow(FP_LABEL, score(model), 0.0)]
    for name, preset, sets in map(_case, cases):
        start = time.perf_counter()
        run = quantize_case(model, preset, sets, calib, out_dir / name, nsamples=nsamples, seqlen=seqlen,
                            device=device)
        rows.append(PresetRow(name, score(str(run)), time.perf_counter() - start))
        log.info("%s: ppl %.3f (%.0f s)", name, rows[-1].ppl, rows[-1].seconds)
    return rows


def preset_table(rows: list[PresetRow], seqlen: int) -> str:
    """Markdown: preset, perplexity, change against the FP row (the first)."""
    fp = rows[0].ppl
    lines = [f"| recipe | held-out ppl (seqlen {seqlen}) | vs FP | quantize s |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.ppl:.3f} | {r.ppl / fp - 1:+.2%} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines)


def write_preset_table(rows: list[PresetRow], seqlen: int, out_dir: Path) -> str:
    """Write ``results.md`` and ``results.json`` into ``out_dir``; returns the markdown."""
    text = preset_table(rows, seqlen)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text + "\n")
    payload = {"seqlen": seqlen, "ppl": {r.name: r.ppl for r in rows},
               "quantize_seconds": {r.name: r.seconds for r in rows[1:]}}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    return text
