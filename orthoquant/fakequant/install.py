"""Attach the recipe's activation and KV-cache fake-quantizers to a decoder layer, and calibrate
static KV-cache and NVFP4 input scales (see :mod:`.kvcache`, :mod:`.static_inputs`)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import Recipe
from ..formats import make_format
from ..models.spec import ArchSpec
from ..models.surgery import get_module, linears_of
from .attention import set_kv_quantizers
from .inputs import SharedQuantizer, input_pipeline, set_input_quantizer
from .kvcache import RangeObserver, is_static, kv_ops, prepare_kv_scales, set_kv_scales
from .static_inputs import (AmaxObserver, is_static_input, prepare_input_scales, set_input_scale,
                            static_input_op, static_linears)


def install_input_quantizers(layer: nn.Module, prefix: str, arch: ArchSpec, recipe: Recipe,
                             dynamic: bool = False) -> None:
    """Fake-quantize each targeted linear's input as the recipe says.

    Linears with the same dynamic spec share one :class:`SharedQuantizer`, so a tensor that several of them
    read (q/k/v, gate/up) is quantized once; a static spec's scale belongs to its linear.

    :param dynamic: per-call scales even where the recipe's are static (while calibrating them).
    :raises UserError: a static input scale is asked for but the linear has none.
    """
    shared: dict = {}  # dynamic QuantSpec -> its quantizer in this layer
    for role, lin in linears_of(layer, arch).items():
        name = prefix + arch.path(role)
        a_spec = recipe.activations_for(name)
        if a_spec is not None and a_spec.per_head:  # only then: a generic model's attention may not say
            a_spec = a_spec.for_head_dim(get_module(layer, arch.attention).head_dim)
        if a_spec is None:
            set_input_quantizer(lin, None)
        elif is_static_input(a_spec) and not dynamic:
            set_input_quantizer(lin, static_input_op(make_format(a_spec), lin, name))
        else:
            if a_spec not in shared:
                shared[a_spec] = SharedQuantizer(make_format(a_spec).fake_quant)
            set_input_quantizer(lin, shared[a_spec])


def install_layer_quantizers(layer: nn.Module, prefix: str, arch: ArchSpec, recipe: Recipe) -> None:
    """Fake-quantize each targeted linear's input and the attention's keys/values as the recipe says.

    :param prefix: the layer's full name with a trailing dot, used to match recipe patterns.
    :raises UserError: the recipe's KV scales are static and the layer has none.
    """
    install_input_quantizers(layer, prefix, arch, recipe)
    if recipe.kv_cache is not None:
        attention = get_module(layer, arch.attention)
        set_kv_quantizers(attention, *kv_ops(attention, recipe.kv_cache, prefix + arch.attention))


def prepare_layer_scales(layer: nn.Module, prefix: str, arch: ArchSpec, recipe: Recipe) -> None:
    """Placeholders for the calibrated scales a stored layer holds (static KV and input scales)."""
    prepare_kv_scales(layer, arch, recipe)
    prepare_input_scales(layer, prefix, arch, recipe)


@torch.no_grad()
def calibrate_static_scales(layer: nn.Module, prefix: str, arch: ArchSpec, recipe: Recipe,
                            forward: Callable[[], object]) -> None:
    """Observe a solved layer once and store its static scales: the KV cache's (kv_cache.static) and the
    NVFP4 input global scales (activations.static). No-op when the recipe has neither. Afterwards the
    layer quantizes with them.

    :param forward: runs the layer on the calibration inputs (its weights already quantized and its
        online transforms attached); activation fake-quant is installed first, as at inference, with
        per-call scales where they are being calibrated.
    """
    inputs = static_linears(layer, prefix, arch, recipe)
    if not is_static(recipe) and not inputs:
        return
    attention = get_module(layer, arch.attention)
    install_input_quantizers(layer, prefix, arch, recipe, dynamic=True)
    observers = {name: AmaxObserver(input_pipeline(lin).quantizer) for name, lin in inputs.items()}
    for name, lin in inputs.items():
        set_input_quantizer(lin, observers[name])
    if is_static(recipe):
        key, value = RangeObserver(), RangeObserver()
        set_kv_quantizers(attention, key, value)
    forward()
    for name, lin in inputs.items():
        set_input_scale(lin, observers[name])
    if is_static(recipe):
        set_kv_scales(attention, make_format(recipe.kv_cache), key, value)
    install_layer_quantizers(layer, prefix, arch, recipe)

