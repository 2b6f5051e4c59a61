"""Static NVFP4 input scales: calibrated once per linear when its layer is quantized, stored with the layer,
used by every call.

A dynamic NVFP4 quantizer takes its per-tensor global scale from each call's maximum, over the whole
batch and padding included, so a token's result depends on what it is batched with. vLLM and
compressed-tensors instead keep one static ``input_global_scale = 448·6 / amax`` per linear
(``dynamic="local"``: only the 16-wide block scales are per call). ``activations.static: true`` asks for
that: the runner observes the largest |x| each such linear's quantizer receives (after online transforms,
with the layer's weights quantized and the other inputs fake-quantized per call) on the calibration data,
and registers ``input_global_scale`` (1,) float32 as a buffer of the linear. The layer file stores it, the
fake-quantizer reads it at every call (global scale ``1 / input_global_scale``, the float32 value the
dynamic quantizer computes for the same amax), and the compressed-tensors export writes it as is.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..config import QuantSpec, Recipe
from ..errors import UserError
from ..formats import QuantFormat
from ..formats.fp4 import E2M1_MAX, E4M3_MAX
from ..models.spec import ArchSpec
from ..models.surgery import linears_of

BUFFER = "input_global_scale"  # compressed-tensors' name on the linear


def static_linears(layer: nn.Module, prefix: str, arch: ArchSpec, recipe: Recipe) -> dict[str, nn.Module]:
    """Full name -> linear of the layer's linears whose input spec is static (NVFP4 global scale)."""
    linears = {prefix + arch.path(role): lin for role, lin in linears_of(layer, arch).items()}
    return {name: lin for name, lin in linears.items()
            if (spec := recipe.activations_for(name)) is not None and spec.static}


def prepare_input_scales(layer: nn.Module, prefix: str, arch: ArchSpec, recipe: Recipe) -> None:
    """Register NaN placeholders so that a stored layer holding the scales loads into ``layer`` (a stored
    layer without them is then a loader error naming the key, never a silent dynamic scale)."""
    for lin in static_linears(layer, prefix, arch, recipe).values():
        if BUFFER not in lin._buffers:
            lin.register_buffer(BUFFER, torch.full((1,), math.nan))


def global_scale_of(amax: float) -> torch.Tensor:
    """(1,) float32 ``448·6 / amax``, compressed-tensors' ``input_global_scale`` of an input whose largest
    magnitude is ``amax``, computed by the same float32 expression as the dynamic quantizer's (so that its
    reciprocal is bit for bit the dynamic global scale of the same amax); an all-zero input gets 1, as there."""
    if amax == 0:
        return torch.ones(1)
    return (E4M3_MAX * E2M1_MAX) / torch.tensor([amax], dtype=torch.float32)


class AmaxObserver:
    """Wraps an input quantizer: records the largest |x| it is given, then quantizes as before."""

    def __init__(self, quantizer) -> None:
        self.quantizer, self.amax = quantizer, 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.amax = max(self.amax, float(x.detach().abs().max()))
        return self.quantizer(x)


def static_fake_quant(fmt: QuantFormat, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` (..., d) with per-call block scales under the stored global scale (read at
    each call, so a reloaded buffer is what is used); straight-through gradient."""
    shape = x.shape
    rows = x.detach().reshape(-1, shape[-1]).float()
    global_scale = (1 / getattr(linear, BUFFER).float().to(rows.device)).reshape(())
    q = fmt.quantize_dequantize(rows, global_scale).reshape(shape).to(x.dtype)
    return x + (q - x).detach() if x.requires_grad else q


def static_input_op(fmt: QuantFormat, linear: nn.Module, where: str):
    """The fake-quantizer of a static-input linear.

    :raises UserError: the linear has no calibrated scale (a run from before static inputs with a recipe
        saying static, or a layer never calibrated).
    """
    scale = linear._buffers.get(BUFFER)
    if scale is None or bool(torch.isnan(scale).any()):
        raise UserError(f"{where} has no calibrated {BUFFER}, which activations.static=true needs; it is "
                        "calibrated when the layer is quantized (re-run `orthoquant quantize` into a new folder)")
    return functools.partial(static_fake_quant, fmt, linear)


def set_input_scale(linear: nn.Module, observer: AmaxObserver) -> None:
    """Store the global scale of everything ``observer`` saw as the linear's buffer."""
    device = linear.weight.device if linear.weight.device.type != "meta" else torch.device("cpu")
    linear.register_buffer(BUFFER, global_scale_of(observer.amax).to(device))


def is_static_input(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.static
