"""Where the frozen decoder layers live between their uses during a fit.

The fit visits the layers in order (forward) and in reverse (backward), one at a time
(:mod:`.step`); a residency makes layer i's weights usable on the device for the duration of
``use(i)`` and says which layer comes next, so it can be fetched while i computes. Layers enter a
residency one at a time as they are read (:meth:`Resident.adopt`, after :meth:`Resident.home`), so a
process never holds more of the model than its residency keeps plus the one layer being read.

- :class:`Resident`: every layer stays on the device (the model as loaded).
- :class:`Offloaded` (``fitting.offload: cpu``): the weights stay in CPU memory (pinned on CUDA) and
  are copied in for each use on a side stream, the next layer's copy overlapping the current layer's
  compute. Device memory ≈ two layers of weights plus what the step itself holds.
- :class:`Sharded` (under ``torchrun``): each layer is ``fully_shard``-ed over the processes (FSDP2)
  as soon as it is read, which frees its whole copy: a process holds 1/N of the layers (shard on
  load); ``use`` all-gathers one and reshards it afterwards. The layer is then called without FSDP's hooks,
  which would otherwise re-register its own parameters over the folded ones the step swaps in. The
  embedding and lm_head are sharded too (:meth:`Resident.adopt_whole_uses`) and gathered only while
  used (:meth:`Resident.whole`: the embedding for a step's inputs, lm_head for its loss), so a process
  holds 1/N of every weight between uses. Measured (``scripts/bench_fit_shard.py``, 2 processes) this
  lowers the fit's peak although lm_head is gathered whole for the loss: the peak is the decoder layers'
  backward (one gathered layer, its folds and their graph), during which both stay sharded.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

Key = tuple[nn.Module, str]


def world() -> tuple[int, int]:
    """(rank, number of processes) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], hooks: bool = True) -> torch.Tensor:
    out = layer(hidden, **kwargs) if hooks else layer.forward(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Resident:
    """Every layer already on the device."""

    name = "none"

    def home(self, device: torch.device) -> torch.device:
        """Where a layer is read to before :meth:`adopt` takes it."""
        return device

    def adopt(self, layer: nn.Module) -> None:
        """Take the next decoder layer (read at :meth:`home`, norms folded, frozen) into this residency."""

    def use(self, index: int, following: int | None = None):
        return nullcontext()

    def call(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return call_layer(layer, hidden, kwargs)

    def stash(self, hidden: torch.Tensor) -> torch.Tensor:
        """Where a kept layer input waits for the backward pass (here: where it is)."""
        return hidden

    def fetch(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def finish(self, restore: bool = True) -> None:
        """After the fit; ``restore``: leave the layers where they were before it."""

    def adopt_whole_uses(self, modules: list[nn.Module]) -> None:
        """Take modules used whole now and then (embedding, lm_head) for the fit's duration."""

    def whole(self, module: nn.Module):
        """Within the block, ``module`` (one of :meth:`adopt_whole_uses`') is whole on the device."""
        return nullcontext()


def _parameters(layer: nn.Module) -> list[Key]:
    return [(m, n) for m in layer.modules() for n, p in m._parameters.items() if p is not None]


class Offloaded(Resident):
    """Layer weights in (pinned) CPU memory, streamed to ``device`` one layer at a time."""

    name = "cpu"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host: list[dict[Key, nn.Parameter]] = []
        self.pending: dict[int, tuple[dict[Key, torch.Tensor], Any]] = {}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def home(self, device: torch.device) -> torch.device:
        return torch.device("cpu")  # an offloaded layer never sits on the device whole

    def adopt(self, layer: nn.Module) -> None:
        """Keep the layer's parameters in CPU memory (pinned when the device is CUDA)."""
        host = {}
        for module, name in _parameters(layer):
            value = module._parameters[name].detach().to("cpu")
            if self.stream is not None:
                value = value.pin_memory()
            host[(module, name)] = module._parameters[name] = nn.Parameter(value, requires_grad=False)
        self.host.append(host)

    def _fetch(self, index: int) -> None:
        """Start copying layer ``index`` to the device (asynchronously on CUDA)."""
        if index in self.pending:
            return
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with ctx:  # copy=True: on a CPU "device" the copy is real too, so the swap logic is exercised
            copies = {key: p.detach().to(self.device, non_blocking=True, copy=True)
                      for key, p in self.host[index].items()}
            event = self.stream.record_event() if self.stream is not None else None
        self.pending[index] = (copies, event)

    @contextmanager
    def use(self, index: int, following: int | None = None) -> Iterator[None]:
        self._fetch(index)
        copies, event = self.pending.pop(index)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for value in copies.values():  # allocated on the side stream, used on this one
                value.record_stream(torch.cuda.current_stream(self.device))
        for (module, name), value in copies.items():
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        if following is not None:
            self._fetch(following)  # overlaps this layer's compute
        try:
            yield
        finally:
            for key, host in self.host[index].items():
                key[0]._parameters[key[1]] = host

    def stash(self, hidden: torch.Tensor) -> torch.Tensor:
        """Kept layer inputs wait in CPU memory too (pinned on CUDA): (layers + 1) of them per step."""
        if self.stream is None:
            return hidden
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        return host.copy_(hidden, non_blocking=True)

    def fetch(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.device, non_blocking=True)

    def finish(self, restore: bool = True) -> None:
        """Put every layer back on the device, as it was before the fit (``restore``; a streamed model
        releases its layers instead, and a model larger than the device must never be restored)."""
        self.pending.clear()
        for host in self.host if restore else ():
            for (module, name), p in host.items():
                module._parameters[name] = nn.Parameter(p.detach().to(self.device), requires_grad=False)
        self.host = []


class Sharded(Resident):
    """FSDP2: every layer ``fully_shard``-ed over the default process group; a use all-gathers it.

    Each layer is sharded as soon as it is read and its norms folded: ``fully_shard`` keeps this
    process's shard and drops the whole copy, so the next layer is read into the memory the last one
    left. Layers are read in CPU memory (FSDP2 moves each to the process's GPU when sharding it under
    NCCL). :meth:`finish` removes FSDP from them, gathering them back into plain parameters (an
    in-memory model) or leaving them unloaded (a streamed one, which the layer-wise solve reads again).
    """

    name = "fsdp"

    def __init__(self, device: torch.device) -> None:
        self.device, self.mesh = device, None
        self.layers: list[nn.Module] = []
        self.classes: list[type] = []
        self.others: list[tuple[nn.Module, type]] = []

    def home(self, device: torch.device) -> torch.device:
        return torch.device("cpu")

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if self.mesh is None:
            self.mesh = init_device_mesh(self.device.type, (world()[1],))
        fully_shard(module, mesh=self.mesh)

    def adopt(self, layer: nn.Module) -> None:
        self.layers.append(layer)
        self.classes.append(type(layer))
        self._shard(layer)

    def adopt_whole_uses(self, modules: list[nn.Module]) -> None:
        """Shard each module too; FSDP's hooks are removed (the model's forward calls the embedding, and
        the loss reads lm_head's weight directly): :meth:`whole` gathers them."""
        for module in modules:
            self.others.append((module, type(module)))
            self._shard(module)
            for m in module.modules():
                _drop_fsdp_hooks(m)

    @contextmanager
    def whole(self, module: nn.Module) -> Iterator[None]:
        module.unshard()
        try:
            yield
        finally:
            module.reshard()

    @contextmanager
    def use(self, index: int, following: int | None = None) -> Iterator[None]:
        layer = self.layers[index]
        layer.unshard()
        try:
            yield
        finally:
            layer.reshard()

    def call(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return call_layer(layer, hidden, kwargs, hooks=False)  # FSDP's hooks would undo the swap

    def finish(self, restore: bool = True) -> None:
        """Plain layers again: gathered whole (``restore``, a collective) or left on the meta device;
        embedding and lm_head gathered whole on process 0 (a collective) and dropped on the others."""
        for layer, cls in zip(self.layers, self.classes):
            _unshard_for_good(layer, cls, restore, restore)
        first = world()[0] == 0  # only process 0 deploys and solves: the others drop them at once
        for module, cls in self.others:
            _unshard_for_good(module, cls, True, first)
        self.layers, self.classes, self.others = [], [], []


def _unshard_for_good(layer: nn.Module, cls: type, gather: bool, keep: bool) -> None:
    """Remove FSDP from ``layer`` (of class ``cls`` before it), its parameters plain again: gathered
    (``gather``, a collective) and kept whole (``keep``), else left on the meta device."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping

    if gather:
        layer.unshard()
    plain = {key: _plain(key[0]._parameters[key[1]], keep) for key in _parameters(layer)}
    layer.__class__ = cls
    for module in layer.modules():
        _drop_fsdp_hooks(module)
    _module_state_mapping.pop(layer, None)
    for key in (STATE_KEY, REGISTRY_KEY):  # the layer's own reference to its FSDP state (and shards)
        layer.__dict__.pop(key, None)
    for (module, name), value in plain.items():
        module._parameters[name] = nn.Parameter(value, requires_grad=False)


def _plain(param: torch.Tensor, whole: bool) -> torch.Tensor:
    """A gathered parameter's copy (``whole``), else an unloaded (meta) tensor of its shape and dtype."""
    if whole:
        return param.detach().clone()
    return torch.empty(param.shape, dtype=param.dtype, device="meta")


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_state_dict_pre_hooks", "_state_dict_hooks",
          "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _drop_fsdp_hooks(module: nn.Module) -> None:
    """Remove the hooks FSDP2 registered on ``module`` (forward, and the state-dict hooks that would
    turn its parameters back into shards), leaving any other hook in place."""
    for attr in _HOOKS:
        hooks = getattr(module, attr)
        for key in [k for k, h in hooks.items() if "fsdp" in getattr(getattr(h, "func", h), "__module__", "")]:
            del hooks[key]


def residency_for(offload: str, device: torch.device) -> Resident:
    """Sharded under several processes, else offloaded or resident as ``fitting.offload`` says."""
    if world()[1] > 1:
        if offload != "none":
            raise ConfigError(f"fitting.offload={offload} with {world()[1]} processes is not supported: FSDP2 "
                              "shards the weights across the processes instead; drop fitting.offload")
        return Sharded(device)
    return Offloaded(device) if offload == "cpu" else Resident()
