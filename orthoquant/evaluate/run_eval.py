"""Evaluate a run folder (as quantized), an exported checkpoint or a model (full precision): perplexity
per source and lm-eval tasks, as the CLI's JSON result; a run folder also gets ``results.json/md``.

What a target is decides how it loads (:data:`LOADERS`):

- ``run``: a folder with ``run.json``; decoded codes with fake-quant and online transforms attached
  (:func:`orthoquant.pipeline.open_run`), so tasks see the model exactly as perplexity does;
- ``export``: a checkpoint written by ``orthoquant export`` (it holds the export manifest), read by
  ``orthoquant.export.load_quantized`` with online transforms and fake-quant re-attached (skipped in
  builds without ``orthoquant.export``); nothing is written into it, so its manifest stays valid;
- ``hf-quantized``: a stock Hugging Face folder with a ``quantization_config`` (compressed-tensors,
  GPTQ), loaded by ``AutoModelForCausalLM``;
- ``model``: a hub id or local folder in full precision, streamed one layer at a time when it does
  not fit in memory (perplexity only).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import evaluation_tokens, perplexity_windows, source_label
from ..device import resolve_dtype
from ..errors import UserError
from ..models.loading import WeightSource, open_model, read_config_json
from ..models.surgery import get_module
from ..pipeline import open_run, rest_paths
from .lm_eval import TaskOptions, run_tasks
from .ppl import perplexity, streamed_perplexity
from .results import write_results

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A model ready to evaluate; ``source`` is set only when it is streamed layer by layer."""

    model: nn.Module
    tokenizer: Any
    recipe: dict | None = None
    spec: Any = None
    source: WeightSource | None = None


def _fits_in_memory(n_params: int, dtype: torch.dtype) -> bool:
    """Whether a whole model fits in half of the machine's RAM (else stream it layer by layer)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return True
    return n_params * torch.finfo(dtype).bits // 8 < ram // 2


def _recipe_yaml(folder: Path) -> dict | None:
    import yaml

    path = folder / "recipe.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _load_run(target: str, device: torch.device, dtype: str, stream: bool | None) -> Loaded:
    # float32 unless asked: the fake-quant reference numbers are float32 ones
    dt = torch.float32 if dtype == "auto" else resolve_dtype(dtype, device)
    model, tokenizer, spec, source = open_run(target, device, dt, stream=bool(stream))
    if tokenizer is None:
        raise UserError(f"run {target} has no tokenizer files")
    return Loaded(model, tokenizer, _recipe_yaml(Path(target)), spec, source if stream else None)


def _load_model(target: str, device: torch.device, dtype: str, stream: bool | None) -> Loaded:
    model, tokenizer, spec, source, _ = open_model(target, dtype, device)
    if stream is None:
        n_params = sum(p.numel() for p in model.parameters())
        stream = not _fits_in_memory(n_params, next(model.parameters()).dtype)
    for path in rest_paths(spec):
        source.materialize(get_module(model, path), f"{path}.", device)
    if not stream:
        for name, module in model.named_children():
            source.materialize(module, f"{name}.", device)
    return Loaded(model, tokenizer, None, spec, source if stream else None)


def _load_hf_quantized(target: str, device: torch.device, dtype: str, stream: bool | None) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # safetensors only: a pytorch_model.bin would be unpickled
        model = AutoModelForCausalLM.from_pretrained(target, dtype=resolve_dtype(dtype, device), use_safetensors=True)
    except (ImportError, OSError) as e:  # the quantization library is not installed; no safetensors weights
        raise UserError(f"{target}: {' '.join(str(e).split())}") from None
    return Loaded(model.to(device).eval(), AutoTokenizer.from_pretrained(target), _recipe_yaml(Path(target)))


def _export_api() -> tuple[Callable, tuple[str, ...]] | None:
    """``orthoquant.export``'s ``load_quantized`` and the manifest names marking an export (verified
    or not: ``load_quantized`` refuses an unverified one), when this build has them."""
    try:
        from ..export import load_quantized
        from ..export.verify import MANIFESTS
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("orthoquant.export"):  # the module exists but is broken: say so
            raise
        return None
    return load_quantized, MANIFESTS


def _load_export(target: str, device: torch.device, dtype: str, stream: bool | None) -> Loaded:
    from transformers import AutoTokenizer

    load_quantized, _ = _export_api()
    model = load_quantized(target, device, None if dtype == "auto" else resolve_dtype(dtype, device))
    return Loaded(model, AutoTokenizer.from_pretrained(target), _recipe_yaml(Path(target)))


LOADERS: dict[str, Callable[..., Loaded]] = {
    "run": _load_run, "export": _load_export, "hf-quantized": _load_hf_quantized, "model": _load_model}


def target_kind(target: str) -> str:
    """Which of :data:`LOADERS` reads ``target`` (see the module docstring). An export is checked
    first: a native export is also a finished run folder, but its manifest must stay untouched."""
    path = Path(target)
    export = _export_api()
    if export is not None and any((path / name).is_file() for name in export[1]):
        return "export"
    if (path / "run.json").is_file():
        return "run"
    config = path / "config.json"
    quantized = config.is_file() and "quantization_config" in read_config_json(path)
    return "hf-quantized" if quantized else "model"


def _seqlen(model: nn.Module, seqlen: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    if seqlen is None:
        return min(2048, limit or 2048)
    if limit is not None and seqlen > limit:
        raise UserError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}")
    return seqlen


def _perplexity(loaded: Loaded, src: str, seqlen: int, device: torch.device, batch_size: int,
                max_windows: int | None) -> float:
    windows = perplexity_windows(evaluation_tokens(loaded.tokenizer, src, seqlen), seqlen)[:max_windows]
    if loaded.source is None:
        value = perplexity(loaded.model, windows, device, batch_size)
    else:
        value = streamed_perplexity(loaded.model, loaded.spec, loaded.source, windows, device, batch_size)
    log.info("perplexity %s (seqlen %d, %d windows): %.4f", source_label(src), seqlen, len(windows), value)
    return value


def evaluate(target: str, ppl_sources: list[str], seqlen: int | None, device: torch.device,
             dtype: str = "auto", batch_size: int = 1, stream: bool | None = None,
             max_windows: int | None = None, tasks: TaskOptions | None = None) -> dict[str, Any]:
    """Perplexity of ``target`` on each source and its lm-eval ``tasks``; the CLI's JSON result
    ``{"ppl": {source: float}, "seqlen": L, "tasks": {task: {...}}, "recipe": dict | None, "seconds": s}``."""
    start = time.perf_counter()
    if tasks is not None and tasks.tasks and stream:
        raise UserError("--tasks needs the whole model in memory; drop --stream")
    kind = target_kind(target)
    loaded = LOADERS[kind](target, device, dtype, False if tasks is not None and tasks.tasks else stream)
    timings: dict[str, Any] = {"load": time.perf_counter() - start, "ppl": {}}
    seqlen = _seqlen(loaded.model, seqlen)
    result: dict[str, Any] = {"ppl": {}, "seqlen": seqlen, "tasks": {}, "recipe": loaded.recipe}
    for src in ppl_sources:
        t0 = time.perf_counter()
        result["ppl"][source_label(src)] = _perplexity(loaded, src, seqlen, device, batch_size, max_windows)
        timings["ppl"][source_label(src)] = time.perf_counter() - t0
    if tasks is not None and tasks.tasks:
        t0 = time.perf_counter()
        result["tasks"] = run_tasks(loaded.model, loaded.tokenizer, tasks, seqlen)
        timings["tasks"] = time.perf_counter() - t0
    result["seconds"] = timings["total"] = time.perf_counter() - start
    if kind == "run":
        write_results(Path(target), result, timings)
    return result
