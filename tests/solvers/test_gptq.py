"""GPTQ against a plain column-by-column reference, RTN, and its numerical edge cases."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from orthoquant.config import QuantSpec, SolverSpec
from orthoquant.errors import ConfigError
from orthoquant.formats import QParams, make_format
from orthoquant.formats.integer import IntFormat
from orthoquant.solvers import SOLVERS
from orthoquant.solvers.cholesky import cholesky_lower_
from orthoquant.solvers.gptq import solve_gptq

GROUPS = {"channel": (-1, False), "tensor": (0, False), "static": (8, True), "dynamic": (8, False)}


def correlated_hessian(n: int, tokens: int, seed: int, dead=()) -> torch.Tensor:
    """``XᵀX/N`` (n, n) float64 of inputs ``X = Z·A`` mixed by a random ``A``; ``dead`` inputs are 0."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    X[:, list(dead)] = 0
    return X.T @ X / tokens


def weight(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def direct_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` written out in float64."""
    d = W.double() - Wq.double()
    return float(torch.einsum("oi,ij,oj->", d, H.double(), d))


def naive_gptq(W, H, fmt, damp=0.01, act_order=False, static_groups=False) -> torch.Tensor:
    """Textbook GPTQ in float64: one column at a time with the full inverse-Cholesky factor, no blocks."""
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    W0 = W.clone()
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T  # upper, H⁻¹ = UᵀU
    g = fmt.group_size
    whole = fmt.fit(W0.float()) if g <= 0 or static_groups else None
    Q = torch.zeros_like(W)
    for j in range(cols):
        if g <= 0:
            p = whole
        elif static_groups:
            k = int(perm[j]) // g
            p = QParams(whole.scale[:, k:k + 1], None if whole.zero is None else whole.zero[:, k:k + 1])
        elif j % g == 0:
            p = fmt.fit(W[:, j:j + g].float())
        Q[:, j] = fmt.decode(fmt.encode(W[:, j:j + 1].float(), p), p)[:, 0].double()
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j + 1:] -= torch.outer(err, U[j, j + 1:])
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("shape,blocksize", [((7, 24), 5), ((16, 64), 16)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_naive_reference(shape, blocksize, act_order, groups, symmetric):
    m, n = shape
    group_size, static = GROUPS[groups]
    fmt = make_format(QuantSpec(bits=3, symmetric=symmetric, group_size=group_size))
    W, H = weight(m, n, seed=n), correlated_hessian(n, 4 * n, seed=n + 1, dead=[2])
    spec = SolverSpec(name="gptq", blocksize=blocksize, act_order=act_order, static_groups=static)
    res = solve_gptq(W, H, fmt, spec)
    ref = naive_gptq(W, H, fmt, act_order=act_order, static_groups=static)
    torch.testing.assert_close(res.weight.double(), ref, atol=1e-5, rtol=0)
    assert torch.equal(res.weight, fmt.dequantize(res.qweight))
    assert res.loss == pytest.approx(direct_loss(W, res.weight, H), rel=1e-5)


@pytest.mark.parametrize("group_size,static,act_order", [(-1, False, False), (-1, False, True),
                                                          (8, False, False), (8, True, True), (0, False, True)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_diagonal_hessian_equals_rtn(group_size, static, act_order, symmetric):
    fmt = make_format(QuantSpec(bits=4, symmetric=symmetric, group_size=group_size))
    W = weight(12, 40, seed=3)
    H = torch.diag(torch.rand(40, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.1)
    res = solve_gptq(W, H, fmt, SolverSpec(name="gptq", blocksize=16, act_order=act_order, static_groups=static))
    rtn = SOLVERS.get("rtn").solve(W, H, fmt, None)
    assert torch.equal(res.weight, rtn.weight)
    assert torch.equal(res.qweight.codes, rtn.qweight.codes)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_beats_rtn_on_correlated_inputs(bits, group_size):
    fmt = make_format(QuantSpec(bits=bits, group_size=group_size))
    W, H = weight(32, 128, seed=5), correlated_hessian(128, 1024, seed=6)
    gptq = solve_gptq(W, H, fmt, SolverSpec(name="gptq", blocksize=32, act_order=True))
    rtn = SOLVERS.get("rtn").solve(W, H, fmt, None)
    assert gptq.loss < 0.8 * rtn.loss


def test_singular_hessian_dead_columns():
    dead = [3, 10, 47]
    H = correlated_hessian(48, 16, seed=7, dead=dead)  # 16 tokens < 48 inputs: rank 16
    W = weight(8, 48, seed=8)
    for act_order in (False, True):
        res = solve_gptq(W, H, make_format(QuantSpec(bits=4, group_size=16)),
                         SolverSpec(name="gptq", blocksize=8, act_order=act_order))
        assert torch.isfinite(res.weight).all() and math.isfinite(res.loss)
        assert res.loss == pytest.approx(direct_loss(W, res.weight, H), rel=1e-5)
        assert (res.weight[:, dead] == 0).all()
        assert (res.weight[:, [0, 1, 2]] != 0).any()


def _indefinite_hessian(n: int, lam_min: float) -> torch.Tensor:
    """A symmetric (n, n) float64 matrix with eigenvalues in [1, 2] except one equal to ``lam_min``."""
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    lam = torch.linspace(1, 2, n, dtype=torch.float64)
    lam[0] = lam_min
    return Qm @ torch.diag(lam) @ Qm.T


def test_not_positive_definite_retries_with_more_damping(caplog):
    H = _indefinite_hessian(32, -0.05)  # 1% of mean diag does not fix it, 10% does
    fmt = make_format(QuantSpec(bits=4))
    W = weight(6, 32, seed=10)
    with caplog.at_level(logging.WARNING, logger="orthoquant.solvers.gptq"):
        res = solve_gptq(W, H, fmt, SolverSpec(name="gptq", blocksize=8))
    assert torch.isfinite(res.weight).all()
    assert res.loss == pytest.approx(direct_loss(W, res.weight, H), rel=1e-5)  # with the undamped H
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "Cholesky failed in float32" in caplog.text


def test_hopeless_hessian_raises_after_float64(caplog):
    H = _indefinite_hessian(16, -1e3)
    with caplog.at_level(logging.WARNING, logger="orthoquant.solvers.gptq"):
        with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
            solve_gptq(weight(4, 16, seed=11), H, make_format(QuantSpec(bits=4)), SolverSpec(name="gptq"))
    assert "float32" in caplog.text and "float64" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_cholesky_matches_lapack(dtype):
    H = correlated_hessian(600, 2400, seed=18).to(dtype)  # two full blocks and a partial one
    L, info = cholesky_lower_(H.clone())
    assert info == 0 and torch.equal(L, L.tril())
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(L, torch.linalg.cholesky(H), atol=tol * H.diagonal().max().sqrt(), rtol=0)
    assert cholesky_lower_(_indefinite_hessian(600, -0.5).to(dtype))[1] > 0


def test_float64_retry_matches_reference(monkeypatch, caplog):
    real = torch.linalg.cholesky_ex

    def float32_factor_is_nan(A, *args, **kwargs):
        # Reported as a success, so the check of the factor itself must catch it.
        L, info = real(A, *args, **kwargs)
        return (torch.full_like(L, float("nan")) if A.dtype == torch.float32 else L), info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", float32_factor_is_nan)
    fmt = make_format(QuantSpec(bits=3, group_size=8))
    W, H = weight(7, 24, seed=12), correlated_hessian(24, 96, seed=13)
    with caplog.at_level(logging.WARNING, logger="orthoquant.solvers.gptq"):
        res = solve_gptq(W, H, fmt, SolverSpec(name="gptq", blocksize=5, act_order=True))
    assert len(caplog.records) == 3
    torch.testing.assert_close(res.weight.double(), naive_gptq(W, H, fmt, act_order=True), atol=1e-5, rtol=0)
    assert res.loss == pytest.approx(direct_loss(W, res.weight, H), rel=1e-9)  # float64 throughout


def test_act_order_dynamic_groups_g_idx():
    fmt = make_format(QuantSpec(bits=4, group_size=8))
    W, H = weight(5, 32, seed=14), correlated_hessian(32, 128, seed=15)
    res = solve_gptq(W, H, fmt, SolverSpec(name="gptq", blocksize=16, act_order=True))
    g_idx = res.qweight.g_idx
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    assert g_idx.dtype == torch.long and g_idx.shape == (32,)
    assert torch.equal(g_idx[perm], torch.arange(32) // 8)
    assert not torch.equal(g_idx, torch.arange(32) // 8)
    assert res.qweight.params.scale.shape == (5, 4)
    static = solve_gptq(W, H, fmt, SolverSpec(name="gptq", blocksize=16, act_order=True, static_groups=True))
    assert static.qweight.g_idx is None and static.qweight.params.scale.shape == (5, 4)


class RecordingGlobalInt(IntFormat):
    """INT with a per-tensor factor (like NVFP4's), recording the factor every ``fit`` receives."""

    name = "int-global-test"

    def __init__(self, spec):
        super().__init__(spec)
        self.seen = []

    def global_scale(self, x):
        return x.abs().amax()

    def fit(self, x, global_scale=None):
        self.seen.append(global_scale)
        p = super().fit(x)
        p.global_scale = self.global_scale(x) if global_scale is None else global_scale
        return p


@pytest.mark.parametrize("static", [False, True])
def test_global_scale_fitted_once_on_whole_weight(static):
    fmt = RecordingGlobalInt(QuantSpec(bits=4, group_size=8))
    W, H = weight(6, 32, seed=16), correlated_hessian(32, 128, seed=17)
    res = solve_gptq(W, H, fmt, SolverSpec(name="gptq", blocksize=8, static_groups=static))
    assert len(fmt.seen) == (1 if static else 4)
    assert all(gs is not None and gs == W.abs().amax() for gs in fmt.seen)
    assert res.qweight.params.global_scale == W.abs().amax()


def test_interface_errors_and_registration():
    assert SOLVERS.get("gptq").needs_hessian and SolverSpec(name="gptq").name == "gptq"
    fmt = make_format(QuantSpec(bits=4, group_size=16))
    with pytest.raises(ValueError, match="second moment"):
        solve_gptq(weight(4, 32, seed=0), None, fmt, SolverSpec(name="gptq"))
    with pytest.raises(ConfigError, match="divide the 24 input columns"):
        solve_gptq(weight(4, 24, seed=0), torch.eye(24, dtype=torch.float64), fmt, SolverSpec(name="gptq"))
