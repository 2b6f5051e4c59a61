"""The refinement stage of the layer-wise runner: what it snapshots before a layer is solved, and how
it learns the rounding of the solved linears afterwards (the recipe's ``refine`` section).

Per layer: :meth:`RefineStage.begin` keeps the full-precision weights of the targeted linears and the
layer's full-precision outputs (one no-grad pass), on the FP model's activations at that depth, which the
stage carries from layer to layer (``target: fp_model``, AutoRound's; the outputs are the next layer's FP
activations, so this costs no memory beyond the targets), or on the quantized model's (``fp_layer``).
A resumed layer only advances the FP activations (:meth:`RefineStage.advance`). The solver then quantizes the
linears; :meth:`RefineStage.finish` learns offsets and scale factors (:mod:`.rounding`) by block
reconstruction (:mod:`.reconstruct`) with the recipe's activation fake-quantizers in place (the KV
cache stays in full precision while learning: static KV scales are calibrated after this stage), and
replaces the layer's codes and scales only when its MSE over all cached rows went down.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Recipe, RefineSpec
from ..device import DTYPES
from ..fakequant.install import install_input_quantizers
from ..formats import make_format
from ..layerwise import LayerInputs
from ..models.spec import ArchSpec
from ..models.surgery import linears_of
from ..layerfile import SolvedLinear
from ..stats import collect_input_stats
from .anchors import ANCHORS, fp_anchor
from .reconstruct import Settings, fp_targets, reconstruct
from .rounding import LinearRounding

Quantized = dict[str, SolvedLinear]


class LayerRounding(nn.Module):
    """Learned rounding of every solved linear of one layer (a :class:`~.reconstruct.Learnable`).

    :param quantized: linear path (relative to the layer) -> the solver's result.
    :param rounded: linear path -> (out, in) the values the solver rounded (:mod:`.anchors`).
    """

    def __init__(self, layer: nn.Module, quantized: Quantized, rounded: dict[str, torch.Tensor],
                 refine: RefineSpec) -> None:
        super().__init__()
        self.paths = list(quantized)
        self.specs = {p: quantized[p].spec for p in self.paths}
        self.dtypes = {p: layer.get_submodule(p).weight.dtype for p in self.paths}
        self.linears = nn.ModuleList(
            LinearRounding(make_format(s.spec), s.qweight, rounded[p]) for p, s in quantized.items())
        self.lr = refine.lr if refine.lr is not None else 1.0 / refine.iters  # AutoRound's 1/iters
        self.scale_lr = refine.scale_lr if refine.scale_lr is not None else self.lr
        self.tune_scales = refine.tune_scales

    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": [r.offset for r in self.linears], "lr": self.lr}]
        if self.tune_scales:
            groups.append({"params": [a for r in self.linears for a in r.alphas], "lr": self.scale_lr})
        return groups

    def substitutions(self) -> dict[str, torch.Tensor]:
        return {f"{p}.weight": r().to(self.dtypes[p]) for p, r in zip(self.paths, self.linears)}

    def project_(self) -> None:
        for r in self.linears:
            r.project_()

    def solved(self) -> Quantized:
        """What the current parameters store: codes and scales per linear."""
        return {p: SolvedLinear(r.quantized(), self.specs[p]) for p, r in zip(self.paths, self.linears)}


@dataclass
class Snapshot:
    """What refinement needs from before the solve: FP weights, the FP layer's outputs and, for solvers
    whose anchors need it, each linear's input second moment (shared by linears reading one input, all of the layer's at once)."""

    fp_weights: dict[str, torch.Tensor]
    targets: list[torch.Tensor]
    hessians: dict[str, torch.Tensor]


@dataclass
class RefineStage:
    """One per run (it carries the FP model's activations from layer to layer).

    :ivar fp_stream: the FP model's inputs of the next layer (``target: fp_model``), None before layer 0.
    """

    recipe: Recipe
    arch: ArchSpec
    device: torch.device
    fp_stream: LayerInputs | None = None

    @property
    def active(self) -> bool:
        return self.recipe.refine is not None and self.recipe.refine.iters > 0

    @property
    def follows_fp_model(self) -> bool:
        """Whether a layer skipped on resume must still be run in full precision (call :meth:`advance`)."""
        return self.active and self.recipe.refine.target == "fp_model"

    def _fp_inputs(self, inputs: LayerInputs) -> LayerInputs:
        return self.fp_stream if self.follows_fp_model and self.fp_stream is not None else inputs

    def advance(self, layer: nn.Module, inputs: LayerInputs) -> None:
        """Run a full-precision layer (prepared as for solving) on the FP activations only."""
        source = self._fp_inputs(inputs)
        self.fp_stream = source.with_hidden(fp_targets(layer, source, self.device))

    def begin(self, layer: nn.Module, prefix: str, inputs: LayerInputs) -> Snapshot:
        """Call after the recipe's transforms are in the layer and before it is solved."""
        linears = linears_of(layer, self.arch)
        roles = [r for r in linears if self.recipe.weights_for(prefix + self.arch.path(r)) is not None]
        owner = {role: g[0] for g in self.arch.input_groups() for role in g}
        anchored = self.recipe.refine.start == "solver" and self.recipe.solver.name in ANCHORS
        watched = {owner[r]: linears[owner[r]] for r in roles} if anchored else {}
        source = self._fp_inputs(inputs)
        with collect_input_stats(watched) as stats:
            targets = fp_targets(layer, source, self.device)
        if self.follows_fp_model:
            self.fp_stream = source.with_hidden(targets)
        weights = {self.arch.path(r): linears[r].weight.detach().float().clone() for r in roles}
        hessians = {self.arch.path(r): stats[owner[r]].H for r in roles if owner[r] in stats}
        return Snapshot(weights, targets, hessians)

    def finish(self, layer: nn.Module, prefix: str, index: int, quantized: Quantized, snapshot: Snapshot,
               inputs: LayerInputs) -> tuple[Quantized, dict[str, Any]]:
        """Learn the rounding of the solved linears; returns what to store and the stage's metrics.

        When the learned codes win, the layer's linears are set to their decoded weights (in place).
        """
        start, refine = time.perf_counter(), self.recipe.refine
        install_input_quantizers(layer, prefix, self.arch, self.recipe)  # train as inference will run
        starts, rounded = self._starts(layer, quantized, snapshot)
        learnable = LayerRounding(layer, starts, rounded, refine).to(self.device)
        dtype = None if refine.compute_dtype == "model" else DTYPES[refine.compute_dtype]
        settings = Settings(refine.iters, refine.batch_size, refine.optimizer, refine.patience,
                            seed=refine.seed * 100_003 + index, dtype=dtype)
        outcome = reconstruct(layer, inputs, snapshot.targets, learnable, settings, self.device)
        if outcome.improved:
            quantized = {**quantized, **learnable.solved()}
            for path in learnable.paths:
                lin = layer.get_submodule(path)
                q = quantized[path]
                lin.weight.data = make_format(q.spec).dequantize(q.qweight).to(lin.weight.dtype)
        metrics = {"start": outcome.start, "best": outcome.best, "best_iter": outcome.best_iter,
                   "iters": outcome.iters, "kept": outcome.improved, "seconds": time.perf_counter() - start}
        return quantized, metrics

    def _starts(self, layer: nn.Module, quantized: Quantized,
                snapshot: Snapshot) -> tuple[Quantized, dict[str, torch.Tensor]]:
        """The codes learning starts from and the values they round (:mod:`.anchors`)."""
        if self.recipe.refine.start == "rtn":
            starts = {p: SolvedLinear(make_format(s.spec).quantize(snapshot.fp_weights[p]), s.spec)
                      for p, s in quantized.items()}
            return starts, {p: snapshot.fp_weights[p] for p in quantized}
        anchor = ANCHORS.get(self.recipe.solver.name, fp_anchor)
        return quantized, {p: anchor(snapshot.fp_weights[p], layer.get_submodule(p).weight.detach(),
                                     snapshot.hessians.get(p), self.recipe.solver) for p in quantized}
