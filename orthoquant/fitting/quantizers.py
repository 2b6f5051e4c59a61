"""Fake-quantizers of the fitting: activations with a plain straight-through estimator (SpinQuant,
``fitting.ste: plain``) or with the gradient also flowing through the scale (OSTQuant,
``fitting.ste: pass_scale``); weights straight-through except where they are clipped.

A pure straight-through estimator (``x + (q − x).detach()``) gives the transforms no reason to shrink
an outlier: the scale that the outlier inflates is invisible to the gradient. SpinQuant and OSTQuant
only make the rounding straight-through and let the dynamic min/max scale carry gradient (as LSQ
does): ``q = s · (x/s + ((q₀ − x)/s).detach())``, so ``∂q/∂s = (q₀ − x)/s`` is the rounding error.
The value returned is exactly ``q₀``, the format's own quantize-dequantize — the same number the
deployed quantizer computes; only the backward pass differs.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import Recipe
from ..fakequant.attention import set_kv_quantizers
from ..fakequant.inputs import set_input_quantizer
from ..formats import QuantFormat, make_format
from ..models.spec import ArchSpec
from ..models.surgery import get_module, linears_of


def scale_grad_fake_quant(fmt: QuantFormat, x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` (..., d) row-wise; gradient straight through the rounding and
    through the scale. Formats with a per-tensor global scale fall back to the plain STE."""
    if not x.requires_grad:
        return fmt.fake_quant(x)
    rows = x.reshape(-1, x.shape[-1]).float()
    params = fmt.fit(rows)
    if params.global_scale is not None:
        return fmt.fake_quant(x)
    cols = params.columns(rows.shape[-1])
    with torch.no_grad():  # exactly QuantFormat.quantize_dequantize, reusing the fitted scales
        q0 = fmt.decode(fmt.encode(rows, cols), cols)
    scale = cols.scale
    surrogate = scale * (rows / scale + ((q0 - rows) / scale).detach())
    # q0 exactly in value (surrogate − surrogate.detach() is 0), the surrogate's gradient
    return (q0 + (surrogate - surrogate.detach())).reshape(x.shape).to(x.dtype)


def plain_fake_quant(fmt: QuantFormat, x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` row-wise, the gradient passed straight to ``x`` (none to the scale)."""
    return fmt.fake_quant(x)


STES = {"plain": plain_fake_quant, "pass_scale": scale_grad_fake_quant}


def install_fitting_quantizers(layer: nn.Module, prefix: str, arch: ArchSpec, recipe: Recipe) -> None:
    """The recipe's activation and KV quantizers on ``layer``, in their fitting form."""
    ste = STES[recipe.fitting.ste]

    def op(q_spec):
        return functools.partial(ste, make_format(q_spec)) if q_spec is not None else None

    head_dim = get_module(layer, arch.attention).head_dim
    for role, lin in linears_of(layer, arch).items():
        a_spec = recipe.activations_for(prefix + arch.path(role))
        set_input_quantizer(lin, op(a_spec.for_head_dim(head_dim) if a_spec is not None else None))
    kv = op(recipe.kv_cache)
    set_kv_quantizers(get_module(layer, arch.attention), kv, kv)


def weight_ste(fmt: QuantFormat, w: torch.Tensor) -> torch.Tensor:
    """The format's quantize-dequantize of a weight (out, in), its gradient passed straight to ``w``
    except at clipped weights, which get none (OSTQuant's and SpinQuant's ``clamp(round_ste(w/s))``:
    a clipped weight is one the rounding moved by more than half a quantization step). Only integer
    grids have one step (the scale); other formats pass every weight's gradient."""
    rows = w.detach().reshape(-1, w.shape[-1]).float()
    cols = fmt.fit(rows).columns(rows.shape[-1])
    q = fmt.decode(fmt.encode(rows, cols), cols)
    if fmt.spec.format == "int":
        mask = ((q - rows).abs() <= 0.5 * cols.scale.expand_as(rows) * (1 + 1e-6)).reshape(w.shape).to(w.dtype)
    else:
        mask = torch.ones_like(w)
    return q.reshape(w.shape).to(w.dtype) + (w - w.detach()) * mask  # exactly q in value
