"""The layer-wise quantization runner: for each decoder layer, prepare → calibrate → solve →
fake-quant → checkpoint → propagate, so that layer i+1 is calibrated on the outputs of the already
quantized layer i (as IST's ``llama_sequential``). A rerun resumes after the last finished layer.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .device import collecting_new_objects_only
from .config import QuantSpec, Recipe
from .formats import make_format
from .layerwise import LayerInputs, run_layer
from .models.experts import route_all, sparse_hessian
from .models.generic import discover_input_groups
from .models.loading import WeightSource
from .models.spec import ArchSpec
from .models.surgery import fold_layer_norms, layers_of, linears_of
from .layerfile import SolvedLinear, Transforms, load_module, save_module
from .refine.stage import RefineStage
from .runfolder import RunFolder
from .runtime import Runtime, attach_solved, solved_transforms
from .solvers import SOLVERS, proxy_loss
from .stats import collect_input_stats
from .fakequant.install import calibrate_static_scales
from .errors import UserError
from .finetune.e2e import LayerAccess, finetune_end_to_end, update_stored
from .finetune.layer import LayerFinetune
from .fitting.session import quantizers_off
from .transforms.plan import TransformPlan

log = logging.getLogger(__name__)
Quantized = dict[str, SolvedLinear]


@dataclass
class LayerwiseQuantizer:
    """Quantizes the decoder layers of ``model`` one at a time.

    :param source: where layer weights come from (streamed from shards, or already in memory).
    :param run: the run folder for checkpoints and resume (None: nothing is written).
    :param plan: the recipe's transforms, fused into each fresh layer after its norms are folded.
    """

    model: nn.Module
    arch: ArchSpec
    recipe: Recipe
    source: WeightSource
    device: torch.device
    plan: TransformPlan
    run: RunFolder | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    finetune: LayerFinetune | None = None
    finetune_inputs: LayerInputs | None = None  # layer 0's inputs on finetune.source (None: the calibration's)
    _bar: Any = field(default=None, init=False, repr=False)
    _layer: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.refine = RefineStage(self.recipe, self.arch, self.device)  # carries FP activations across layers
        self.runtime = Runtime(self.arch, self.recipe, self.plan)  # what each finished layer runs

    def _stage(self, stage: str) -> None:
        """Name the stage the current layer is in on the progress bar (calibrate / solve / propagate)."""
        if self._bar is not None:  # not the bar's own count: tqdm updates it at most every 0.1 s
            self._bar.set_postfix_str(f"layer {self._layer + 1}/{self._bar.total}: {stage}", refresh=True)

    def run_layers(self, inputs: LayerInputs) -> LayerInputs:
        """Quantize every layer; returns the inputs of the final norm (the last layer's outputs)."""
        layers = layers_of(self.model, self.arch)
        ft = self.recipe.finetune
        if ft is not None and ft.active:  # the full-precision stream starts where the quantized one does
            if ft.e2e_epochs and self.source.streaming and self.run is None:
                raise UserError("finetune.e2e_epochs > 0 on a streamed model reopens its layers from the run "
                                "folder: give an output folder")
            self.finetune = LayerFinetune(self.recipe, self.arch, self.device, self.finetune_inputs or inputs)
        first, solved_layers = inputs, []
        self._bar = bar = tqdm(range(len(layers)), desc="quantize", unit="layer")
        with collecting_new_objects_only():  # release_memory's collections skip the libraries' objects
            for i in bar:
                self._layer, layer, prefix = i, layers[i], f"{self.arch.layers}.{i}."
                self.source.materialize(layer, prefix, self.device)
                if self._finished_before(i):
                    self._stage("resumed")
                    if self.refine.follows_fp_model:  # the FP activations still pass through the FP layer
                        self._prepare(layer, i)
                        self.refine.advance(layer, inputs)
                    if self.finetune is not None:  # its FP outputs continue the FP stream
                        self._prepare(layer, i)
                        self.finetune.begin(layer)
                    solved = self.runtime.load(layer, i, self._stored(i))
                    self.metrics[str(i)] = self.run.layer_metrics(i)
                else:
                    solved = self._quantize_layer(layer, i, prefix, inputs)
                    self.runtime.install(layer, i, solved)
                solved_layers.append(solved)
                self._stage("propagate")
                clean = quantizers_off(layer) if self.recipe.solver.propagate == "fp" else nullcontext()
                with clean:  # what layer i+1 is calibrated on
                    inputs = inputs.with_hidden(run_layer(layer, inputs, self.device))
                if self.finetune is not None:
                    self.finetune.end()
                self.source.release(layer)
        if ft is not None and ft.e2e_epochs:
            inputs = self._finetune_end_to_end(layers, solved_layers, first)
        return inputs

    def _finetune_end_to_end(self, layers, solved_layers: list[Transforms], first: LayerInputs) -> LayerInputs:
        """QuIP#'s end-to-end stage on the finished layers, streamed; stores their new signs and norms
        and returns the last layer's new outputs."""
        access = LayerAccess(len(layers), lambda i: self._reopen(layers, i, solved_layers[i]),
                             lambda i: self.source.release(layers[i]), solved_layers)
        e2e, self.metrics["finetune_e2e"] = finetune_end_to_end(
            self.model, self.arch, access, self.finetune_inputs or first, self.finetune.fp_inputs,
            self.recipe.finetune, self.device)
        e2e.write_final()
        inputs = first
        for i, layer in enumerate(layers):
            e2e.write_norms(i, self._reopen(layers, i, solved_layers[i]))
            if self.run is not None:
                update_stored(self.run.layer_path(i), layer, solved_layers[i])
                self.run.record_files([self.run.layer_path(i)])  # its new sha256
            inputs = inputs.with_hidden(run_layer(layer, inputs, self.device))
            self.source.release(layer)
        return inputs

    def _reopen(self, layers, index: int, solved: Transforms) -> nn.Module:
        """A finished layer ready to run: from the run folder when the model is streamed."""
        layer = layers[index]
        if not self.source.streaming:
            self.source.materialize(layer, f"{self.arch.layers}.{index}.", self.device)
            return layer
        self.runtime.load(layer, index, self._stored(index, solved))
        return layer

    def _stored(self, index: int, solved: Transforms | None = None):
        """Fills a layer with layer ``index`` as the run folder stores it; its solver transforms are
        ``solved`` when given (the end-to-end stage tunes them in memory), else the stored ones."""
        def fill(layer: nn.Module) -> Transforms:
            stored = load_module(self.run.layer_path(index), layer, self.device)
            return stored if solved is None else solved
        return fill

    def _finished_before(self, index: int) -> bool:
        """Whether an earlier attempt stored this layer whole (a bad file is recomputed, not trusted)."""
        if self.run is None:
            return False
        problem = self.run.layer_problem(index)
        if problem is not None and self.run.layer_path(index).exists():
            log.warning("%s %s: recomputing it", self.run.layer_path(index), problem)
        return problem is None

    def _prepare(self, layer: nn.Module, index: int) -> None:
        """Fold the norms and put the recipe's transforms in: the layer as it is calibrated."""
        fold_layer_norms(layer, self.arch)
        self.plan.fuse_layer(layer, index)
        self.plan.attach_layer(layer, index)  # calibrate on what the layer will see at inference

    def _quantize_layer(self, layer: nn.Module, index: int, prefix: str, inputs: LayerInputs) -> Transforms:
        start = time.perf_counter()
        self._prepare(layer, index)
        if self.finetune is not None:
            self.finetune.begin(layer)
        snapshot = self.refine.begin(layer, prefix, inputs) if self.refine.active else None
        quantized, losses = self.solve_layer(layer, prefix, inputs, index)
        extra = {}
        if snapshot is not None:
            self._stage("refine")
            quantized, extra["refine"] = self.refine.finish(layer, prefix, index, quantized, snapshot, inputs)
        if self.finetune is not None and self.finetune.metrics:
            extra["finetune"] = self.finetune.metrics
        self._stage("calibrate static scales")
        calibrate_static_scales(layer, prefix, self.arch, self.recipe,  # static KV/input scales, saved with it
                            lambda: run_layer(layer, inputs, self.device, keep=False))
        self.metrics[str(index)] = {"seconds": time.perf_counter() - start, "linears": losses, **extra}
        if self.run is not None:
            save_module(self.run.layer_path(index), layer, quantized)
            self.run.record_layer(index, self.metrics[str(index)])
        return solved_transforms(quantized)

    def solve_layer(self, layer: nn.Module, prefix: str, inputs: LayerInputs,
                    index: int = 0) -> tuple[Quantized, dict]:
        """Calibrate and solve the layer's linears, in true-sequential steps if the recipe asks (or
        in-layer fine-tuning, which trains what is left after each step)."""
        linears = linears_of(layer, self.arch)
        one_batch = LayerInputs(inputs.hidden[:1], inputs.kwargs_for(layer)[:1])

        def probe() -> None:  # one batch through every expert, so that each one's linears are grouped
            with route_all(layer, True):
                run_layer(layer, one_batch, self.device, keep=False)
        groups = self.arch.input_groups() or discover_input_groups(linears, probe)  # generic: by hooks
        tuning = self.finetune is not None and self.finetune.layer_active
        grouped = self.recipe.solver.true_sequential or tuning
        steps = groups if grouped else (tuple(r for g in groups for r in g),)
        owner = {role: g[0] for g in groups for role in g}
        quantized: Quantized = {}
        losses: dict[str, dict[str, float]] = {}
        for roles in steps:
            todo = [r for r in roles if self.recipe.weights_for(prefix + self.arch.path(r)) is not None]
            if not todo:
                continue
            watched = {owner[r]: linears[owner[r]] for r in todo}
            self._stage("calibrate")
            with collect_input_stats(watched) as stats, route_all(layer, self.recipe.calibration.moe_all_experts):
                run_layer(layer, inputs, self.device, keep=False)
            self._stage("solve " + ",".join(todo))
            for role in todo:
                path, seen = self.arch.path(role), stats[owner[role]]
                H = sparse_hessian(seen.H, seen.tokens, prefix + path)  # a rarely routed expert: damped, logged
                quantized[path], losses[path] = self._solve(linears[role], H, self.recipe.weights_for(prefix + path))
            # later steps (true-sequential) calibrate on what these linears will compute at inference
            attach_solved(layer, solved_transforms(quantized))
            if tuning and roles is not steps[-1]:  # QuIP#: not after the last group
                self.finetune.tune(layer, quantized, index, "+".join(todo))
        return quantized, losses

    def _solve(self, linear: nn.Linear, H: torch.Tensor, q_spec: QuantSpec) -> tuple[SolvedLinear, dict]:
        """Solve one linear in place; returns what to store and its proxy loss (absolute and relative)."""
        W = linear.weight.detach().float()
        reference = proxy_loss(W, torch.zeros_like(W), H)  # tr(W H Wᵀ): the output's energy
        result = SOLVERS.get(self.recipe.solver.name).solve(W, H, make_format(q_spec), self.recipe.solver)
        linear.weight.data = result.weight.to(linear.weight.dtype)
        solved = SolvedLinear(result.qweight, q_spec, result.input_transform, result.output_transform)
        return solved, {"loss": result.loss, "relative": result.loss / max(reference, 1e-30)}
