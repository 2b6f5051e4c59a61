"""QSUR, OSTQuant's quantization-space utilisation rate, per activation site.

For activations modelled as a Gaussian N(μ, Σ), take the ellipsoid E = {x : (x−μ)ᵀΣ⁻¹(x−μ) ≤ c}
(c the χ²_d quantile at ``confidence``) and the hypercube [−m, m]^d that a symmetric per-tensor
quantizer spans to cover it, m = max_i (|μ_i| + √(c Σ_ii)). QSUR = vol(E) / vol(cube), computed in
log space (it underflows any float for d in the thousands). We report its d-th root, the geometric
mean utilisation per axis, in (0, 1]: 1 would be a sphere filling a cube, which no ellipsoid does.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from scipy.stats import chi2
from torch import nn

from ..models.spec import ArchSpec
from ..models.surgery import linears_of

# site -> the kind of role whose input is the site's activation (what its quantizer sees; every expert's)
QSUR_SITES = {"qkv": "q", "o": "o", "gate_up": "gate", "down": "down"}
DAMP = 1e-8  # of the mean variance: keeps log det finite for channels that never vary


class Moments:
    """Running first and second moments of rows (float64 accumulators, float32 products)."""

    def __init__(self, d: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.outer = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        """Add rows (..., d)."""
        x = rows.detach().reshape(-1, rows.shape[-1]).to(self.sum.device)
        self.sum += x.double().sum(0)
        self.outer += (x.float().T @ x.float()).double() if x.dtype != torch.float64 else x.T @ x
        self.n += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    def cov(self) -> torch.Tensor:
        mean = self.mean()
        return (self.outer - self.n * torch.outer(mean, mean)) / max(self.n - 1, 1)


def log_qsur(mean: torch.Tensor, cov: torch.Tensor, confidence: float = 0.99) -> float:
    """Natural log of QSUR for N(mean (d,), cov (d, d))."""
    d = mean.numel()
    cov = cov.double()
    c = float(chi2.ppf(confidence, d))
    cov = cov + DAMP * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype, device=cov.device)
    log_ball = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)  # unit d-ball volume
    log_ellipsoid = log_ball + 0.5 * d * math.log(c) + 0.5 * torch.linalg.slogdet(cov).logabsdet.item()
    half_width = (mean.double().abs() + (c * cov.diagonal()).sqrt()).max().item()
    return log_ellipsoid - d * math.log(2 * half_width)


def qsur_per_axis(mean: torch.Tensor, cov: torch.Tensor, confidence: float = 0.99) -> float:
    """QSUR^(1/d): comparable across widths."""
    return math.exp(log_qsur(mean, cov, confidence) / mean.numel())


def measure_qsur(observe, arch: ArchSpec, device: torch.device) -> dict[str, list[float]]:
    """Per site, QSUR^(1/d) of each layer's activation as its quantizer would see it (after online
    transforms). ``observe(visit)`` runs the model layer by layer with ``visit(index, layer)`` around
    each layer, so only one layer's moments are held."""
    result: dict[str, list[float]] = {site: [] for site in QSUR_SITES}

    @contextmanager
    def visit(index: int, layer: nn.Module) -> Iterator[None]:
        linears = linears_of(layer, arch)
        moments = {site: Moments(linears[arch.roles(kind)[0]].in_features, device) for site, kind in QSUR_SITES.items()}
        handles = [linears[role].register_forward_pre_hook(lambda m, args, mo=moments[site]: mo.add(args[0]))
                   for site, kind in QSUR_SITES.items() for role in arch.roles(kind)]  # experts: pooled
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        for site, mo in moments.items():
            result[site].append(qsur_per_axis(mo.mean(), mo.cov()))

    observe(visit)
    return result
