"""An ordered pipeline of operations on a linear's input, run by one forward pre-hook.

Online transforms (a Hadamard before down_proj, WUSH blocks) must act before the activation
quantizer, whatever order they were installed in; a single hook with explicit stages guarantees it.
Statistics hooks registered later see the pipeline's output.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Op = Callable[[torch.Tensor], torch.Tensor]


class InputPipeline:
    """Transforms (in order), then an optional quantizer, applied to ``args[0]`` of a module's forward."""

    def __init__(self) -> None:
        self.transforms: list[Op] = []
        self.quantizer: Op | None = None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        for op in self.transforms:
            x = op(x)
        if self.quantizer is not None:
            x = self.quantizer(x)
        return (x, *args[1:])

    def __bool__(self) -> bool:
        return bool(self.transforms) or self.quantizer is not None


def input_pipeline(module: nn.Module) -> InputPipeline:
    """The module's input pipeline, created (and hooked) on first use."""
    pipe = getattr(module, "orthoquant_inputs", None)
    if pipe is None:
        pipe = InputPipeline()
        module.orthoquant_inputs = pipe
        module.register_forward_pre_hook(pipe)
    return pipe


def set_input_quantizer(module: nn.Module, quantizer: Op | None) -> None:
    input_pipeline(module).quantizer = quantizer


def has_input_ops(module: nn.Module) -> bool:
    pipe = getattr(module, "orthoquant_inputs", None)
    return pipe is not None and bool(pipe)
