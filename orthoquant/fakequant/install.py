"""Attach the recipe's activation and KV-cache fake-quantizers to a decoder layer."""
from __future__ import annotations

from torch import nn

from ..config import Recipe
from ..formats import make_format
from ..models.spec import ArchSpec
from ..models.surgery import get_module, linears_of
from .attention import set_kv_quantizers
from .inputs import set_input_quantizer


def install_layer_quantizers(layer: nn.Module, prefix: str, spec: ArchSpec, recipe: Recipe) -> None:
    """Fake-quantize each targeted linear's input and the attention's keys/values as the recipe says.

    :param prefix: the layer's full name with a trailing dot, used to match recipe patterns.
    """
    for role, lin in linears_of(layer, spec).items():
        a_spec = recipe.activations_for(prefix + spec.path(role))
        set_input_quantizer(lin, make_format(a_spec).fake_quant if a_spec is not None else None)
    if recipe.kv_cache is not None:
        fmt = make_format(recipe.kv_cache)
        set_kv_quantizers(get_module(layer, spec.attention), fmt.fake_quant, fmt.fake_quant)
