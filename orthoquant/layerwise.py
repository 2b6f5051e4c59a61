"""Layer-by-layer execution: capture the inputs of layer 0, then push them through one layer at a time.

Only one decoder layer and the activation cache (nsamples x seqlen x hidden, on CPU by default)
are resident at a time, so peak memory does not grow with depth. Quantization (``runner.py``) and
layer-streamed perplexity (``evaluate/ppl.py``) both build on these two primitives.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .models.spec import ArchSpec
from .models.surgery import get_module, layers_of


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """What the next decoder layer reads, batch by batch.

    :ivar hidden: per batch, (batch, seq, hidden) on the cache device.
    :ivar kwargs: per batch, the keyword arguments the model passes to every layer (attention mask,
        position embeddings, position ids), on the cache device.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _Catcher(nn.Module):
    def __init__(self, store: LayerInputs, cache: torch.device | str, layer: nn.Module) -> None:
        super().__init__()
        self.store, self.cache = store, cache
        self.signature = inspect.signature(layer.forward)

    def forward(self, hidden, *args, **kwargs):
        self.store.hidden.append(hidden.detach().to(self.cache))
        if args:  # some models (GPT-2) pass the mask positionally: keep it, by its name
            bound = self.signature.bind_partial(hidden, *args)
            kwargs = {**dict(list(bound.arguments.items())[1:]), **kwargs}
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        self.store.kwargs.append(_to(kwargs, self.cache))
        raise _StopForward


@torch.no_grad()
def capture_inputs(model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor], device: torch.device,
                   cache: torch.device | str = "cpu") -> LayerInputs:
    """Run the model's embedding on each batch of token ids and record what layer 0 receives.

    The non-layer modules (embedding, rotary) must be materialised on ``device``.
    """
    layers = layers_of(model, spec)
    first = layers[0]
    store = LayerInputs()
    layers[0] = _Catcher(store, cache, first)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = first
    return store


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device, keep: bool = True) -> list[torch.Tensor]:
    """Outputs of ``layer`` for every cached batch (on the cache device), or [] if ``keep`` is False."""
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        out = layer(hidden.to(device), **_to(kwargs, device))
        out = out[0] if isinstance(out, tuple) else out
        if keep:
            outputs.append(out.to(hidden.device))
    return outputs


@torch.no_grad()
def final_hidden(model: nn.Module, spec: ArchSpec, hidden: torch.Tensor) -> torch.Tensor:
    """The final norm applied to the last layer's output (what lm_head reads)."""
    return get_module(model, spec.final_norm)(hidden)
