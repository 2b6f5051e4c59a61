"""Static activation scales for stock formats, calibrated at export.

Our activation quantizers are dynamic: NVFP4 takes its per-tensor scale from each call's maximum.
compressed-tensors / vLLM NVFP4 instead store one static ``input_global_scale = 448·6 / amax`` per
linear (``dynamic="local"``: only the 16-wide block scales are dynamic). We observe amax where our
quantizer sees the input (after online transforms) on the reopened run, over calibration windows,
as llm-compressor's ``static_minmax`` observer does.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import DataError, UserError
from ..formats.fp4 import E2M1_MAX, E4M3_MAX
from .base import ExportOptions
from .contents import RunContents

log = logging.getLogger(__name__)


def set_static_input_scales(model: nn.Module, contents: RunContents, names: list[str],
                            options: ExportOptions) -> None:
    """Fill ``input_global_scale`` of every CT-quantized linear of ``model`` that has one.

    :param names: full names of the quantized linears.
    """
    need = [n for n in names if hasattr(model.get_submodule(n), "input_global_scale")]
    if not need:
        return
    amax = observe_input_amax(contents, need, calibration_tokens(contents, options))
    for name in need:
        scale = E4M3_MAX * E2M1_MAX / max(amax[name], torch.finfo(torch.float32).tiny)
        model.get_submodule(name).input_global_scale.data = torch.tensor([scale], dtype=torch.float32)
    log.info("calibrated static NVFP4 input scales of %d linears", len(need))


def calibration_tokens(contents: RunContents, options: ExportOptions) -> torch.Tensor:
    """(n, seqlen) token windows from ``options.calib`` or the recipe's calibration source."""
    from transformers import AutoTokenizer

    from ..data import calibration_windows

    cal = contents.recipe.calibration
    source = options.calib or cal.source
    hint = "pass --calib with a text file (or a source name) to calibrate them"
    if not (contents.path / "tokenizer_config.json").is_file():
        raise UserError(f"static activation scales are needed, but run {contents.path} has no tokenizer; {hint}")
    seqlen = min(cal.seqlen, getattr(contents.config, "max_position_embeddings", cal.seqlen))
    try:
        tokenizer = AutoTokenizer.from_pretrained(contents.path)
        return calibration_windows(tokenizer, source, options.calib_samples, seqlen, cal.seed)
    except DataError as e:
        raise UserError(f"static activation scales need calibration text: {e}; {hint}") from None


@torch.no_grad()
def observe_input_amax(contents: RunContents, names: list[str], tokens: torch.Tensor) -> dict[str, float]:
    """Largest |x| each named linear's input quantizer receives while the run's model reads ``tokens``."""
    from ..pipeline import open_run

    model, *_ = open_run(contents.path, torch.device("cpu"), torch.float32)
    amax: dict[str, float] = {name: 0.0 for name in names}
    for name in names:
        pipe = model.get_submodule(name).orthoquant_inputs
        pipe.quantizer = _observed(pipe.quantizer, amax, name)
    for batch in tokens.split(4):
        model(batch)
    return amax


def _observed(quantizer, amax: dict[str, float], name: str):
    def observe(x: torch.Tensor) -> torch.Tensor:
        amax[name] = max(amax[name], float(x.detach().abs().max()))
        return quantizer(x) if quantizer is not None else x
    return observe
