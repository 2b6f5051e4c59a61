"""``results.json`` and ``results.md`` in a run folder: what was measured, with what, and how long it took.

Evaluations accumulate: a later ``orthoquant eval RUN --tasks ...`` keeps the perplexities of an
earlier ``--ppl`` call (unless it measures perplexity again at another seqlen) and adds its tasks.
A partial evaluation (``--max-windows`` for perplexity, ``--limit`` for tasks) never replaces a whole
one: its numbers accumulate under ``partial`` (with the settings that limited them), the top level
keeps only whole numbers.
"""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

import torch
import transformers

from ..version import __version__
from ..runfolder import write_json
from .lm_eval import SEEDS, lm_eval_version, suite_averages

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


def versions() -> dict[str, str | None]:
    return {"orthoquant": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "lm_eval": lm_eval_version()}


def fmt(value: float | None, digits: int = 4) -> str:
    """A number as the tables print it (and as tests read them back); huge ones in e-notation."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.{digits}e}"


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` on top of ``old``: tasks by name; perplexities by source when the seqlen is the same."""
    if not new["ppl"]:
        ppl, seqlen = old.get("ppl", {}), old.get("seqlen", new["seqlen"])
    elif old.get("seqlen") == new["seqlen"]:
        ppl, seqlen = {**old.get("ppl", {}), **new["ppl"]}, new["seqlen"]
    else:
        ppl, seqlen = new["ppl"], new["seqlen"]
    return {**new, "ppl": ppl, "seqlen": seqlen, "tasks": {**old.get("tasks", {}), **new["tasks"]}}


def split_partial(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``result`` as (its whole numbers, its partial ones with the settings that limited them, or None)."""
    limits = result.get("partial") or {}
    partial_ppl, partial_tasks = "max_windows" in limits, "limit" in limits
    whole = {**result, "ppl": {} if partial_ppl else result["ppl"], "tasks": {} if partial_tasks else result["tasks"]}
    if not limits:
        return whole, None
    part = {"ppl": result["ppl"] if partial_ppl else {}, "seqlen": result["seqlen"],
            "tasks": result["tasks"] if partial_tasks else {}, **limits}
    return whole, part


def merge_result(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The record after ``new``: whole numbers merged at the top level, partial ones under ``partial``."""
    whole, part = split_partial(new)
    record = merge(old, whole)
    # the older partial settings stay beside the newer ones (a --limit task and --max-windows perplexity)
    record["partial"] = {**(old.get("partial") or {}), **merge(old.get("partial") or {}, part)} if part \
        else old.get("partial")
    return record


def numbers_used(result: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The numbers a report shows for ``result`` (``results.json`` or the CLI's JSON) and which they
    are: whole ones where measured, else the partial ones, said as ``"whole"`` or ``"partial (…)"``."""
    partial = result.get("partial") or {}
    limits = {k: partial[k] for k in ("max_windows", "limit") if partial.get(k) is not None}
    if "ppl" not in partial:  # the CLI's JSON: the numbers themselves are whole or partial
        used = {**result, "partial": None}
        return used, f"partial ({_limits(limits)})" if limits else "whole"
    taken = {part: not result.get(part) and bool(partial.get(part)) for part in ("ppl", "tasks")}
    used = {**result, **{part: partial[part] for part, from_partial in taken.items() if from_partial}}
    if taken["ppl"]:
        used["seqlen"] = partial["seqlen"]
    limits = {k: v for k, v in limits.items() if taken["ppl" if k == "max_windows" else "tasks"]}
    return used, f"partial ({_limits(limits)})" if limits else "whole"


def _limits(limits: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in limits.items())


def write_results(folder: Path, result: dict[str, Any], timings: dict[str, Any]) -> dict[str, Any]:
    """Merge ``result`` (the CLI's JSON) into ``folder/results.json`` and rewrite ``results.md``."""
    path = folder / RESULTS_JSON
    old = _read(path)
    record = merge_result(old, result)
    recipe = record.get("recipe") or {}
    record.update({
        "averages": suite_averages(record["tasks"]),
        "seeds": {"calibration": recipe.get("calibration", {}).get("seed"), "lm_eval": SEEDS},
        "versions": versions(), "timings": timings,
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    write_json(path, record)
    (folder / RESULTS_MD).write_text(render_markdown(folder.name, record), encoding="utf-8")
    return record


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(name: str, record: dict[str, Any]) -> str:
    recipe = record.get("recipe") or {}
    lines = [f"# {name}", "", f"Recipe: `{recipe.get('name', 'full precision')}` {recipe.get('description', '')}", ""]
    if record["ppl"]:
        lines += [f"## Perplexity (seqlen {record['seqlen']})", ""]
        lines += table(["source", "ppl"], [[src, fmt(v)] for src, v in record["ppl"].items()]) + [""]
    if record["tasks"]:
        lines += ["## Tasks", ""]
        rows = [[task, str(t["metric"]), fmt(t["value"]), str(t.get("samples")), str(t.get("num_fewshot"))]
                for task, t in record["tasks"].items()]
        rows += [[f"**{suite} avg**", "", fmt(v), "", ""] for suite, v in record["averages"].items()]
        lines += table(["task", "metric", "value", "docs", "shots"], rows) + [""]
    lines += _partial_markdown(record.get("partial"))
    lines += ["## Versions and time", ""]
    lines += table(["item", "value"], [[k, str(v)] for k, v in record["versions"].items()]
                   + [[f"seconds: {k}", _seconds(v)] for k, v in record["timings"].items()])
    return "\n".join(lines) + "\n"


def _partial_markdown(partial: dict[str, Any] | None) -> list[str]:
    """The partial numbers, apart and labelled with what limited them."""
    if not partial:
        return []
    limits = ", ".join(f"{k} {partial[k]}" for k in ("max_windows", "limit") if partial.get(k) is not None)
    lines = [f"## Partial evaluation ({limits}): not comparable with whole results", ""]
    if partial["ppl"]:
        rows = [[s, fmt(v)] for s, v in partial["ppl"].items()]
        lines += table(["source", f"ppl (seqlen {partial['seqlen']})"], rows) + [""]
    if partial["tasks"]:
        rows = [[t, str(v["metric"]), fmt(v["value"]), str(v.get("samples"))] for t, v in partial["tasks"].items()]
        lines += table(["task", "metric", "value", "docs"], rows) + [""]
    return lines


def _seconds(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.1f}" for k, v in value.items())
    return f"{value:.1f}"
