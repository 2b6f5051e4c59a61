"""Learnable transforms: which parameters exist (a table), what transform each one defines, and
their initial values.

Rotations are geoopt ``ManifoldParameter``s on the (canonical) Stiefel manifold, so Riemannian
optimisers keep them orthogonal; scales are ``exp(θ)`` with θ a plain float32 parameter, positive by
construction. A parameter becomes a :class:`~orthoquant.transforms.base.Transform` through the same
builder at fitting time (live float32 parameters, differentiable) and at deployment (detached,
float64), and the site table folds both: one path.

| name      | site       | shape                               | transform (x → x M)                      |
|-----------|------------|-------------------------------------|------------------------------------------|
| R_res     | residual   | hidden²  (model-level)              | dense rotation                           |
| R_ov      | attn_value | kv_heads × head_dim²                | one rotation per KV head                 |
| R2        | attn_value | head_dim²                           | one rotation shared by the heads         |
| S_attn    | attn_norm  | hidden                              | diag(exp θ), folded into input norm γ    |
| S_ffn     | mlp_norm   | hidden                              | diag(exp θ), folded into post-attn norm γ|
| S_ov      | attn_value | kv_heads·head_dim                   | diag(exp θ) after the rotation           |
| S_qk      | qk_scale   | kv_heads × head_dim/2 (Qwen3: head_dim/2) | diag(exp θ) tied on each RoPE pair |
| S_up_down | up_down    | intermediate                        | diag(exp θ) before the down Hadamard     |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import geoopt
import torch
from torch import nn

from ..models.spec import ArchSpec
from ..registry import Registry
from .base import BlockDense, Composed, Dense, Diagonal, PerBlock, Transform
from .plan import GLOBAL
from .sites import SITE_ORDER, Dims, site_of


@dataclass(frozen=True)
class ParamKind:
    """One kind of learnable parameter.

    :param shape: the parameter's shape for a model.
    :param build: (parameter, dims) -> the transform it defines at its site.
    """

    name: str
    site: str
    rotation: bool
    shape: Callable[[Dims, ArchSpec], tuple[int, ...]]
    build: Callable[[torch.Tensor, Dims], Transform]

    @property
    def per_layer(self) -> bool:
        return site_of(self.site).per_layer


def _diag(theta: torch.Tensor, dims: Dims) -> Transform:
    return Diagonal(theta.exp())


def _rope_tied(theta: torch.Tensor, dims: Dims) -> Transform:
    """RoPE rotates channel i with i + head_dim/2 (``rotate_half``): one scale serves both."""
    return Diagonal(torch.cat([theta, theta], dim=-1).exp().reshape(-1))


def _qk_shape(dims: Dims, arch: ArchSpec) -> tuple[int, ...]:
    half = dims.head_dim // 2
    return (half,) if arch.qk_norms is not None else (dims.kv_heads, half)  # Qwen3: shared by heads


_KINDS = (  # within a site, the order here is the order of composition (rotation, then scale)
    ParamKind("R_res", "residual", True, lambda d, a: (d.hidden, d.hidden),
              lambda p, d: Dense(p, orthogonal=True)),
    ParamKind("R_ov", "attn_value", True, lambda d, a: (d.kv_heads, d.head_dim, d.head_dim),
              lambda p, d: BlockDense(p, orthogonal=True)),
    ParamKind("R2", "attn_value", True, lambda d, a: (d.head_dim, d.head_dim),
              lambda p, d: PerBlock(Dense(p, orthogonal=True), d.kv_heads)),
    ParamKind("S_attn", "attn_norm", False, lambda d, a: (d.hidden,), _diag),
    ParamKind("S_ffn", "mlp_norm", False, lambda d, a: (d.hidden,), _diag),
    ParamKind("S_ov", "attn_value", False, lambda d, a: (d.kv_heads * d.head_dim,), _diag),
    ParamKind("S_qk", "qk_scale", False, _qk_shape, _rope_tied),
    ParamKind("S_up_down", "up_down", False, lambda d, a: (d.intermediate,), _diag),
)
PARAMS: Registry[ParamKind] = Registry("learnable parameter")
for _kind in _KINDS:
    PARAMS.add(_kind.name, _kind)

RotationInit = Callable[[ParamKind, int], torch.Tensor]  # (kind, layer index or GLOBAL) -> float64


class LearnedTransforms(nn.Module):
    """The learnable parameters of a fit: model-level ones in :attr:`rest`, per-layer ones in
    :attr:`layers` (a ParameterDict per decoder layer).

    :param names: parameter kinds (``PARAMS`` names).
    :param init: initial value of a rotation (float64, orthogonal), by kind and layer index.
    :param device: where the (float32) parameters live.
    """

    def __init__(self, names: tuple[str, ...], dims: Dims, arch: ArchSpec, n_layers: int,
                 init: RotationInit, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.dims = dims
        self.kinds = [kind for kind in _KINDS if kind.name in names]
        self.rest = nn.ParameterDict()
        self.layers = nn.ModuleList(nn.ParameterDict() for _ in range(n_layers))
        for kind in self.kinds:
            for index in (range(n_layers) if kind.per_layer else (GLOBAL,)):
                self._store(index)[kind.name] = self._initial(kind, index, dims, arch, init, device)

    def _store(self, index: int) -> nn.ParameterDict:
        return self.rest if index == GLOBAL else self.layers[index]

    @staticmethod
    def _initial(kind: ParamKind, index: int, dims: Dims, arch: ArchSpec, init: RotationInit,
                 device: torch.device | str) -> nn.Parameter:
        if not kind.rotation:
            return nn.Parameter(torch.zeros(kind.shape(dims, arch), device=device))  # exp(0) = 1: identity
        value = init(kind, index).float().to(device)
        if value.shape != kind.shape(dims, arch):
            raise ValueError(f"{kind.name} init has shape {tuple(value.shape)}, expected {kind.shape(dims, arch)}")
        return geoopt.ManifoldParameter(value, manifold=geoopt.Stiefel(canonical=True))

    def rotations(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if isinstance(p, geoopt.ManifoldParameter)]

    def scales(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if not isinstance(p, geoopt.ManifoldParameter)]

    def _site_transforms(self, index: int, cast: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Transform]:
        parts: dict[str, list[Transform]] = {}
        for kind in self.kinds:
            if index == GLOBAL and kind.per_layer:
                continue
            store = self._store(index if kind.per_layer else GLOBAL)
            parts.setdefault(kind.site, []).append(kind.build(cast(store[kind.name]), self.dims))
        return {site: ts[0] if len(ts) == 1 else Composed(*ts) for site, ts in parts.items()}

    def live(self, index: int) -> dict[str, Transform]:
        """Site -> transform of layer ``index`` (model-level sites included; only those for
        :data:`GLOBAL`) from the current parameters, differentiable (what fitting folds on the fly)."""
        return self._site_transforms(index, lambda p: p)

    def frozen(self) -> dict[tuple[str, int], Transform]:
        """(site, layer index or GLOBAL) -> detached float64 transform (what deployment folds)."""
        out: dict[tuple[str, int], Transform] = {}
        for index in range(len(self.layers)):
            for site, t in self._site_transforms(index, lambda p: p.detach().double()).items():
                out[(site, index if site_of(site).per_layer else GLOBAL)] = t
        return dict(sorted(out.items(), key=lambda kv: (SITE_ORDER.index(kv[0][0]), kv[0][1])))

    def orthogonality_error(self) -> float:
        """max |RᵀR − I| over every rotation (float64)."""
        errs = [0.0]
        for p in self.rotations():
            r = p.detach().double()
            eye = torch.eye(r.shape[-1], dtype=torch.float64)
            errs.append((r.transpose(-1, -2) @ r - eye).abs().max().item())
        return max(errs)
