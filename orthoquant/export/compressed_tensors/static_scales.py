"""Static activation scales for stock formats, calibrated at export.

Our activation quantizers are dynamic: NVFP4 takes its per-tensor scale from each call's maximum.
compressed-tensors / vLLM NVFP4 instead store one static ``input_global_scale = 448·6 / amax`` per
linear (``dynamic="local"``: only the 16-wide block scales are dynamic). We observe amax where our
quantizer sees the input (after online transforms) on the reopened run, over calibration windows,
as llm-compressor's ``static_minmax`` observer does. The run is streamed one decoder layer at a time
(as the quantization runner does), so calibrating never holds the whole model.

(Static KV-cache scales are not calibrated here: they are part of the run, see
:mod:`orthoquant.fakequant.kvcache`.)
"""
from __future__ import annotations

import logging

import torch

from ...data import calibration_windows
from ...errors import DataError, UserError
from ...formats.fp4 import E2M1_MAX, E4M3_MAX
from ...layerwise import capture_inputs, final_hidden, run_layer
from ...models.surgery import get_module, layers_of
from ..base import ExportOptions
from ..contents import RunContents

log = logging.getLogger(__name__)
BATCH = 4  # calibration windows per forward


def static_input_amax(contents: RunContents, names: list[str], options: ExportOptions) -> dict[str, float]:
    """Largest |input| of each named linear over the calibration windows (nothing to do: {})."""
    if not names:
        return {}
    amax = observe_input_amax(contents, names, calibration_tokens(contents, options))
    log.info("calibrated static NVFP4 input scales of %d linears", len(names))
    return amax


def input_global_scale(amax: float) -> torch.Tensor:
    """CT's NVFP4 ``input_global_scale`` (1,) float32 of an input whose largest magnitude is ``amax``."""
    return torch.tensor([E4M3_MAX * E2M1_MAX / max(amax, torch.finfo(torch.float32).tiny)], dtype=torch.float32)


def calibration_tokens(contents: RunContents, options: ExportOptions) -> torch.Tensor:
    """(n, seqlen) token windows from ``options.calib`` or the recipe's calibration source."""
    from transformers import AutoTokenizer


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
    """Largest |x| each named linear's input quantizer receives while the run's model reads ``tokens``,
    one decoder layer resident at a time."""
    cpu = torch.device("cpu")
    model, _, arch, source = contents.open_model(cpu, torch.float32, stream=True)
    amax: dict[str, float] = {name: 0.0 for name in names}
    inputs = capture_inputs(model, arch, list(tokens.split(BATCH)), cpu)
    for i, layer in enumerate(layers_of(model, arch)):
        prefix = contents.layer_prefix(i)
        source.materialize(layer, prefix, cpu)
        _watch(model, [n for n in names if n.startswith(prefix)], amax)
        inputs = inputs.with_hidden(run_layer(layer, inputs, cpu))
        layer.to("meta")  # done with it
    rest = [n for n in names if not n.startswith(f"{arch.layers}.")]
    if rest:  # model-level linears (lm_head) read the final norm's output
        _watch(model, rest, amax)
        head = get_module(model, arch.lm_head)
        for hidden in inputs.hidden:
            head(final_hidden(model, arch, hidden))
    return amax


def _watch(model: torch.nn.Module, names: list[str], amax: dict[str, float]) -> None:
    for name in names:
        pipe = model.get_submodule(name).orthoquant_inputs
        pipe.quantizer = _observed(pipe.quantizer, amax, name)


def _observed(quantizer, amax: dict[str, float], name: str):
    def observe(x: torch.Tensor) -> torch.Tensor:
        amax[name] = max(amax[name], float(x.detach().abs().max()))
        return quantizer(x) if quantizer is not None else x
    return observe
