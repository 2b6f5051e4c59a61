"""Evaluate a run folder (as quantized), an exported checkpoint or a model (full precision): perplexity
per source and lm-eval tasks, as the CLI's JSON result; a run folder also gets ``results.json/md``.

What a target is decides how it loads (:data:`LOADERS`):

- ``run``: a folder with ``run.json``; decoded codes with fake-quant and online transforms attached
  (:func:`orthoquant.runtime.open_run`), so tasks see the model exactly as perplexity does;
- ``export``: a checkpoint written by ``orthoquant export`` (it holds the export manifest), read by
  ``orthoquant.export.load_quantized`` with online transforms and fake-quant re-attached; nothing is
  written into it, so its manifest stays valid;
- ``hf-quantized``: a stock Hugging Face folder with a ``quantization_config`` (compressed-tensors,
  GPTQ), loaded by ``AutoModelForCausalLM``;
- ``model``: a hub id or local folder in full precision, streamed one layer at a time when it does
  not fit in memory (perplexity only).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import parse_yaml
from ..data import evaluation_tokens, perplexity_windows, source_label
from ..device import resolve_dtype
from ..errors import UserError
from ..export import load_quantized
from ..export.verify import MANIFESTS
from ..models.loading import WeightSource, open_model, read_config_json
from ..models.spec import ArchSpec
from ..models.surgery import get_module
from ..runtime import check_seqlen, open_run, rest_paths
from ..validate import check_eval_options
from .lm_eval import TaskOptions, run_tasks
from .ppl import ppl_of, streamed_window_losses, window_losses
from .results import write_results

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A model ready to evaluate; ``source`` is set only when it is streamed layer by layer."""

    model: nn.Module
    tokenizer: Any
    recipe: dict | None = None
    arch: ArchSpec | None = None
    source: WeightSource | None = None


def _fits_in_memory(n_params: int, dtype: torch.dtype) -> bool:
    """Whether a whole model fits in half of the machine's RAM (else stream it layer by layer)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return True
    return n_params * torch.finfo(dtype).bits // 8 < ram // 2


def _recipe_yaml(folder: Path) -> dict | None:
    path = folder / "recipe.yaml"
    return parse_yaml(path.read_text(), str(path)) if path.is_file() else None


def config_dtype(folder: Path) -> torch.dtype:
    """The dtype a model folder's ``config.json`` names (``dtype`` or ``torch_dtype``); float32 if none
    (a run folder without one is reported by :func:`open_run`, with what else it lacks)."""
    config = read_config_json(folder) if (folder / "config.json").is_file() else {}
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _load_run(target: str, device: torch.device, dtype: str, stream: bool | None) -> Loaded:
    # the model's own dtype unless asked (a bfloat16 model evaluates in half float32's memory)
    dt = config_dtype(Path(target)) if dtype == "auto" else resolve_dtype(dtype, device)
    model, tokenizer, arch, source = open_run(target, device, dt, stream=bool(stream))
    if tokenizer is None:
        raise UserError(f"run {target} has no tokenizer files")
    return Loaded(model, tokenizer, _recipe_yaml(Path(target)), arch, source if stream else None)


def _load_model(target: str, device: torch.device, dtype: str, stream: bool | None) -> Loaded:
    model, tokenizer, arch, source, _ = open_model(target, dtype, device)
    if stream is None:
        n_params = sum(p.numel() for p in model.parameters())
        stream = not _fits_in_memory(n_params, next(model.parameters()).dtype)
    for path in rest_paths(arch):
        source.materialize(get_module(model, path), f"{path}.", device)
    if not stream:
        for name, module in model.named_children():
            source.materialize(module, f"{name}.", device)
    return Loaded(model, tokenizer, None, arch, source if stream else None)


def _load_hf_quantized(target: str, device: torch.device, dtype: str, stream: bool | None) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # safetensors only: a pytorch_model.bin would be unpickled
        model = AutoModelForCausalLM.from_pretrained(target, dtype=resolve_dtype(dtype, device), use_safetensors=True)
    except (ImportError, OSError) as e:  # the quantization library is not installed; no safetensors weights
        raise UserError(f"{target}: {' '.join(str(e).split())}") from None
    return Loaded(model.to(device).eval(), AutoTokenizer.from_pretrained(target), _recipe_yaml(Path(target)))


def _load_export(target: str, device: torch.device, dtype: str, stream: bool | None) -> Loaded:
    from transformers import AutoTokenizer

    model = load_quantized(target, device, None if dtype == "auto" else resolve_dtype(dtype, device))
    return Loaded(model, AutoTokenizer.from_pretrained(target), _recipe_yaml(Path(target)))


LOADERS: dict[str, Callable[..., Loaded]] = {
    "run": _load_run, "export": _load_export, "hf-quantized": _load_hf_quantized, "model": _load_model}


def target_kind(target: str) -> str:
    """Which of :data:`LOADERS` reads ``target`` (see the module docstring). An export is checked
    first: a native export is also a finished run folder, but its manifest must stay untouched."""
    path = Path(target)
    if any((path / name).is_file() for name in MANIFESTS):  # verified or not: load_quantized refuses the latter
        return "export"
    if (path / "run.json").is_file():
        return "run"
    config = path / "config.json"
    quantized = config.is_file() and "quantization_config" in read_config_json(path)
    return "hf-quantized" if quantized else "model"


# "auto" perplexity batches: the logits and their softmax (float32, seqlen x vocab each) of a batch
# get this share of the free memory; a few windows per batch already keep a CPU busy.
AUTO_BATCH_MEMORY_SHARE, AUTO_BATCH_MAX = 0.125, 64


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 2**30


def perplexity_batch(batch_size: int | str, model: nn.Module, seqlen: int, device: torch.device) -> int:
    """``batch_size``, or for ``"auto"`` the largest batch whose logits fit the memory share above."""
    if batch_size != "auto":
        return int(batch_size)
    per_window = 2 * seqlen * int(model.config.vocab_size) * 4
    batch = int(AUTO_BATCH_MEMORY_SHARE * _free_memory(device)) // per_window
    return max(1, min(AUTO_BATCH_MAX, batch))


def _window_losses(loaded: Loaded, src: str, seqlen: int, device: torch.device, batch_size: int,
                   max_windows: int | None) -> torch.Tensor:
    """Mean token NLL of each held-out window of ``src`` (see :mod:`orthoquant.evaluate.ppl`)."""
    windows = perplexity_windows(evaluation_tokens(loaded.tokenizer, src, seqlen), seqlen)[:max_windows]
    if loaded.source is None:
        losses = window_losses(loaded.model, windows, device, batch_size)
    else:
        losses = streamed_window_losses(loaded.model, loaded.arch, loaded.source, windows, device, batch_size)
    log.info("perplexity %s (seqlen %d, %d windows, batch %d): %.4f", source_label(src), seqlen, len(windows),
             batch_size, ppl_of(losses))
    return losses


def choose_ppl_sources(ppl: str | None, tasks: TaskOptions | None) -> list[str]:
    """The perplexity sources to measure: those ``--ppl`` names ('' for none); without ``--ppl``,
    wikitext2 unless tasks were asked for (as stock lm_eval, which computes only the tasks)."""
    if ppl is None:
        return [] if tasks is not None and tasks.tasks else ["wikitext2"]
    return [s for s in ppl.split(",") if s]


def partial_settings(max_windows: int | None, tasks: TaskOptions | None, ppl_measured: bool) -> dict | None:
    """What made an evaluation partial (``max_windows`` for perplexity, ``limit`` for tasks), or None."""
    settings = {"max_windows": max_windows if ppl_measured else None,
                "limit": tasks.limit if tasks is not None and tasks.tasks else None}
    settings = {k: v for k, v in settings.items() if v is not None}
    return settings or None


@dataclass
class Evaluation:
    """A measured result (the CLI's JSON) and its timings; :meth:`save` writes them where they belong."""

    target: str
    kind: str
    result: dict[str, Any]
    timings: dict[str, Any]
    window_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # per source, for noise estimates

    def save(self) -> None:
        """``results.json/md`` into a run folder; nothing is written into other targets."""
        if self.kind == "run":
            write_results(Path(self.target), self.result, self.timings)


def measure(target: str, ppl_sources: list[str], seqlen: int | None, device: torch.device,
            dtype: str = "auto", batch_size: int | str = 1, stream: bool | None = None,
            max_windows: int | None = None, tasks: TaskOptions | None = None) -> Evaluation:
    """Perplexity of ``target`` on each source and its lm-eval ``tasks``, written nowhere yet (a caller
    shows the numbers first, so a failing write cannot lose them); see :func:`evaluate`.

    ``batch_size`` ``"auto"``: lm-eval picks its own, perplexity :func:`perplexity_batch`. The result
    says under ``partial`` what limited it (``--max-windows``, ``--limit``); None when it is whole.
    """
    start = time.perf_counter()
    check_eval_options(seqlen=seqlen, batch_size=None if batch_size == "auto" else batch_size,
                       max_windows=max_windows)
    if tasks is not None:
        check_eval_options(num_fewshot=tasks.num_fewshot, max_length=tasks.max_length, limit=tasks.limit)
    if tasks is not None and tasks.tasks and stream:
        raise UserError("--tasks needs the whole model in memory; drop --stream")
    kind = target_kind(target)
    loaded = LOADERS[kind](target, device, dtype, False if tasks is not None and tasks.tasks else stream)
    timings: dict[str, Any] = {"load": time.perf_counter() - start, "ppl": {}}
    seqlen = check_seqlen(loaded.model, seqlen)
    result: dict[str, Any] = {"ppl": {}, "seqlen": seqlen, "tasks": {}, "recipe": loaded.recipe,
                              "partial": partial_settings(max_windows, tasks, bool(ppl_sources))}
    losses = {}
    ppl_batch = perplexity_batch(batch_size, loaded.model, seqlen, device)
    for src in ppl_sources:
        t0 = time.perf_counter()
        losses[source_label(src)] = _window_losses(loaded, src, seqlen, device, ppl_batch, max_windows)
        result["ppl"][source_label(src)] = ppl_of(losses[source_label(src)])
        timings["ppl"][source_label(src)] = time.perf_counter() - t0
    if tasks is not None and tasks.tasks:
        t0 = time.perf_counter()
        result["tasks"] = run_tasks(loaded.model, loaded.tokenizer, tasks)
        timings["tasks"] = time.perf_counter() - t0
    result["seconds"] = timings["total"] = time.perf_counter() - start
    return Evaluation(target, kind, result, timings, losses)


def evaluate(target: str, ppl_sources: list[str], seqlen: int | None, device: torch.device,
             dtype: str = "auto", batch_size: int | str = 1, stream: bool | None = None,
             max_windows: int | None = None, tasks: TaskOptions | None = None) -> dict[str, Any]:
    """Perplexity of ``target`` on each source and its lm-eval ``tasks``; the CLI's JSON result
    ``{"ppl": {source: float}, "seqlen": L, "tasks": {task: {...}}, "recipe": dict | None,
    "partial": {"max_windows": N, "limit": L} | None, "seconds": s}``. A run folder also gets
    ``results.json/md`` (a partial evaluation there never replaces a whole one)."""
    evaluation = measure(target, ppl_sources, seqlen, device, dtype, batch_size, stream, max_windows, tasks)
    evaluation.save()
    return evaluation.result
