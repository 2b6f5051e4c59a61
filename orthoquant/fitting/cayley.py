"""SpinQuant's Cayley SGD: Riemannian SGD on the Stiefel manifold with a capped step.

SpinQuant (``train_utils/optimizer.SGDG``, ``stiefel=True``) takes its optimiser from Li et al. 2020,
"Efficient Riemannian Optimization on the Stiefel Manifold via the Cayley Transform" (JunLi-Galios/
Optimization-on-Stiefel-Manifold-via-Cayley-Transform, ``stiefel_optimizer.py``). For a parameter P
whose rows are orthonormal (SpinQuant's R1 / R2 in the row convention ``x → x P``, as ours) it works
on X = Pᵀ (columns orthonormal) with G = ∂L/∂X = (∂L/∂P)ᵀ and, per step:

1. M = β·M − G (the paper's momentum; SpinQuant runs β = 0);
2. Ŵ = M Xᵀ − ½ X (Xᵀ M Xᵀ), W = Ŵ − Ŵᵀ (skew-symmetric; for square X, W = ½(M Xᵀ − X Mᵀ));
3. α = min(lr, 1 / (‖W‖₁ + 1e-8)), ‖W‖₁ the largest absolute column sum (``matrix_norm_one``);
4. X ← Y, the Cayley transform Y = (I − α/2·W)⁻¹ (I + α/2·W) X, which the reference reaches by the
   fixed-point iteration Y ← X + α W (X + Y)/2 (five rounds from Y = X + α M); the cap α‖W‖₁ ≤ 1 makes
   that a contraction (factor ≤ ½), and it bounds the rotation of one step whatever the loss scale.

Step 3 is what makes ``lr = 1.5`` (the paper's) work: the learning rate only bounds α, and with
CE-sized gradients the real step is 1/‖W‖₁. geoopt's RiemannianSGD on the canonical Stiefel
manifold has the same Cayley retraction (solved exactly) but neither the cap nor this scaling of the
learning rate: its step ``retr(P, −η·grad_R)`` with the canonical Riemannian gradient
grad_R = G_P − P G_Pᵀ P is SpinQuant's step with α = 4η (the generator u Pᵀ − P uᵀ of
``CanonicalStiefel`` is −4η·P W Pᵀ, the same rotation). geoopt at lr 1.5, as this preset used to
run, is SpinQuant's step at α = 6 with no cap: once ‖W‖₁ is of order one, a near-reflection per step
(tests/fitting/test_cayley.py shows such a loss stalling where the capped step descends).

Choice: :class:`CayleySGD` subclasses geoopt's RiemannianSGD and keeps everything of it but the
step, which geoopt offers no hook into between the search direction and the retraction: the
gradient projection, the momentum buffer (geoopt's convention: the uncapped direction, moved along
with the point by the Cayley transport), the Cayley retraction itself (``retr`` / ``retr_transp``,
an exact linear solve) and the periodic ``stabilize`` re-projection are geoopt's; the step only
inserts W and the cap of step 3 and converts α to geoopt's step length α/4. Departures from the
reference, none of which SpinQuant's fit exercises or which only repair its numerics:

- the retraction is the exact Cayley transform (the limit of the reference's five fixed-point rounds,
  whose truncation leaves the manifold — the reference then renormalises the rows every step and
  re-orthogonalises by QR with probability 1/101; we rely on the exact solve and geoopt's
  ``stabilize``);
- momentum is geoopt's/PyTorch's heavy ball on the Riemannian gradient (the cap applies to the step,
  the buffer keeps the uncapped direction). In both reference files ``V = momentum * V - g.t()``
  rebinds V, so the stored buffer is never written and momentum has no effect; SpinQuant passes 0;
- rotations must be square (as R1 / R2 / R_ov are). The step is then the same rotation whether W is
  formed for P or for Pᵀ, but ‖W‖₁ is not rotation-invariant: W is taken, as in the reference, for
  X = Pᵀ of our ``x → x P`` parameters (SpinQuant's R1 / R2 convention); batched rotations
  (..., n, n) get one α per matrix.
"""
from __future__ import annotations

import geoopt
import torch

EPS = 1e-8  # the reference's ``episilon`` in α = min(lr, 1 / (‖W‖₁ + eps))


def matrix_norm_one(w: torch.Tensor) -> torch.Tensor:
    """‖W‖₁, the largest absolute column sum, per matrix of a (..., n, n) batch."""
    return w.abs().sum(dim=-2).amax(dim=-1)


def skew_generator(point: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """SpinQuant's W for the (square, row-convention) parameter ``point`` and a Riemannian gradient
    (or momentum) ``direction`` of the canonical Stiefel manifold: W = ¼(Pᵀ D − Dᵀ P).

    With D = G − P Gᵀ P this is ½(Pᵀ G − Gᵀ P), the reference's W = ½(M Xᵀ − X Mᵀ) for X = Pᵀ and
    M = −Gᵀ; Pᵀ_new = (I − α/2·W)⁻¹ (I + α/2·W) Pᵀ is its step.
    """
    pd = point.transpose(-1, -2) @ direction
    return 0.25 * (pd - pd.transpose(-1, -2))


def capped_step(point: torch.Tensor, direction: torch.Tensor, lr: float) -> torch.Tensor:
    """α = min(lr, 1 / (‖W‖₁ + eps)) per matrix, shaped (..., 1, 1) to scale ``direction``."""
    alpha = (1.0 / (matrix_norm_one(skew_generator(point, direction)) + EPS)).clamp(max=lr)
    return alpha[..., None, None]


class CayleySGD(geoopt.optim.RiemannianSGD):
    """geoopt's RiemannianSGD with SpinQuant's step cap on canonical-Stiefel parameters (see the module
    docstring). ``lr`` is in SpinQuant's units (the paper's 1.5); other parameters (scales) take
    plain SGD steps of ``lr`` as in geoopt. Same constructor, state and ``stabilize`` as geoopt's."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
            for point in group["params"]:
                if point.grad is None:
                    continue
                manifold = getattr(point, "manifold", self._default_manifold)
                grad = point.grad.add(point, alpha=group["weight_decay"]) if group["weight_decay"] else point.grad
                rgrad = manifold.egrad2rgrad(point, grad)
                direction, buf = rgrad, None
                if momentum > 0:
                    state = self.state[point]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = rgrad.clone()
                    else:
                        buf.mul_(momentum).add_(rgrad, alpha=1 - dampening)
                    direction = rgrad.add(buf, alpha=momentum) if group["nesterov"] else buf
                if isinstance(manifold, geoopt.manifolds.CanonicalStiefel):
                    if point.shape[-1] != point.shape[-2]:
                        raise ValueError(f"CayleySGD expects square rotations, got shape {tuple(point.shape)}")
                    # SpinQuant's α, as geoopt's move: its Cayley generator for −η·D is 4η·(−P W Pᵀ)
                    move = -0.25 * capped_step(point, direction, lr) * direction
                else:
                    move = -lr * direction
                if buf is not None:
                    new_point, new_buf = manifold.retr_transp(point, move, buf)
                    buf.copy_(new_buf)
                else:
                    new_point = manifold.retr(point, move)
                point.copy_(new_point)
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)
        return loss
