"""Attach the recipe's activation and KV-cache fake-quantizers to a decoder layer, and calibrate
static KV-cache scales (see :mod:`.kvcache`)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import Recipe
from ..formats import make_format
from ..models.spec import ArchSpec
from ..models.surgery import get_module, linears_of
from .attention import set_kv_quantizers
from .inputs import set_input_quantizer
from .kvcache import RangeObserver, is_static, kv_ops, set_kv_scales


def install_input_quantizers(layer: nn.Module, prefix: str, spec: ArchSpec, recipe: Recipe) -> None:
    """Fake-quantize each targeted linear's input as the recipe says."""
    for role, lin in linears_of(layer, spec).items():
        a_spec = recipe.activations_for(prefix + spec.path(role))
        if a_spec is not None and a_spec.per_head:  # only then: a generic model's attention may not say
            a_spec = a_spec.for_head_dim(get_module(layer, spec.attention).head_dim)
        set_input_quantizer(lin, make_format(a_spec).fake_quant if a_spec is not None else None)


def install_layer_quantizers(layer: nn.Module, prefix: str, spec: ArchSpec, recipe: Recipe) -> None:
    """Fake-quantize each targeted linear's input and the attention's keys/values as the recipe says.

    :param prefix: the layer's full name with a trailing dot, used to match recipe patterns.
    :raises UserError: the recipe's KV scales are static and the layer has none.
    """
    install_input_quantizers(layer, prefix, spec, recipe)
    if recipe.kv_cache is not None:
        attention = get_module(layer, spec.attention)
        set_kv_quantizers(attention, *kv_ops(attention, recipe.kv_cache, prefix + spec.attention))


@torch.no_grad()
def calibrate_kv_scales(layer: nn.Module, prefix: str, spec: ArchSpec, recipe: Recipe,
                        forward: Callable[[], object]) -> None:
    """Observe the keys and values of a solved layer and store its static KV scales (no-op unless the
    recipe's KV scales are static). Afterwards the layer quantizes its KV cache with them.

    :param forward: runs the layer on the calibration inputs (its weights already quantized and its
        online transforms attached); activation fake-quant is installed first, as at inference.
    """
    if not is_static(recipe):
        return
    attention = get_module(layer, spec.attention)
    install_input_quantizers(layer, prefix, spec, recipe)
    key, value = RangeObserver(), RangeObserver()
    set_kv_quantizers(attention, key, value)
    forward()
    set_kv_scales(attention, make_format(recipe.kv_cache), key, value)
    set_kv_quantizers(attention, *kv_ops(attention, recipe.kv_cache, prefix + spec.attention))
