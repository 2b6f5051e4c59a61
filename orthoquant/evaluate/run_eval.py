"""Evaluate a run folder (as quantized) or a model (full precision): perplexity per source, JSON result."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..data import evaluation_tokens, perplexity_windows, source_label
from ..errors import UserError
from ..models.loading import open_model
from ..pipeline import open_run, rest_paths
from ..models.surgery import get_module
from .ppl import perplexity, streamed_perplexity

log = logging.getLogger(__name__)


def _fits_in_memory(n_params: int, dtype: torch.dtype) -> bool:
    """Whether a whole model fits in half of the machine's RAM (else stream it layer by layer)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return True
    return n_params * torch.finfo(dtype).bits // 8 < ram // 2


def _load(target: str, device: torch.device, dtype: str, stream: bool | None):
    """(model, tokenizer, spec, source or None when fully in memory, recipe dict or None)."""
    if (Path(target) / "run.json").is_file():
        model, tokenizer, spec, source = open_run(target, device, torch.float32, stream=bool(stream))
        if tokenizer is None:
            raise UserError(f"run {target} has no tokenizer files")
        import yaml

        recipe = yaml.safe_load((Path(target) / "recipe.yaml").read_text())
        return model, tokenizer, spec, source if stream else None, recipe
    model, tokenizer, spec, source, _ = open_model(target, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    if stream is None:
        stream = not _fits_in_memory(n_params, next(model.parameters()).dtype)
    for path in rest_paths(spec):
        source.materialize(get_module(model, path), f"{path}.", device)
    if not stream:
        for name, module in model.named_children():
            source.materialize(module, f"{name}.", device)
    return model, tokenizer, spec, source if stream else None, None


def evaluate(target: str, ppl_sources: list[str], seqlen: int | None, device: torch.device,
             dtype: str = "auto", batch_size: int = 1, stream: bool | None = None,
             max_windows: int | None = None) -> dict[str, Any]:
    """Perplexity of ``target`` (run folder or model) on each source; the CLI's JSON result."""
    start = time.perf_counter()
    model, tokenizer, spec, source, recipe = _load(target, device, dtype, stream)
    limit = getattr(model.config, "max_position_embeddings", None)
    if seqlen is None:
        seqlen = min(2048, limit or 2048)
    elif limit is not None and seqlen > limit:
        raise UserError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}")
    result: dict[str, Any] = {"ppl": {}, "seqlen": seqlen, "tasks": {}, "recipe": recipe}
    for src in ppl_sources:
        windows = perplexity_windows(evaluation_tokens(tokenizer, src, seqlen), seqlen)[:max_windows]
        if source is None:
            value = perplexity(model, windows, device, batch_size)
        else:
            value = streamed_perplexity(model, spec, source, windows, device, batch_size)
        result["ppl"][source_label(src)] = value
        log.info("perplexity %s (seqlen %d, %d windows): %.4f", source_label(src), seqlen, len(windows), value)
    result["seconds"] = time.perf_counter() - start
    return result
