"""PNG charts comparing runs (matplotlib, Agg backend: no display needed).

Each function takes plain data (run label -> numbers) and writes one file; a chart with nothing to
show is not written, so callers list what exists.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from ..errors import UserError

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise UserError("charts need matplotlib: pip install 'orthoquant[eval]'") from None
    matplotlib.use("Agg")  # files only; never opens a window or needs a display
    import matplotlib.pyplot as plt

    return plt


def _wide(values) -> bool:
    """Whether positive values span more than a decade: then a log axis keeps small bars visible."""
    values = [v for v in values if v == v and v > 0]
    return bool(values) and max(values) > 10 * min(values)


def axis_limits(values: list[float]) -> tuple[float, float]:
    """An axis around the data, not from 0: the spread of the values fills most of it, so a 1-2% gap
    between runs is visible (with equal values, ±2% of the value)."""
    finite = [v for v in values if v == v]
    lo, hi = min(finite), max(finite)
    pad = 0.2 * (hi - lo) if hi > lo else 0.02 * abs(hi) or 1.0
    return lo - pad, hi + 2 * pad  # room on the right for the value labels


def metric_panels(path: Path, data: dict[str, dict[str, float]], title: str, unit: Callable[[str], str]) -> bool:
    """One panel per metric, each with its own axis around its values (metrics never share an axis):
    a dot per run, labelled with its value and its change against the first run that has one.
    ``data[run][metric] = value``; ``unit(metric)`` labels the axis."""
    metrics = sorted({m for values in data.values() for m in values})
    if not metrics:
        return False
    plt = _pyplot()
    runs = list(data)
    fig, axes = plt.subplots(1, len(metrics), squeeze=False,
                             figsize=(max(5.0, 4.2 * len(metrics)), 1.2 + 0.4 * len(runs)))
    for ax, metric in zip(axes[0], metrics):
        _panel(ax, runs, [data[r].get(metric, float("nan")) for r in runs], metric, unit(metric))
    fig.suptitle(title)
    _save(fig, path)
    return True


def _panel(ax, runs: list[str], values: list[float], metric: str, unit: str) -> None:
    ys = list(range(len(runs)))[::-1]  # the first run on top
    ax.plot(values, ys, "o", color="tab:blue")
    first = next((i for i, v in enumerate(values) if v == v), None)  # the reference: the first run with a value
    for i, (v, y) in enumerate(zip(values, ys)):
        if v == v:
            ref = values[first]
            change = f" ({100 * (v / ref - 1):+.2f}%)" if i != first and ref else ""
            ax.annotate(f"{v:.4g}{change}", (v, y), xytext=(5, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlim(*axis_limits(values))
    ax.set_ylim(-0.6, len(runs) - 0.4)
    ax.set_yticks(ys, runs, fontsize=8)
    ax.set_title(metric.replace("\n", " "), fontsize=9)
    ax.set_xlabel(unit, fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def layer_errors(path: Path, per_layer: dict[str, dict[int, float]], per_kind: dict[str, dict[str, float]]) -> bool:
    """Left: mean relative output error of each decoder layer's linears, one line per run.
    Right: the same by linear kind (q/k/v/o/gate/up/down), averaged over layers."""
    if not any(per_layer.values()):
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    for run, errors in per_layer.items():
        if errors:
            layers = sorted(errors)
            left.plot(layers, [errors[i] for i in layers], marker="o", label=run)
    left.set_xlabel("decoder layer")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    _style(left, "quantization error per layer", "mean relative error ‖ΔW X‖²/‖W X‖²", legend=False)
    kinds = {run: v for run, v in per_kind.items() if v}
    grouped_axes(right, kinds)
    for ax, values in ((left, per_layer), (right, kinds)):
        if _wide(v for d in values.values() for v in d.values()):
            ax.set_yscale("log")
    _style(right, "by linear (mean over layers)", "", legend=False)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(labels) - 1) // 4), 1, 1))  # the legend below both axes
    _save(fig, path, layout=False)
    return True


def grouped_axes(ax, data: dict[str, dict[str, float]], annotate: bool = False) -> None:
    """Grouped bars on ``ax``: a group per category (sorted), a bar per run; missing values left out."""
    categories = sorted({c for values in data.values() for c in values})
    width = 0.8 / max(1, len(data))
    for i, (run, values) in enumerate(data.items()):
        xs = [j + (i - (len(data) - 1) / 2) * width for j in range(len(categories))]
        ys = [values.get(c, float("nan")) for c in categories]
        bars = ax.bar(xs, ys, width, label=run)
        if annotate:
            ax.bar_label(bars, labels=[f"{y:.3g}" if y == y else "" for y in ys], fontsize=7, padding=1)
    ax.set_xticks(range(len(categories)), categories, rotation=20 if len(categories) > 4 else 0, fontsize=8)


def _style(ax, title: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _save(fig, path: Path, layout: bool = True) -> None:
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # value labels past the last axis stay in the image
    _pyplot().close(fig)  # pyplot keeps every figure alive until closed
    log.info("chart %s", path)
