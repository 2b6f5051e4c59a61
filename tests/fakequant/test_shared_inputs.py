"""Linears that read the same tensor (q/k/v, gate/up) share one input quantizer: the tensor is quantized once
per forward, the model's output is bit for bit what per-linear quantizers give, and nothing is kept after."""
from __future__ import annotations

import gc
from unittest import mock

import pytest
import torch

from orthoquant.recipes import load_recipe
from orthoquant.fakequant.inputs import SharedQuantizer, input_pipeline, set_input_quantizer
from orthoquant.fakequant.install import install_layer_quantizers
from orthoquant.formats import make_format
from orthoquant.formats.fp4 import FP4Format
from orthoquant.models.generic import spec_for
from orthoquant.models.surgery import linears_of
from orthoquant.models.tiny import tiny_model

PRESETS = {"gptq-mxfp4": [], "gptq-nvfp4": ["activations.static=false"], "rtn-w4a4kv4": []}


def install(model, recipe) -> None:
    arch = spec_for(model.config)
    for i, layer in enumerate(model.model.layers):
        install_layer_quantizers(layer, f"model.layers.{i}.", arch, recipe)


def unshare(model, recipe) -> None:
    """One quantizer per linear, as before sharing."""
    arch = spec_for(model.config)
    for i, layer in enumerate(model.model.layers):
        for role, lin in linears_of(layer, arch).items():
            a_spec = recipe.activations_for(f"model.layers.{i}.{arch.path(role)}")
            set_input_quantizer(lin, make_format(a_spec).fake_quant)


@pytest.mark.parametrize("preset", PRESETS)
def test_shared_quantizers_give_the_same_logits(preset):
    recipe = load_recipe(preset, PRESETS[preset])
    model = tiny_model("llama")
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    install(model, recipe)
    with torch.no_grad():
        shared = model(tokens).logits
    unshare(model, recipe)
    with torch.no_grad():
        alone = model(tokens).logits
    assert torch.equal(shared.view(torch.int32), alone.view(torch.int32))


def test_each_distinct_input_is_quantized_once():
    """Per layer: q/k/v's input, o's, gate/up's and down's: 4 quantizations for 7 linears."""
    model = tiny_model("llama")
    install(model, load_recipe("gptq-mxfp4"))
    tokens = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with mock.patch.object(FP4Format, "quantize_dequantize", autospec=True,
                           side_effect=FP4Format.quantize_dequantize) as calls, torch.no_grad():
        model(tokens)
    assert calls.call_count == 4 * len(model.model.layers)


class Doubling:
    """A stand-in quantizer that counts its calls (and, unlike a Mock, keeps no reference to its inputs)."""

    def __init__(self) -> None:
        self.call_count = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.call_count += 1
        return x * 2


def quantizer() -> tuple[SharedQuantizer, Doubling]:
    op = Doubling()
    return SharedQuantizer(op), op


def test_reused_only_for_the_same_unmodified_tensor():
    shared, op = quantizer()
    x = torch.ones(3)
    first = shared(x)
    assert shared(x) is first and op.call_count == 1
    assert shared(x.clone()) is not first and op.call_count == 2  # an equal but other tensor
    y = torch.ones(3)
    shared(y)
    y.add_(1)  # the source changed in place
    assert torch.equal(shared(y), torch.full((3,), 4.0)) and op.call_count == 4
    out = shared(y)
    out.zero_()  # a reader changed the result in place
    assert torch.equal(shared(y), torch.full((3,), 4.0)) and op.call_count == 5


def test_not_reused_for_inputs_that_require_grad():
    shared, op = quantizer()
    x = torch.ones(3, requires_grad=True)
    shared(x)
    shared(x)
    assert op.call_count == 2


def test_inference_mode_quantizes_every_call():
    """Inference tensors have no version counter to trust: no reuse, and no error."""
    shared, op = quantizer()
    with torch.inference_mode():
        x = torch.ones(3)
        assert torch.equal(shared(x), torch.full((3,), 2.0))
        shared(x)
    shared(x)  # an inference tensor outside inference mode
    assert op.call_count == 3


def test_nothing_kept_once_the_input_dies():
    shared, _ = quantizer()
    x = torch.ones(3)
    shared(x)
    del x
    gc.collect()
    assert shared._result is None


def test_static_inputs_are_not_shared():
    """A static NVFP4 scale belongs to its linear, so its quantizer does too."""
    from orthoquant.fakequant.static_inputs import BUFFER

    model = tiny_model("llama")
    recipe = load_recipe("gptq-nvfp4", ["activations.static=true"])
    for lin in linears_of(model.model.layers[0], spec_for(model.config)).values():
        lin.register_buffer(BUFFER, torch.ones(1))
    install_layer_quantizers(model.model.layers[0], "model.layers.0.", spec_for(model.config), recipe)
    ops = [input_pipeline(lin).quantizer for lin in linears_of(model.model.layers[0], spec_for(model.config)).values()]
    assert not any(isinstance(op, SharedQuantizer) for op in ops)
