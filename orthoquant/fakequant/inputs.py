"""Ordered operations on a linear's input (forward pre-hook) and output (forward hook).

Online transforms must act before the activation quantizer whatever order they were installed in,
so one hook per module runs explicit stages: the recipe's planned transforms (``plan``), then
transforms chosen by the weight solver for this linear (``solver``, e.g. WUSH blocks, QuIP#'s
input RHT), then the quantizer. Statistics hooks registered later see the pipeline's output.
"""
from __future__ import annotations

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
