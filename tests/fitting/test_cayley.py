"""SpinQuant's Cayley SGD (orthoquant.fitting.cayley): one step equals the reference SGDG step written
out plainly, the cap is per matrix, the iterate stays orthogonal, and at the paper's lr 1.5 the loss
of a large-gradient problem goes down where the uncapped step stalls."""
import geoopt
import pytest
import torch

from orthoquant.config import FitSpec
from orthoquant.fitting import loop
from orthoquant.fitting.cayley import CayleySGD

N = 16


def stiefel(value: torch.Tensor) -> geoopt.ManifoldParameter:
    return geoopt.ManifoldParameter(value.clone(), manifold=geoopt.Stiefel(canonical=True))


def random_rotation(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def reference_step(p: torch.Tensor, g: torch.Tensor, lr: float, rounds: int | None = None):
    """SpinQuant's ``SGDG.step`` (stiefel=True, momentum 0) for a parameter ``p`` whose rows are
    orthonormal and its gradient ``g``, written out: X = pᵀ, M = −gᵀ, Ŵ = M Xᵀ − ½ X Xᵀ M Xᵀ,
    W = Ŵ − Ŵᵀ, α = min(lr, 1/(‖W‖₁ + 1e-8)); the new X is the Cayley transform of αW applied to X,
    solved exactly (``rounds=None``) or by the fixed-point rounds Y = X + α W (X + Y)/2 from
    Y = X + α M (the reference runs 5). Returns (new p, α)."""
    x, m = p.T, -g.T
    w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
    w = w_hat - w_hat.T
    alpha = min(lr, 1.0 / (w.abs().sum(dim=0).max().item() + 1e-8))
    eye = torch.eye(x.shape[0], dtype=x.dtype)
    if rounds is None:
        y = torch.linalg.solve(eye - alpha / 2 * w, (eye + alpha / 2 * w) @ x)
    else:
        y = x + alpha * m
        for _ in range(rounds):
            y = x + alpha * w @ (0.5 * (x + y))
    return y.T, alpha


@pytest.mark.parametrize("lr, grad_scale, capped", [(1.5, 10.0, True), (0.01, 1.0, False)])
def test_one_step_is_the_reference_sgdg_step(lr, grad_scale, capped):
    p0 = random_rotation(N, 0)
    g = grad_scale * torch.randn(N, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, alpha = reference_step(p0, g, lr)
    assert (alpha < lr) == capped  # the first case exercises the cap, the second the plain lr
    p = stiefel(p0)
    p.grad = g.clone()
    CayleySGD([p], lr=lr).step()
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)
    # the reference's fixed-point rounds converge to that exact Cayley step (a contraction since
    # α‖W‖₁ ≤ 1); its five rounds stop short of it, which it repairs by renormalising rows
    torch.testing.assert_close(reference_step(p0, g, lr, rounds=60)[0], expected, rtol=0, atol=1e-12)
    assert (reference_step(p0, g, lr, rounds=5)[0] - expected).abs().max() < 1e-3


def test_the_cap_is_per_matrix_of_a_batched_rotation():
    """R_ov holds one rotation per KV head: each takes its own α, as if optimised alone."""
    p0 = torch.stack([random_rotation(N, s) for s in range(3)])
    g = torch.randn(3, N, N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g[0] *= 100  # capped hard
    g[2] *= 1e-3  # not capped
    batched = stiefel(p0)
    batched.grad = g.clone()
    CayleySGD([batched], lr=1.5).step()
    for i in range(3):
        torch.testing.assert_close(batched[i].detach(), reference_step(p0[i], g[i], 1.5)[0], rtol=0, atol=1e-12)


def test_iterates_stay_orthogonal_over_100_steps_at_lr_1_5():
    """float32 as in a fit, no ``stabilize`` re-projection: the exact Cayley step alone."""
    p = stiefel(random_rotation(N, 0, torch.float32))
    target = random_rotation(N, 5, torch.float32)
    opt = CayleySGD([p], lr=1.5, stabilize=None)
    for _ in range(100):
        opt.zero_grad()
        (100 * (p - target).square().sum()).backward()
        opt.step()
    eye = torch.eye(N, dtype=torch.float64)
    assert (p.detach().double().T @ p.detach().double() - eye).abs().max() < 1e-5


def procrustes_losses(steps: int = 100, lr: float = 1.5) -> list[float]:
    """Constant lr 1.5 on ‖X R − X Q‖² / rows x 100 from R = I (Q a rotation, det +1): gradients
    large enough that the uncapped step is a near-reflection, as with the fit's cross-entropy."""
    gen = torch.Generator().manual_seed(0)
    q = random_rotation(N, 7)
    x = torch.randn(256, N, generator=gen, dtype=torch.float64)
    r = stiefel(torch.eye(N, dtype=torch.float64))
    opt = CayleySGD([r], lr=lr, stabilize=None)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 100 * (x @ r - x @ q).square().mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return losses


def test_lr_1_5_lowers_a_large_gradient_loss_monotonically_until_near_the_optimum():
    losses = procrustes_losses()
    first_rise = next(k for k, (a, b) in enumerate(zip(losses, losses[1:])) if b > a)
    # capped: steady descent (each step a rotation of 1-norm ≤ 1) until the loss is < 1% of where it
    # started; it then hovers there. Uncapped (α = 1.5 always) it rises at step 1 from ~65% of the
    # start and stalls above 50%.
    assert losses[first_rise] < 0.01 * losses[0], losses[:first_rise + 2]
    assert sum(losses[-10:]) / 10 < 0.02 * losses[0], losses[-10:]


def test_lr_is_in_spinquant_units_and_the_scales_take_plain_sgd():
    """Uncapped (α = lr), the rotation step is geoopt's at lr/4; a Euclidean parameter steps by lr·grad."""
    p0 = random_rotation(N, 0)
    g = 1e-3 * torch.randn(N, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours, theirs = stiefel(p0), stiefel(p0)
    ours.grad, theirs.grad = g.clone(), g.clone()
    scale = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    scale.grad = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    CayleySGD([{"params": [ours], "lr": 0.2}, {"params": [scale], "lr": 0.1}], lr=0.2).step()
    geoopt.optim.RiemannianSGD([theirs], lr=0.05).step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(scale.detach(), torch.tensor([-0.1, 0.2, -0.3], dtype=torch.float64))


def test_momentum_steps_are_capped_and_keep_the_buffer_tangent():
    p = stiefel(random_rotation(N, 0))
    opt = CayleySGD([p], lr=1.5, momentum=0.9, stabilize=None)
    target = random_rotation(N, 5)
    for _ in range(5):
        opt.zero_grad()
        before = p.detach().clone()
        (100 * (p - target).square().sum()).backward()
        opt.step()
        step = before.T @ p.detach()  # the rotation taken, Pᵀ_old P_new = C(−αW)
        eye = torch.eye(N, dtype=torch.float64)
        w = torch.linalg.solve(eye + step, eye - step) * 2  # α W from the Cayley transform's inverse
        assert w.abs().sum(dim=0).max() <= 1 + 1e-9
    pb = p.detach().T @ opt.state[p]["momentum_buffer"]  # tangent at P: Pᵀ B skew-symmetric
    assert (pb + pb.T).abs().max() < 1e-10 < pb.abs().max()


def test_the_spinquant_fit_uses_the_capped_optimizer():
    rot = stiefel(random_rotation(4, 0))
    opt = loop.make_optimizer(FitSpec(params=("R_res", "R2"), optimizer="cayley_sgd", loss="ce",
                                      lr_rotation=1.5), [rot], [])
    assert isinstance(opt, CayleySGD) and opt.param_groups[0]["lr"] == 1.5
    assert type(loop.make_optimizer(FitSpec(), [rot], [])) is geoopt.optim.RiemannianAdam
