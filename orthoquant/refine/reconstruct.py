"""Block reconstruction: learn parameters of one decoder layer so that its output matches the
full-precision layer's output, on that layer's cached inputs (the outputs of the already quantized
layers before it, AutoRound's setting).

The mechanism knows nothing about what is learned. A :class:`Learnable` supplies the tensors that
replace some of the layer's own in its forward pass (``torch.func.functional_call``: hooks such as
online transforms and activation fake-quantizers still run), its optimizer parameter groups, and a
projection back into bounds after each step. Learned rounding (:mod:`.rounding`) is one user; in-layer
fine-tuning of sign vectors and norms (QuIP#) is another.

Lifecycle: targets are computed once, in no-grad passes, before the layer is quantized
(:func:`fp_targets`); :func:`reconstruct` then runs ``iters`` steps on random batches of cached rows
(MSE, linear learning-rate decay to 0), keeps the parameters of the step with the least batch loss,
stops early after ``patience`` steps without a better one, and reports the loss over every cached row
before and after, so the caller keeps the learned state only where it is better. Given held-out rows
(QuIP#'s in-layer fine-tuning), it selects and stops on their loss instead, measured every
``eval_every`` steps.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..device import reusing_freed_blocks
from ..layerwise import LayerInputs, _to, map_tensors, run_layer
from ..registry import Registry


class Learnable(Protocol):
    """What :func:`reconstruct` optimizes (an ``nn.Module`` holding the learnable parameters)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with its ``lr``."""

    def substitutions(self) -> dict[str, torch.Tensor]:
        """Tensors the layer's forward uses instead of its own, by name relative to the layer."""

    def project_(self) -> None:
        """Move the parameters back inside their bounds (called after each step)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Any: ...


@dataclass(frozen=True)
class Settings:
    """:param iters: optimizer steps. :param batch_size: cached rows (sequences) per step.
    :param optimizer: an :data:`OPTIMIZERS` name. :param patience: stop after this many steps without a
    lower batch loss (0: never). :param seed: seed of the batch sampling.
    :param schedule: learning-rate factor over the steps (:data:`SCHEDULES`): ``linear`` decay to 0
    (AutoRound) or ``constant`` (QuIP#). :param eval_every: steps between held-out evaluations when
    :func:`reconstruct` is given held-out rows (QuIP#: one epoch).
    :param dtype: what the layer computes in during the steps (None: its own dtype). AutoRound tunes in
    bfloat16: on CPUs with AMX and on GPUs its matrix products are several times faster than float32's.
    The loss, the targets and the learned parameters stay float32, and the losses that decide what is
    kept (:class:`Outcome`) are measured in the layer's own dtype."""

    iters: int
    batch_size: int
    optimizer: str = "signsgd"
    patience: int = 0
    seed: int = 0
    schedule: str = "linear"
    eval_every: int = 1
    dtype: torch.dtype | None = None


@dataclass
class Outcome:
    """:param start: MSE over every cached row of the layer as it was. :param best: the same for the
    selected parameters. :param best_iter: the step they come from. :param iters: steps run."""

    start: float
    best: float
    best_iter: int
    iters: int

    @property
    def improved(self) -> bool:
        return self.best < self.start


class SignSGD(torch.optim.Optimizer):
    """``p ← p − lr · sign(∂L/∂p)`` (AutoRound's SignSGD without momentum)."""

    def __init__(self, params, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:  # one call over the group's tensors (dozens per layer, each step)
                torch._foreach_add_(params, torch._foreach_sign([p.grad for p in params]), alpha=-group["lr"])


OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry("reconstruction optimizer")
OPTIMIZERS.add("signsgd", SignSGD)
OPTIMIZERS.add("adam", torch.optim.Adam)


def fp_targets(layer: nn.Module, inputs: LayerInputs, device: torch.device) -> list[torch.Tensor]:
    """The layer's outputs on every cached batch (no grad, on the cache device): the target."""
    return run_layer(layer, inputs, device)


class Rows:
    """The cached rows (sequences) of every batch, drawn in random order, epoch by epoch.

    Rows of different batches are joined when the batches' keyword arguments are shared by all rows
    (leading dimension 1, as position embeddings of unpadded windows); otherwise a step takes the
    rows of one batch.
    """

    def __init__(self, inputs: LayerInputs, targets: list[torch.Tensor], batch_size: int, seed: int) -> None:
        self.inputs, self.targets = inputs, targets
        self.joint = all(_broadcast(kw) for kw in inputs.kwargs)
        sizes = [h.shape[0] for h in inputs.hidden]
        self.where = [(b, j) for b, n in enumerate(sizes) for j in range(n)]
        self.batch_size = batch_size if self.joint else 1
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """(hidden, kwargs, target) of the next step."""
        if len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.where), generator=self.gen).tolist()
        picked, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        if not self.joint:
            b = self.where[picked[0]][0]
            return self.inputs.hidden[b], self.inputs.kwargs[b], self.targets[b]
        rows = [self.where[i] for i in picked]
        hidden = torch.stack([self.inputs.hidden[b][j] for b, j in rows])
        target = torch.stack([self.targets[b][j] for b, j in rows])
        return hidden, self.inputs.kwargs[rows[0][0]], target


def _broadcast(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.dim() == 0 or obj.shape[0] == 1
    if isinstance(obj, (tuple, list)):
        return all(_broadcast(o) for o in obj)
    if isinstance(obj, dict):
        return all(_broadcast(o) for o in obj.values())
    return True


def _forward(layer: nn.Module, subs: dict[str, torch.Tensor], hidden: torch.Tensor, kwargs: dict,
             device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    if dtype is not None:
        subs = {name: t.to(dtype) for name, t in subs.items()}
        hidden, kwargs = _cast(hidden, dtype), _cast(kwargs, dtype)
    out = functional_call(layer, subs, (hidden.to(device),), _to(kwargs, device), strict=False)
    return out[0] if isinstance(out, tuple) else out


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``obj`` cast to ``dtype``, clamped to its finite range first (an additive
    attention mask holds float32's lowest value, which would become -inf in bfloat16 or float16)."""
    info = torch.finfo(dtype)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.clamp(info.min, info.max).to(dtype) if t.is_floating_point() and t.dtype != dtype else t

    return map_tensors(obj, cast)


def computed_in(layer: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Copies of the layer's floating parameters and buffers in ``dtype``, by name: substituted for the
    layer's own while learning so that it computes in ``dtype`` (empty when it already does)."""
    if dtype is None:
        return {}
    tensors = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
    return {name: t.detach().to(dtype) for name, t in tensors.items()
            if t.is_floating_point() and t.dtype != dtype}


@torch.no_grad()
def total_loss(layer: nn.Module, subs: dict[str, torch.Tensor], inputs: LayerInputs,
               targets: list[torch.Tensor], device: torch.device) -> float:
    """MSE over every cached row (one value per element, averaged), in float64."""
    err, count = 0.0, 0
    for hidden, kwargs, target in zip(inputs.hidden, inputs.kwargs_for(layer), targets):
        out = _forward(layer, subs, hidden, kwargs, device).float()
        err += float((out - target.to(device).float()).square().sum(dtype=torch.float64))
        count += target.numel()
    return err / max(count, 1)


# Learning-rate factor at step i of n.
SCHEDULES = {"linear": lambda i, n: 1 - i / n, "constant": lambda i, n: 1.0}


@contextmanager
def frozen(layer: nn.Module, learnable: Learnable) -> Iterator[None]:
    """The layer's parameters other than the learned ones without gradients meanwhile: backward then
    computes only what the learned tensors need (not the input gradients of the linears reading the
    normed input, which feed only the norm's weight)."""
    learned = {id(p) for group in learnable.param_groups() for p in group["params"]}
    flags = [(p, p.requires_grad) for p in layer.parameters() if id(p) not in learned]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def reconstruct(layer: nn.Module, inputs: LayerInputs, targets: list[torch.Tensor], learnable: Learnable,
                settings: Settings, device: torch.device,
                valid: tuple[LayerInputs, list[torch.Tensor]] | None = None) -> Outcome:
    """Optimize ``learnable`` so that ``layer`` reproduces ``targets``; leaves it at the selected step.

    :param inputs: the layer's cached inputs (batches of rows). :param targets: per batch, the
        full-precision outputs (:func:`fp_targets`).
    :param valid: held-out (inputs, targets): selection and early stop then use their loss, measured
        every ``settings.eval_every`` steps (the parameters before the first step included), instead
        of each step's batch loss; ``patience`` counts evaluations. Outcome losses are on them too.
    """
    inputs = LayerInputs(inputs.hidden, inputs.kwargs_for(layer))  # this layer's own masks (Gemma's windows)
    judged = (inputs, targets) if valid is None else valid
    start = total_loss(layer, {}, *judged, device)
    with frozen(layer, learnable), reusing_freed_blocks():
        best_iter, steps = _optimize(layer, inputs, targets, learnable, settings, device, valid)
    selected = total_loss(layer, learnable.substitutions(), *judged, device)
    return Outcome(start, selected, best_iter, steps)


def _optimize(layer: nn.Module, inputs: LayerInputs, targets: list[torch.Tensor], learnable: Learnable,
              settings: Settings, device: torch.device, valid) -> tuple[int, int]:
    """The optimization loop of :func:`reconstruct`; returns (selected step, steps run)."""
    optimizer = OPTIMIZERS.get(settings.optimizer)(learnable.param_groups())
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: SCHEDULES[settings.schedule](i, settings.iters))
    rows = Rows(inputs, targets, settings.batch_size, settings.seed)
    step_loss = _StepLoss(layer, learnable, rows, device, settings.dtype)
    every = settings.eval_every if valid is not None else 1
    best, best_iter, best_state, updates = float("inf"), 0, None, 0
    for step in range(settings.iters + 1):
        loss = None
        if valid is None and step < settings.iters:
            loss = step_loss()
            score = loss.item()
        elif valid is not None and (step % every == 0 or step == settings.iters):
            score = total_loss(layer, learnable.substitutions(), *valid, device)
        else:
            score = None
        if score is not None and score < best:  # the parameters that produced this loss, before the step
            best, best_iter = score, step
            best_state = {k: v.detach().clone() for k, v in learnable.state_dict().items()}
        elif score is not None and settings.patience and (step - best_iter) // every >= settings.patience:
            break
        if step == settings.iters:
            break
        loss = loss if loss is not None else step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
        learnable.project_()
        updates += 1
    if best_state is not None:
        learnable.load_state_dict(best_state)
    return best_iter, updates if valid is not None else min(step + 1, settings.iters)


class _StepLoss:
    """The MSE of the next batch of rows under the learnable's current tensors, the layer computing in
    ``dtype`` (its other floating tensors cast once, here)."""

    def __init__(self, layer: nn.Module, learnable: Learnable, rows: Rows, device: torch.device,
                 dtype: torch.dtype | None) -> None:
        self.layer, self.learnable, self.rows, self.device, self.dtype = layer, learnable, rows, device, dtype
        self.cast = computed_in(layer, dtype)

    def __call__(self) -> torch.Tensor:
        hidden, kwargs, target = self.rows.next()
        subs = {**self.cast, **self.learnable.substitutions()}
        out = _forward(self.layer, subs, hidden, kwargs, self.device, self.dtype)
        return F.mse_loss(out.float(), target.to(self.device).float())
