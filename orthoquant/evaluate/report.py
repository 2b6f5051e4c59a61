"""``orthoquant report RUN [RUN...] --out DIR``: evaluated runs side by side.

A RUN is a run folder that ``orthoquant eval`` wrote ``results.json`` into, any folder holding a
``results.json``, or a JSON file written by ``orthoquant eval --json`` (how a full-precision model is
put beside its quantized runs). ``LABEL=PATH`` names a column; the default is the folder name or
the file stem. ``DIR`` receives:

- ``report.md``: one row per run (recipe, perplexities, each task's headline metric, suite averages,
  mean quantization error) and links to the charts;
- ``report.json``: the same numbers, unrounded;
- ``ppl.png`` (perplexities, and the perplexity-like metrics of tasks), ``tasks.png`` (accuracies),
  ``layer_error.png`` (relative output error of every quantized linear, from ``run.json``'s metrics:
  per decoder layer and per linear kind).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..cli import Command
from ..errors import UserError
from . import charts
from .lm_eval import suite_averages
from .results import RESULTS_JSON, fmt, numbers_used, table

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """One run's evaluation and, for quantized run folders, its per-layer metrics from ``run.json``."""

    label: str
    result: dict[str, Any]
    metrics: dict[str, Any] | None = None
    evaluation: str = "whole"  # or "partial (max_windows N)": which numbers the report shows

    @property
    def recipe(self) -> str:
        return (self.result.get("recipe") or {}).get("name", "full precision")

    def task_values(self, accuracy: bool) -> dict[str, float]:
        """Headline task metrics, keyed "task\nmetric" for charts: accuracy-like ones (higher is
        better) or the others (perplexities)."""
        return {f"{task}\n{t['metric']}": t["value"] for task, t in self.result.get("tasks", {}).items()
                if t.get("value") is not None and bool(t.get("higher_is_better", True)) == accuracy}

    def layer_errors(self) -> tuple[dict[int, float], dict[str, float]]:
        """Mean relative error of the linears per decoder layer, and per linear kind over layers."""
        per_layer, per_kind = {}, {}
        for layer, info in (self.metrics or {}).items():
            errors = {path: m["relative"] for path, m in info.get("linears", {}).items() if m.get("relative") is not None}
            if errors:
                per_layer[int(layer)] = sum(errors.values()) / len(errors)
            for path, value in errors.items():
                per_kind.setdefault(path.rsplit(".", 1)[-1], []).append(value)
        return per_layer, {kind: sum(v) / len(v) for kind, v in per_kind.items()}

    def mean_error(self) -> float | None:
        per_layer, _ = self.layer_errors()
        return sum(per_layer.values()) / len(per_layer) if per_layer else None


def load_run(spec: str) -> RunResult:
    """A :class:`RunResult` from ``PATH`` or ``LABEL=PATH`` (see the module docstring)."""
    label, sep, path_text = spec.partition("=")
    if not sep or "/" in label:
        label, path_text = "", spec
    path = Path(path_text)
    in_folder = path.is_dir() or path.name == RESULTS_JSON  # else a JSON file from `eval --json`
    folder = path if path.is_dir() else path.parent
    results = folder / RESULTS_JSON if in_folder else path
    if not results.is_file():
        hint = "; run `orthoquant eval` on it first" if path.is_dir() else ""
        raise UserError(f"{path} has no evaluation results ({results} not found){hint}")
    run_json = folder / "run.json"
    metrics = json.loads(run_json.read_text()).get("metrics") if in_folder and run_json.is_file() else None
    name = folder.resolve().name if in_folder else path.stem
    result, evaluation = numbers_used(json.loads(results.read_text()))
    return RunResult(label or name, result, metrics, evaluation)


def _union(runs: list[RunResult], keys: Callable[[RunResult], list[str]]) -> list[str]:
    out: list[str] = []
    for run in runs:
        out += [k for k in keys(run) if k not in out]
    return out


def columns(runs: list[RunResult]) -> list[tuple[str, Callable[[RunResult], float | None]]]:
    """(header, value of a run) for every number in the table."""
    cols: list[tuple[str, Callable[[RunResult], float | None]]] = []
    for src in _union(runs, lambda r: list(r.result.get("ppl", {}))):
        seqlens = {r.result.get("seqlen") for r in runs if src in r.result.get("ppl", {})}
        suffix = f" (L={seqlens.pop()})" if len(seqlens) == 1 else ""
        cols.append((f"ppl {src}{suffix}", lambda r, s=src: r.result.get("ppl", {}).get(s)))
    for task in _union(runs, lambda r: list(r.result.get("tasks", {}))):
        metric = next(r.result["tasks"][task]["metric"] for r in runs if task in r.result.get("tasks", {}))
        cols.append((f"{task} ({metric})", lambda r, t=task: r.result.get("tasks", {}).get(t, {}).get("value")))
    for suite in _union(runs, lambda r: list(suite_averages(r.result.get("tasks", {})))):
        cols.append((f"{suite} avg", lambda r, s=suite: suite_averages(r.result.get("tasks", {})).get(s)))
    if any(r.metrics for r in runs):
        cols.append(("mean rel. error", RunResult.mean_error))
    return cols


def write_charts(runs: list[RunResult], out: Path) -> list[str]:
    """The PNG files written into ``out`` (a chart without data is skipped)."""
    ppl = {r.label: {**{f"{src}\ntoken perplexity": v for src, v in r.result.get("ppl", {}).items()},
                     **r.task_values(accuracy=False)} for r in runs}
    errors = {r.label: r.layer_errors() for r in runs}
    made = {
        "ppl.png": charts.metric_panels(out / "ppl.png", ppl, "perplexity (lower is better)", _unit),
        "tasks.png": charts.metric_panels(out / "tasks.png", {r.label: r.task_values(accuracy=True) for r in runs},
                                          "tasks (higher is better)", _unit),
        "layer_error.png": charts.layer_errors(out / "layer_error.png", {k: v[0] for k, v in errors.items()},
                                               {k: v[1] for k, v in errors.items()}),
    }
    return [name for name, written in made.items() if written]


def _unit(metric: str) -> str:
    """The axis label of a chart panel: the metric's own name (token, word or byte perplexity, accuracy)."""
    return metric.rsplit("\n", 1)[-1].replace("_", " ")


def build_report(specs: list[str], out: Path | str) -> dict[str, Any]:
    """Write the report of the runs ``specs`` into ``out``; returns the numbers and file names."""
    runs = [load_run(s) for s in specs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = columns(runs)
    # which numbers a run shows is said as soon as one of them is partial (whole ones are the norm)
    said = [("evaluation", lambda r: r.evaluation)] if any(r.evaluation != "whole" for r in runs) else []
    rows = [[r.label, r.recipe] + [get(r) for _, get in said] + [fmt(get(r)) for _, get in cols] for r in runs]
    lines = ["# orthoquant report", ""] + table(["run", "recipe"] + [h for h, _ in said] + [h for h, _ in cols], rows)
    lines += [""]
    images = write_charts(runs, out)
    lines += [f"![{name[:-4]}]({name})" for name in images]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    numbers = {r.label: {h: get(r) for h, get in cols} for r in runs}
    report = {"runs": {r.label: r.recipe for r in runs}, "numbers": numbers, "charts": images,
              "evaluation": {r.label: r.evaluation for r in runs}}
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    log.info("report in %s: %d runs, charts %s", out, len(runs), ", ".join(images) or "none")
    return report


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder, results JSON, or LABEL=PATH")
    p.add_argument("--out", required=True, type=Path, help="folder for report.md, report.json and the PNGs")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    report = build_report(args.runs, args.out)
    print((args.out / "report.md").read_text(encoding="utf-8"), end="")
    return report


COMMAND = Command("side-by-side table and charts of evaluated runs", _args, _run)
