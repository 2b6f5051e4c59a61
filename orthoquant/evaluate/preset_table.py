"""Held-out perplexity of one model quantized with several presets: the table the demo prints and the
benchmarks report (FP first, then each preset with its change against FP).

Every preset is quantized through :func:`orthoquant.pipeline.quantize_pretrained` into its own run
folder and evaluated exactly as quantized (:func:`orthoquant.evaluate.run_eval.evaluate`), so these
numbers are the ones ``orthoquant quantize`` + ``orthoquant eval`` give.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..recipes import load_recipe
from ..pipeline import quantize_pretrained
from .run_eval import measure

__all__ = ["Case", "PresetRow", "preset_perplexities", "parse_case", "quantize_case", "preset_table",
           "table_header", "table_row", "write_preset_table", "run_folder_name"]

log = logging.getLogger(__name__)
FP_LABEL = "FP (unquantized)"


@dataclass(frozen=True)
class PresetRow:
    """One line of the table: a preset's held-out perplexity, how long quantizing took, and the mean
    token loss of every held-out window (for the noise of differences between rows)."""

    name: str
    ppl: float
    seconds: float
    window_losses: torch.Tensor | None = None

    def noise_against(self, other: "PresetRow") -> float | None:
        """Two standard errors of this row's perplexity change against ``other``, relative
        (``exp(2 SE) - 1``), from the per-window loss differences (paired: same windows)."""
        if self.window_losses is None or other.window_losses is None or len(self.window_losses) < 2:
            return None
        diff = self.window_losses - other.window_losses
        return math.expm1(2 * float(diff.std()) / math.sqrt(len(diff)))


Case = str | tuple[str, str, list[str]]  # a preset name, or (label, preset, --set overrides)


def parse_case(entry: str) -> tuple[str, str, list[str]]:
    """``PRESET@key=value@...`` (the demo's ``--presets`` syntax) -> (entry, PRESET, [key=value, ...])."""
    preset, *overrides = entry.split("@")
    return entry, preset, overrides


def _case(case: Case) -> tuple[str, str, list[str]]:
    return (case, case, []) if isinstance(case, str) else case


def run_folder_name(label: str) -> str:
    """A label as a folder name: lower case, anything but letters, digits, ``.``, ``_``, ``-`` as ``-``."""
    return re.sub(r"[^a-z0-9._-]+", "-", label.lower()).strip("-")


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
                        device: torch.device = torch.device("cpu"),
                        on_row: Callable[[PresetRow], None] | None = None) -> list[PresetRow]:
    """FP and each case's perplexity on ``held_out``; run folders go to ``out_dir/<label as a name>``.

    A case is a preset name or ``(label, preset, overrides)`` for a preset with ``--set`` changes.
    ``on_row`` sees each row as soon as it is measured. Each run folder gets its ``results.json``
    (as ``orthoquant eval`` writes it) and FP's result goes to ``out_dir/fp.json``, for ``report``.
    """
    label = Path(held_out).name

    def score(name: str, target: str, seconds: float) -> tuple[PresetRow, dict]:
        evaluation = measure(target, [held_out], seqlen, device, max_windows=max_windows)
        evaluation.save()
        row = PresetRow(name, evaluation.result["ppl"][label], seconds, evaluation.window_losses[label])
        if on_row is not None:
            on_row(row)
        return row, evaluation.result

    fp, fp_result = score(FP_LABEL, model, 0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fp.json").write_text(json.dumps(fp_result, indent=2) + "\n")
    rows = [fp]
    for name, preset, sets in map(_case, cases):
        start = time.perf_counter()
        run = quantize_case(model, preset, sets, calib, out_dir / run_folder_name(name), nsamples=nsamples,
                            seqlen=seqlen, device=device)
        rows.append(score(name, str(run), time.perf_counter() - start)[0])
        log.info("%s: ppl %.3f (%.0f s)", name, rows[-1].ppl, rows[-1].seconds)
    return rows


def table_header(seqlen: int) -> str:
    return "\n".join([f"| recipe | held-out ppl (seqlen {seqlen}) | vs FP | ±2 SE | quantize s |",
                      "|---|---|---|---|---|"])


def table_row(row: PresetRow, fp: PresetRow) -> str:
    """One markdown line; ±2 SE is the noise of "vs FP" (paired over the same held-out windows)."""
    noise = row.noise_against(fp) if row is not fp else None
    shown = "–" if noise is None else f"{noise:.2%}"
    return f"| {row.name} | {row.ppl:.3f} | {row.ppl / fp.ppl - 1:+.2%} | {shown} | {row.seconds:.0f} |"


def preset_table(rows: list[PresetRow], seqlen: int) -> str:
    """Markdown: preset, perplexity, change against the FP row (the first) and its noise."""
    return "\n".join([table_header(seqlen)] + [table_row(r, rows[0]) for r in rows])


def write_preset_table(rows: list[PresetRow], seqlen: int, out_dir: Path) -> str:
    """Write ``results.md`` and ``results.json`` into ``out_dir``; returns the markdown."""
    text = preset_table(rows, seqlen)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text + "\n")
    payload = {"seqlen": seqlen, "ppl": {r.name: r.ppl for r in rows},
               "quantize_seconds": {r.name: r.seconds for r in rows[1:]},
               "noise_2se_vs_fp": {r.name: r.noise_against(rows[0]) for r in rows[1:]},
               "windows": len(rows[0].window_losses) if rows[0].window_losses is not None else None,
               "window_losses": {r.name: r.window_losses.tolist() for r in rows if r.window_losses is not None}}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    return text
