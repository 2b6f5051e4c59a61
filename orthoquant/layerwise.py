"""Layer-by-layer execution: capture the inputs of layer 0, then push them through one layer at a time.

Only one decoder layer and the activation cache (nsamples x seqlen x hidden, on CPU by default)
are resident at a time, so peak memory does not grow with depth. Quantization (``runner.py``) and
layer-streamed perplexity (``evaluate/ppl.py``) both build on these two primitives.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

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
    :ivar kwargs: per batch, the keyword arguments the model passes to layer 0 (attention mask,
        position embeddings, position ids), on the cache device.
    :ivar by_layer: the layers that get other keyword arguments (Gemma's sliding-window and global
        layers: other masks, other RoPE), each with its own per-batch list (shared by layers that get
        the same tensors).
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    by_layer: dict[nn.Module, list[dict[str, Any]]] = field(default_factory=dict)

    def with_hidden(self, hidden: list[torch.Tensor]) -> "LayerInputs":
        """The same per-layer arguments with other hidden states (the next layer's inputs)."""
        return dataclasses.replace(self, hidden=hidden)

    def kwargs_for(self, layer: nn.Module) -> list[dict[str, Any]]:
        return self.by_layer.get(layer, self.kwargs)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` (a layer's keyword arguments: tensors in tuples, lists and dicts) with ``fn`` applied to
    every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _to(obj: Any, device: torch.device | str) -> Any:
    return map_tensors(obj, lambda t: t.to(device))


def _identity(value: Any) -> Any:
    """What identifies the arguments a layer gets: the tensors' objects (layers of one kind share them)."""
    if isinstance(value, torch.Tensor):
        return id(value)
    if isinstance(value, (tuple, list)):
        return tuple(_identity(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _identity(v)) for k, v in value.items())
    return repr(value)


class _Catcher(nn.Module):
    """Stands in for decoder layer ``index`` during one forward: records the keyword arguments the model
    passes it (layer 0: the hidden states too) and hands its input on; the last one stops the forward."""

    def __init__(self, records: dict, index: int, last: bool, layer: nn.Module) -> None:
        super().__init__()
        self.records, self.index, self.last = records, index, last
        self.signature = inspect.signature(layer.forward)

    def forward(self, hidden, *args, **kwargs):
        if args:  # some models (GPT-2) pass the mask positionally: keep it, by its name
            bound = self.signature.bind_partial(hidden, *args)
            kwargs = {**dict(list(bound.arguments.items())[1:]), **kwargs}
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        self.records[self.index] = (hidden, kwargs)
        if self.last:
            raise _StopForward
        return hidden


def _record_other_kinds(store: LayerInputs, layers: list[nn.Module], records: dict, cache) -> None:
    """Append one batch's arguments of the layers that get other ones than layer 0; layers getting the
    same tensors share one list (stored once)."""
    first_of: dict[Any, int] = {}
    for i in range(len(layers)):
        first = first_of.setdefault(_identity(records[i][1]), i)
        if first == 0:
            continue
        if first == i:
            store.by_layer.setdefault(layers[i], []).append(_to(records[i][1], cache))
        else:
            store.by_layer[layers[i]] = store.by_layer[layers[first]]


@torch.no_grad()
def capture_inputs(model: nn.Module, arch: ArchSpec, batches: list[torch.Tensor], device: torch.device,
                   cache: torch.device | str = "cpu") -> LayerInputs:
    """Run the model's embedding on each batch of token ids and record what layer 0 receives, and the
    keyword arguments of every layer that gets other ones than layer 0 (its own mask or RoPE).

    The non-layer modules (embedding, rotary) must be materialised on ``device``.
    """
    layers = layers_of(model, arch)
    originals = list(layers)
    records: dict[int, tuple] = {}
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(records, i, i == len(originals) - 1, layer)
    store = LayerInputs()
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            store.hidden.append(records[0][0].detach().to(cache))
            store.kwargs.append(_to(records[0][1], cache))
            _record_other_kinds(store, originals, records, cache)
            records.clear()
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return store


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device, keep: bool = True) -> list[torch.Tensor]:
    """Outputs of ``layer`` for every cached batch (on the cache device), or [] if ``keep`` is False."""
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs_for(layer)):
        out = layer(hidden.to(device), **_to(kwargs, device))
        out = out[0] if isinstance(out, tuple) else out
        if keep:
            outputs.append(out.to(hidden.device))
    return outputs


@torch.no_grad()
def final_hidden(model: nn.Module, arch: ArchSpec, hidden: torch.Tensor) -> torch.Tensor:
    """The final norm applied to the last layer's output (what lm_head reads)."""
    return get_module(model, arch.final_norm)(hidden)
