"""A recipe's transforms, built for one model: fuse them into weights and attach the online parts.

Random Hadamards draw their signs from a private generator seeded from the recipe (a per-layer seed
for per-layer sites), so a run, its resume and its reload rebuild identical transforms.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ConfigError
from ..hadamard import hadamard_factor, random_signs
from ..models.spec import ArchSpec
from .base import AcrossBlocks, Hadamard, PerBlock, Transform
from .sites import SITE_ORDER, SITES, Dims, fuse_residual_rest

if TYPE_CHECKING:
    from ..config import TransformSpec

KINDS = ("hadamard", "random_hadamard")


def layer_seed(seed: int, index: int) -> int:
    """Distinct, reproducible seeds per layer (index -1: the model-level residual transform)."""
    return seed * 1_000_003 + index + 1


def build_transform(spec: "TransformSpec", width: int, seed: int) -> Transform:
    """The Hadamard of ``spec`` for a site of ``width`` (block-diagonal if ``spec.block_size``)."""
    block = spec.block_size or width
    if width % block:
        raise ConfigError(f"transforms.block_size={spec.block_size} does not divide the {spec.site} width {width}")
    hadamard_factor(block)  # raises, naming the size, when no Hadamard of that order can be built
    signs = random_signs(width, seed).to(torch.float64) if spec.kind == "random_hadamard" else None
    if block == width:
        return Hadamard(width, signs)
    inner = PerBlock(Hadamard(block), width // block)
    return inner if signs is None else _Signed(inner, signs)


class _Signed(Transform):
    """``diag(s) · M`` for an orthogonal M: signs first, then the mixing."""

    def __init__(self, inner: Transform, signs: torch.Tensor) -> None:
        self.inner, self.signs, self.dim = inner, signs, inner.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward(x * self.signs.to(x))


class TransformPlan:
    """The transforms of a recipe for a model of dimensions ``dims``."""

    def __init__(self, specs: tuple["TransformSpec", ...], dims: Dims, arch: ArchSpec) -> None:
        self.specs = {s.site: s for s in specs}
        self.dims, self.arch = dims, arch
        for s in specs:  # fail early, naming the size, rather than inside layer 37
            self.transform(s.site, 0)

    def __bool__(self) -> bool:
        return bool(self.specs)

    @lru_cache(maxsize=None)
    def transform(self, site: str, index: int) -> Transform:
        spec = self.specs[site]
        per_layer = SITES.get(site).per_layer and site != "residual"
        seed = layer_seed(spec.seed, index if per_layer else -1)
        t = build_transform(spec, SITES.get(site).width(self.dims), seed)
        return AcrossBlocks(t, self.dims.head_dim) if site == "o_input" else t

    def fuse_rest(self, model: nn.Module) -> None:
        if "residual" in self.specs:
            fuse_residual_rest(model, self.arch, self.transform("residual", -1))

    def fuse_layer(self, layer: nn.Module, index: int) -> None:
        """Fold every site's weight side into a freshly loaded layer (norms already folded)."""
        for name in SITE_ORDER:
            site = SITES.get(name)
            if name in self.specs and site.fuse is not None:
                site.fuse(layer, self.arch, self.dims, self.transform(name, index))

    def attach_layer(self, layer: nn.Module, index: int) -> None:
        """Install the online parts (idempotent: each call replaces what the last installed)."""
        for name in SITE_ORDER:
            site = SITES.get(name)
            if name in self.specs and site.online:
                site.attach(layer, self.arch, self.dims, self.transform(name, index))
