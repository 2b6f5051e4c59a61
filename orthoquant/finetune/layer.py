"""QuIP#'s in-layer fine-tuning (``lib/algo/finetune.py``), on the block-reconstruction mechanism.

The runner quantizes a decoder layer's linears group by group (q/k/v → o → gate/up → down). After
each group but the last, :meth:`LayerFinetune.tune` trains what is still continuous in the layer —
the remaining full-precision linears (weights and biases), the norm weights, and the sign vectors
SU/SV of every quantized linear, now real-valued (they scale the RHT's input and output: a diagonal
on each side, which codes cannot absorb) — to reproduce the full-precision layer's outputs on
full-precision inputs (MSE, QuIP#'s targets), with Adam at QuIP#'s learning rates, epoch by epoch,
keeping the epoch of least loss on held-out rows (:mod:`orthoquant.refine.reconstruct` does the
optimisation, selection and early stop). Codes never change.

The full-precision inputs are a second activation stream: layer i's targets (its FP outputs on its FP
inputs, computed once before it is quantized) are layer i+1's FP inputs, so it costs one more
activation cache and no extra pass. Memory stays one decoder layer plus its activations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import Recipe
from ..layerwise import LayerInputs, run_layer
from ..models.spec import ArchSpec
from ..refine.reconstruct import Settings, reconstruct
from ..layerfile import SolvedLinear
from ..transforms.base import Hadamard

Quantized = dict[str, SolvedLinear]


def sign_transforms(quantized: Quantized) -> list[Hadamard]:
    """The RHTs (input and output side) of the quantized linears, in a fixed order."""
    return [t for s in quantized.values() for t in (s.input_transform, s.output_transform)
            if isinstance(t, Hadamard) and t.signs is not None]


class LayerTuning(nn.Module):
    """What in-layer fine-tuning trains (a :class:`~orthoquant.refine.reconstruct.Learnable`).

    Float32 masters of the layer's parameters other than the quantized linears' weights, substituted
    into its forward in the layer's dtype (a bfloat16 weight cannot take Adam's 5e-5 steps; QuIP#
    tunes a float32 copy too), and the RHT sign vectors, made float32 parameters that the attached
    transforms read at every call. :meth:`write_back` puts the masters into the layer.
    """

    def __init__(self, layer: nn.Module, quantized: Quantized, lr: float, susv_lr: float) -> None:
        super().__init__()
        frozen = {f"{path}.weight" for path in quantized}
        self.lr, self.susv_lr = lr, susv_lr
        self.transforms = sign_transforms(quantized)
        for t in self.transforms:
            t.signs = nn.Parameter(t.signs.detach().float().clone())
        self.susv = nn.ParameterList([t.signs for t in self.transforms])
        own = {n: p for n, p in layer.named_parameters() if n not in frozen}
        self.names, self.dtypes = list(own), [p.dtype for p in own.values()]
        self.weights = nn.ParameterList([nn.Parameter(p.detach().float().clone()) for p in own.values()])
        self.flags = {id(p): p.requires_grad for p in layer.parameters()}
        for q in layer.parameters():  # gradients flow to the masters and signs only
            q.requires_grad_(False)

    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": list(self.susv), "lr": self.susv_lr}, {"params": list(self.weights), "lr": self.lr}]
        return [g for g in groups if g["params"]]

    def substitutions(self) -> dict[str, torch.Tensor]:
        return {n: w.to(d) for n, w, d in zip(self.names, self.weights, self.dtypes)}

    def project_(self) -> None:
        """Nothing is bounded: SU/SV are real-valued."""

    @torch.no_grad()
    def write_back(self, layer: nn.Module) -> None:
        for name, w in zip(self.names, self.weights):
            layer.get_parameter(name).copy_(w)

    def release(self, layer: nn.Module) -> None:
        """Back to plain tensors: signs detached, the layer's gradient flags as they were."""
        for t in self.transforms:
            t.signs = t.signs.detach().clone()
        for p in layer.parameters():
            p.requires_grad_(self.flags.get(id(p), False))


def holdout(inputs: LayerInputs, targets: list[torch.Tensor], share: float, layer: nn.Module | None = None):
    """Split the cached batches into (train inputs, train targets) and (held-out inputs, targets).

    The last ``share`` of the batches is held out; a single batch is split by rows (its keyword
    arguments are sliced where they have one entry per row). With ``layer``, the keyword arguments
    are that layer's (Gemma's sliding-window layers get their own masks).
    """
    if layer is not None:
        inputs = LayerInputs(inputs.hidden, inputs.kwargs_for(layer))
    n = len(inputs.hidden)
    if n > 1:
        k = min(n - 1, max(1, round(n * share)))
        return ((LayerInputs(inputs.hidden[:-k], inputs.kwargs[:-k]), targets[:-k]),
                (LayerInputs(inputs.hidden[-k:], inputs.kwargs[-k:]), targets[-k:]))
    rows = inputs.hidden[0].shape[0]
    if rows < 2:
        raise ValueError("in-layer fine-tuning needs at least two calibration sequences (one is held out)")
    k = min(rows - 1, max(1, round(rows * share)))
    parts = (slice(0, rows - k), slice(rows - k, rows))
    return tuple((LayerInputs([inputs.hidden[0][s]], [_rows(inputs.kwargs[0], s, rows)]), [targets[0][s]])
                 for s in parts)


def _rows(obj: Any, s: slice, rows: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[s] if obj.dim() and obj.shape[0] == rows else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rows(o, s, rows) for o in obj)
    if isinstance(obj, dict):
        return {k: _rows(v, s, rows) for k, v in obj.items()}
    return obj


@dataclass
class LayerFinetune:
    """The runner's in-layer fine-tuning stage and the full-precision activation stream it needs.

    Per layer: :meth:`begin` (after the layer's transforms are in, before any solve) computes the FP
    outputs on the FP inputs; :meth:`tune` runs after each solved group; :meth:`end` moves the FP
    stream on to the next layer.
    """

    recipe: Recipe
    arch: ArchSpec
    device: torch.device
    fp_inputs: LayerInputs
    targets: list[torch.Tensor] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # of the current layer, by group

    @property
    def layer_active(self) -> bool:
        return self.recipe.finetune is not None and self.recipe.finetune.layer_epochs > 0

    def begin(self, layer: nn.Module) -> None:
        self.targets, self.metrics = run_layer(layer, self.fp_inputs, self.device), {}

    def end(self) -> None:
        self.fp_inputs = self.fp_inputs.with_hidden(self.targets)
        self.targets = []

    def tune(self, layer: nn.Module, quantized: Quantized, index: int, group: str) -> None:
        """Train the layer's continuous part after the linears ``group`` (e.g. ``q+k+v``) are solved."""
        start, ft = time.perf_counter(), self.recipe.finetune
        (train, train_t), (valid, valid_t) = holdout(self.fp_inputs, self.targets, ft.holdout, layer)
        rows = sum(h.shape[0] for h in train.hidden)
        steps = max(1, -(-rows // ft.batch_size))  # an epoch: every training row once
        settings = Settings(ft.layer_epochs * steps, ft.batch_size, "adam", patience=ft.patience,
                            seed=(ft.seed * 1009 + index) * 8 + len(self.metrics), schedule="constant",
                            eval_every=steps)
        tuning = LayerTuning(layer, quantized, ft.lr, ft.susv_lr)
        try:
            with torch.enable_grad():
                outcome = reconstruct(layer, train, train_t, tuning, settings, self.device, valid=(valid, valid_t))
            tuning.write_back(layer)  # the selected epoch's (the start's when none was better)
        finally:
            tuning.release(layer)
        self.metrics[group] = {"start": outcome.start, "best": outcome.best, "best_epoch": outcome.best_iter // steps,
                               "epochs": -(-outcome.iters // steps), "seconds": time.perf_counter() - start}
