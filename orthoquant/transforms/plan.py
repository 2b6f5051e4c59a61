"""A recipe's transforms, built for one model: fuse them into weights and attach the online parts.

Random Hadamards draw their signs from a private generator seeded from the recipe (a per-layer seed
for per-layer sites), so a run, its resume and its reload rebuild identical transforms. Learned
transforms (fitted or imported, :mod:`orthoquant.fitting`) join the plan through :meth:`set_learned`
and are fused by the same site functions.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..hadamard import hadamard_factor, random_signs
from ..models.spec import ArchSpec
from .base import AcrossBlocks, Hadamard, PerBlock, Transform
from .folding import IN_PLACE, Folding
from .sites import SITE_ORDER, SITES, Dims, fuse_residual_rest, site_of

if TYPE_CHECKING:
    from ..config import TransformSpec

GLOBAL = -1  # the layer index of model-level transforms (the residual site)


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
    """The transforms of a recipe for a model of dimensions ``dims``.

    :ivar learned: (site, layer index or :data:`GLOBAL`) -> fitted/imported transform, fused after
        the recipe's own transforms of the same layer in :data:`SITE_ORDER`.
    """

    def __init__(self, specs: tuple["TransformSpec", ...], dims: Dims, arch: ArchSpec) -> None:
        self.specs = {s.site: s for s in specs}
        self.dims, self.arch = dims, arch
        self.learned: dict[tuple[str, int], Transform] = {}
        for s in specs:  # fail early, naming the size, rather than inside layer 37
            self.transform(s.site, 0)

    def __bool__(self) -> bool:
        return bool(self.specs) or bool(self.learned)

    @lru_cache(maxsize=None)
    def transform(self, site: str, index: int) -> Transform:
        spec = self.specs[site]
        seed = layer_seed(spec.seed, index if SITES.get(site).per_layer else GLOBAL)
        t = build_transform(spec, SITES.get(site).width(self.dims), seed)
        return AcrossBlocks(t, self.dims.head_dim) if site == "o_input" else t

    def set_learned(self, learned: Mapping[tuple[str, int], Transform]) -> None:
        """Add learned transforms; a site may not hold both a recipe transform and a learned one."""
        clash = sorted({site for site, _ in learned} & set(self.specs))
        if clash:
            raise ConfigError(f"sites {clash} hold both a recipe transform and a learned one; drop one")
        self.learned.update(learned)

    def site_transform(self, site: str, index: int, live: Mapping[str, Transform] | None = None):
        """The transform at ``site`` of layer ``index``: ``live`` (fitting) first, then learned, then
        the recipe's; None when the site is empty."""
        if live is not None and site in live:
            return live[site]
        key = (site, index if site_of(site).per_layer else GLOBAL)
        if key in self.learned:
            return self.learned[key]
        return self.transform(site, index) if site in self.specs else None

    def fuse_rest(self, model: nn.Module, folding: Folding = IN_PLACE,
                  live: Mapping[str, Transform] | None = None) -> None:
        t = self.site_transform("residual", GLOBAL, live)
        if t is not None:
            fuse_residual_rest(model, self.arch, t, folding)

    def fuse_layer(self, layer: nn.Module, index: int, folding: Folding = IN_PLACE,
                   live: Mapping[str, Transform] | None = None) -> None:
        """Fold every site's weight side into a freshly loaded layer (norms already folded).

        :param folding: in place in float64 (deployment) or :class:`~.folding.Live` (fitting).
        :param live: site -> transform overriding the plan's (the fitting's current parameters).
        """
        for name in SITE_ORDER:
            site, t = site_of(name), self.site_transform(name, index, live)
            if t is not None and site.fuse is not None:
                site.fuse(layer, self.arch, self.dims, t, folding)

    def attach_layer(self, layer: nn.Module, index: int) -> None:
        """Install the online parts (idempotent: each call replaces what the last installed)."""
        for name in SITE_ORDER:
            if name in self.specs and SITES.get(name).online:
                SITES.get(name).attach(layer, self.arch, self.dims, self.transform(name, index))
