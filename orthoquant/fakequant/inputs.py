"""Ordered operations on a linear's input (forward pre-hook) and output (forward hook).

Online transforms must act before the activation quantizer whatever order they were installed in,
so one hook per module runs explicit stages: the recipe's planned transforms (``plan``), then
transforms chosen by the weight solver for this linear (``solver``, e.g. WUSH blocks, QuIP#'s
input RHT), then the quantizer. Statistics hooks registered later see the pipeline's output.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

Op = Callable[[torch.Tensor], torch.Tensor]
STAGES = ("plan", "solver")


class InputPipeline:
    """Per-stage transforms, then an optional quantizer, applied to ``args[0]`` of a forward."""

    def __init__(self) -> None:
        self.stages: dict[str, list[Op]] = {stage: [] for stage in STAGES}
        self.quantizer: Op | None = None

    def set(self, stage: str, ops: list[Op]) -> None:
        """Replace the ops of one stage (installing twice is harmless)."""
        self.stages[stage] = list(ops)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        for stage in STAGES:
            for op in self.stages[stage]:
                x = op(x)
        if self.quantizer is not None:
            x = self.quantizer(x)
        return (x, *args[1:])


class OutputPipeline:
    """Transforms applied to a module's output (QuIP#'s output-side RHT)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            output = op(output)
        return output


class SharedQuantizer:
    """One input quantizer for several linears of a layer (same spec): linears that read the same tensor
    (q/k/v, gate/up) get the first one's result instead of quantizing it again.

    A result is reused only for the very tensor it was computed from, when neither has been modified in
    place since (their version counters), outside inference mode (whose tensors have no version counter)
    and without grad. The tensor is held by a weak reference and the result is dropped when that tensor
    dies, so nothing outlives the forward that made it.
    """

    def __init__(self, op: Op) -> None:
        self.op = op
        self._source: weakref.ref | None = None
        self._result: torch.Tensor | None = None
        self._versions = (-1, -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad or x.is_inference() or torch.is_inference_mode_enabled():
            return self.op(x)
        cached = self._result
        if cached is not None and self._source() is x and (x._version, cached._version) == self._versions:
            return cached
        result = self.op(x)
        self._forget()
        self._source, self._result = weakref.ref(x, self._forget), result
        self._versions = (x._version, result._version)
        return result

    def _forget(self, dead: weakref.ref | None = None) -> None:
        if dead is None or dead is self._source:  # a callback from an older source clears nothing newer
            self._source, self._result = None, None


def _hooked(module: nn.Module, attr: str, make, register) -> object:
    """The pipeline stored on ``module`` under ``attr``, created and registered as a hook on first use."""
    pipe = getattr(module, attr, None)
    if pipe is None:
        pipe = make()
        setattr(module, attr, pipe)
        register(module, pipe)
    return pipe


def input_pipeline(module: nn.Module) -> InputPipeline:
    """The module's input pipeline, created (and hooked) on first use."""
    return _hooked(module, "orthoquant_inputs", InputPipeline, nn.Module.register_forward_pre_hook)


def output_pipeline(module: nn.Module) -> OutputPipeline:
    """The module's output pipeline, created (and hooked) on first use."""
    return _hooked(module, "orthoquant_outputs", OutputPipeline, nn.Module.register_forward_hook)


def set_input_quantizer(module: nn.Module, quantizer: Op | None) -> None:
    input_pipeline(module).quantizer = quantizer
