"""Saving and rebuilding transforms that a solver chose per linear (WUSH blocks, QuIP# signs).

Each serialisable transform type is registered with a name; its state is a dict of tensors.
"""
from __future__ import annotations

import torch

from ..registry import Registry
from .base import BlockDense, Dense, Diagonal, Hadamard, HadamardTranspose, Transform

TRANSFORM_TYPES: Registry[type] = Registry("transform type")
TRANSFORM_TYPES.add("hadamard", Hadamard)
TRANSFORM_TYPES.add("hadamard_transpose", HadamardTranspose)
TRANSFORM_TYPES.add("dense", Dense)
TRANSFORM_TYPES.add("diagonal", Diagonal)
TRANSFORM_TYPES.add("block_dense", BlockDense)


def type_name(t: Transform) -> str:
    for name in TRANSFORM_TYPES:
        if type(t) is TRANSFORM_TYPES.get(name):
            return name
    raise TypeError(f"{type(t).__name__} is not a registered transform type")


def transform_state(t: Transform, prefix: str) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors keyed ``prefix.<field>``, type name) of ``t``."""
    return {f"{prefix}.{k}": v for k, v in t.state().items()}, type_name(t)


def transform_from_state(name: str, tensors: dict[str, torch.Tensor], prefix: str) -> Transform:
    fields = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return TRANSFORM_TYPES.get(name).from_state(fields)
