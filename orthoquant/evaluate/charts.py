"""PNG charts comparing runs (matplotlib, Agg backend: no display needed).

Each function takes plain data (run label -> numbers) and writes one file; a chart with nothing to
show is not written, so callers list what exists.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        from ..errors import UserError

        raise UserError("charts need matplotlib: pip install 'orthoquant[eval]'") from None
    matplotlib.use("Agg")  # files only; never opens a window or needs a display
    import matplotlib.pyplot as plt

    return plt


def _wide(values) -> bool:
    """Whether positive values span more than a decade: then a log axis keeps small bars visible."""
    values = [v for v in values if v == v and v > 0]
    return bool(values) and max(values) > 10 * min(values)


def grouped_bars(path: Path, data: dict[str, dict[str, float]], title: str, ylabel: str,
                 ylim: tuple[float, float] | None = None) -> bool:
    """One group of bars per category, one bar per run: ``data[run][category] = value``; a log
    axis when the values span more than a decade."""
    n_categories = len({c for values in data.values() for c in values})
    if not n_categories:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.5 * len(data) * n_categories), 4.0))
    grouped_axes(ax, data, annotate=True)
    if _wide(v for values in data.values() for v in values.values()):
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    _style(ax, title, ylabel)
    _save(fig, path)
    return True


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
    _style(left, "quantization error per layer", "mean relative error ‖ΔW X‖²/‖W X‖²")
    kinds = {run: v for run, v in per_kind.items() if v}
    grouped_axes(right, kinds)
    for ax, values in ((left, per_layer), (right, kinds)):
        if _wide(v for d in values.values() for v in d.values()):
            ax.set_yscale("log")
    _style(right, "by linear (mean over layers)", "")
    _save(fig, path)
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


def _style(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)  # pyplot keeps every figure alive until closed
    log.info("chart %s", path)
