"""Initial rotations: random Hadamard (QuaRot/SpinQuant, OSTQuant W4A16) or OSTQuant's weight KLT
(eigenvectors of the covariance of the weights that read a site, times a random Hadamard: the
eigenbasis decorrelates, the Hadamard then spreads outliers evenly over the channels)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from ..hadamard import random_signs
from ..models.spec import ArchSpec
from ..models.surgery import layers_of, linears_of
from ..transforms.base import Hadamard
from ..transforms.learnable import ParamKind, RotationInit
from ..transforms.plan import GLOBAL, layer_seed
from ..transforms.sites import Dims
from .qsur import Moments


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """``diag(s) · Had_n`` as a dense float64 (n, n) matrix."""
    return Hadamard(n, random_signs(n, seed).double()).matrix()


def _seed(seed: int, index: int, head: int = 0) -> int:
    return layer_seed(seed, index) * 1_009 + head


def hadamard_init(dims: Dims, seed: int) -> RotationInit:
    """Every rotation a random Hadamard with its own signs (per layer, per KV head)."""
    def init(kind: ParamKind, index: int) -> torch.Tensor:
        if kind.name == "R_res":
            return random_hadamard(dims.hidden, _seed(seed, GLOBAL))
        if kind.name == "R_ov":
            return torch.stack([random_hadamard(dims.head_dim, _seed(seed, index, h)) for h in range(dims.kv_heads)])
        return random_hadamard(dims.head_dim, _seed(seed, index))
    return init


def _eigenvectors(moments: Moments) -> torch.Tensor:
    """Columns: eigenvectors of the centred covariance of the rows added to ``moments``."""
    return torch.linalg.eigh(moments.cov()).eigenvectors


def _o_blocks(o: nn.Linear, dims: Dims) -> torch.Tensor:
    """o_proj columns grouped by KV head: (kv_heads, out · n_rep, head_dim) rows of each block."""
    n_rep = dims.heads // dims.kv_heads
    w = o.weight.detach().reshape(o.out_features, dims.kv_heads, n_rep, dims.head_dim)
    return w.permute(1, 0, 2, 3).reshape(dims.kv_heads, -1, dims.head_dim)


class ReadLayers:
    """Decoder layers whose weights ``use(i)`` makes readable (a fit's residency: offloaded layers are
    copied in, sharded ones gathered); a loop over them holds each one readable while it is at it."""

    def __init__(self, layers: nn.ModuleList, use: Callable[[int], ContextManager]) -> None:
        self.layers, self.use = layers, use

    def __getitem__(self, index: int) -> nn.Module:
        return self.layers[index]

    def __iter__(self) -> Iterator[nn.Module]:
        for i, layer in enumerate(self.layers):
            with self.use(i):
                yield layer


def klt_init(model: nn.Module, arch: ArchSpec, dims: Dims, seed: int, device: torch.device | None = None,
             use: Callable[[int], ContextManager] = lambda index: nullcontext()) -> RotationInit:
    """OSTQuant's KLT init from the (norm-folded) weights of ``model``, accumulated on ``device``
    (default: where the weights are), reading one layer at a time through ``use`` (see :class:`ReadLayers`)."""
    fallback = hadamard_init(dims, seed)
    layers = ReadLayers(layers_of(model, arch), use)

    def residual() -> torch.Tensor:
        where = device or linears_of(layers[0], arch)["q"].weight.device
        moments = Moments(dims.hidden, where)  # accumulated, never stacking all layers' rows
        for layer in layers:
            for role in arch.residual_readers():  # q/k/v, gate/up (every expert's)
                moments.add(linears_of(layer, arch)[role].weight.double())
        return _eigenvectors(moments).cpu() @ random_hadamard(dims.hidden, _seed(seed, GLOBAL))

    def per_head(index: int, head: int, blocks: torch.Tensor) -> torch.Tensor:
        moments = Moments(dims.head_dim, blocks.device)
        moments.add(blocks.double())
        return _eigenvectors(moments).cpu() @ random_hadamard(dims.head_dim, _seed(seed, index, head))

    def init(kind: ParamKind, index: int) -> torch.Tensor:
        if kind.name == "R_res":
            return residual()
        if kind.name not in ("R_ov", "R2"):
            return fallback(kind, index)
        with use(index):
            blocks = _o_blocks(linears_of(layers[index], arch)["o"], dims)
            if kind.name == "R_ov":
                return torch.stack([per_head(index, h, blocks[h]) for h in range(dims.kv_heads)])
            return per_head(index, 0, blocks.reshape(-1, dims.head_dim))
    return init
