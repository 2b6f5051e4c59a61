"""The fitting loop: seeded batches of calibration windows, gradient accumulation, all-reduced
gradients across processes, geoopt optimisers, learning-rate decay, checkpoints and resume.

A step sees ``batch_size × grad_accum × world`` windows. Micro-batch m of process r takes slice
``m·world + r`` of the step's global batch and each micro-batch loss is a mean over its own tokens,
so the averaged gradient does not depend on how the global batch is split over processes — the
property the distributed test checks. Only the transforms' gradients are all-reduced (the model is
frozen), which is what DDP would do for them and what OSTQuant's FSDP path forgets.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import geoopt
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..config import FitSpec
from ..errors import ConfigError
from .cayley import CayleySGD
from .checkpoint import read_checkpoint, write_checkpoint
from .losses import LOSSES
from .residency import world
from .session import FitSession
from .step import LayerMajorStep

log = logging.getLogger(__name__)


def batch_indices(n: int, per_step: int, step: int, seed: int) -> torch.Tensor:
    """Window indices of a step's global batch: consecutive positions of a stream of seeded
    permutations of ``range(n)`` (each window once per epoch), a function of ``step`` alone so that
    a resumed fit draws the same batches."""
    start, out = step * per_step, []
    epoch, offset = divmod(start, n)
    while len(out) < per_step:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset:offset + per_step - len(out)].tolist())
        epoch, offset = epoch + 1, 0
    return torch.tensor(out)


def micro_batches(indices: torch.Tensor, batch_size: int, rank: int, size: int) -> list[torch.Tensor]:
    """This process's micro-batches of a global batch (see the module docstring)."""
    slices = indices.split(batch_size)
    return [slices[m] for m in range(rank, len(slices), size)]


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the base learning rates at ``step`` (decay to 0 at ``steps``, no warm-up)."""
    progress = step / max(steps, 1)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_optimizer(fit: FitSpec, rotations: list, scales: list) -> torch.optim.Optimizer:
    """RiemannianAdam (OSTQuant) or SpinQuant's Cayley SGD (:class:`~.cayley.CayleySGD`: geoopt's
    RiemannianSGD on the canonical Stiefel manifold with SpinQuant's step cap α = min(lr, 1/‖W‖₁));
    rotations and scales in their own groups with their own learning rates."""
    groups = [g for g in ({"params": rotations, "lr": fit.lr_rotation}, {"params": scales, "lr": fit.lr_scale})
              if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    stabilize = fit.stabilize or None
    if fit.optimizer == "cayley_sgd":
        return CayleySGD(groups, lr=fit.lr_rotation, momentum=fit.momentum, stabilize=stabilize)
    return geoopt.optim.RiemannianAdam(groups, lr=fit.lr_rotation, stabilize=stabilize)


def accumulate_gradients(session: FitSession, windows: torch.Tensor, step: int) -> float:
    """Gradients of step ``step`` on the learned parameters (all-reduced); returns the mean loss."""
    fit, (rank, size) = session.fit, world()
    per_step = fit.batch_size * fit.grad_accum * size
    batches = micro_batches(batch_indices(len(windows), per_step, step, fit.seed), fit.batch_size, rank, size)
    objective = LOSSES.get(fit.loss)
    session.learned.zero_grad(set_to_none=False)
    step = LayerMajorStep(session, [windows[idx] for idx in batches])
    loss = torch.tensor(step.run(objective, 1 / len(batches)), device=session.device)
    if size > 1:
        for p in session.learned.parameters():
            if p.grad is None:  # every rank must join every all-reduce
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= size
        dist.all_reduce(loss)
        loss /= size
    return loss.item()


def clip_gradients(params, max_norm: float) -> float:
    """Scale the gradients so their global L2 norm is at most ``max_norm`` (0: leave them); returns
    the norm before clipping. Gradients are already all-reduced, so every process clips alike."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm <= 0:
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    return torch.nn.utils.clip_grad_norm_(params, max_norm).item()


def _save(path: Path, session: FitSession, optimizer, step: int, losses: list[float], done: bool) -> None:
    if world()[0] != 0:
        return
    tmp = path.with_name(path.name + ".tmp")
    write_checkpoint(tmp, {"step": step, "params": session.learned.state_dict(), "optimizer": optimizer.state_dict(),
                           "losses": losses, "complete": done})
    tmp.replace(path)


def _resume(path: Path | None, session: FitSession, optimizer) -> tuple[int, list[float], bool]:
    if path is None or not path.is_file():
        return 0, [], False
    state = read_checkpoint(path, session.device)
    session.learned.load_state_dict(state["params"])
    optimizer.load_state_dict(state["optimizer"])
    for param_state in optimizer.state.values():  # torch loads geoopt's int step as a float32 tensor,
        if torch.is_tensor(param_state.get("step")):  # which changes Adam's bias correction by an ulp
            param_state["step"] = int(param_state["step"].item())
    log.info("resuming the fit from %s at step %d", path, state["step"])
    return state["step"], state["losses"], state["complete"]


def held_out(windows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training windows, the last ``n`` windows held out for the per-step loss, or None)."""
    if n == 0:
        return windows, None
    if n >= len(windows):
        raise ConfigError(f"fitting.eval_samples={n} holds out every one of the {len(windows)} fit windows; "
                          "lower it or give the fit more data")
    return windows[:-n], windows[-n:]


def held_out_loss(session: FitSession, windows: torch.Tensor) -> float:
    step = LayerMajorStep(session, list(windows.split(session.fit.batch_size)))
    return step.loss(LOSSES.get(session.fit.loss))


def train(session: FitSession, windows: torch.Tensor, checkpoint: Path | None = None) -> dict:
    """Run (or resume) ``fitting.steps`` optimiser steps; returns losses (training and held-out per
    step) and timing."""
    fit = session.fit
    windows, evaluation = held_out(windows, fit.eval_samples)
    eval_losses: list[float] = []
    eval_seconds = 0.0
    optimizer = make_optimizer(fit, session.learned.rotations(), session.learned.scales())
    start, losses, done = _resume(checkpoint, session, optimizer)
    began = time.perf_counter()
    bar = tqdm(range(start, fit.steps if not done else start), desc="fitting", unit="step",
               disable=world()[0] != 0)
    for step in bar:
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(fit.schedule, step, fit.steps)
        losses.append(accumulate_gradients(session, windows, step))
        clip_gradients(session.learned.parameters(), fit.max_grad_norm)
        optimizer.step()
        if evaluation is not None:
            tick = time.perf_counter()
            eval_losses.append(held_out_loss(session, evaluation))
            eval_seconds += time.perf_counter() - tick
            log.info("fit step %d: loss %.5f, held-out loss %.5f", step + 1, losses[-1], eval_losses[-1])
        bar.set_postfix(loss=f"{losses[-1]:.4f}", **({"held_out": f"{eval_losses[-1]:.4f}"} if eval_losses else {}))
        last = step + 1 == fit.steps
        if checkpoint is not None and (last or (fit.checkpoint_every and (step + 1) % fit.checkpoint_every == 0)):
            _save(checkpoint, session, optimizer, step + 1, losses, last)
    seconds = time.perf_counter() - began - eval_seconds  # optimiser steps only
    ran = len(bar)
    return {"losses": losses, "eval_losses": eval_losses, "eval_seconds": eval_seconds, "seconds": seconds,
            "steps_run": ran, "steps_per_s": ran / seconds if ran and seconds > 0 else None,
            "orthogonality_error": session.learned.orthogonality_error()}
