"""The layer-wise quantization runner: for each decoder layer, prepare → calibrate → solve →
fake-quant → checkpoint → propagate, so that layer i+1 is calibrated on the outputs of the already
quantized layer i (as IST's ``llama_sequential``). A rerun resumes after the last finished layer.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantSpec, Recipe
from .fakequant.inputs import input_pipeline, output_pipeline
from .formats import make_format
from .layerwise import LayerInputs, run_layer
from .models.loading import WeightSource
from .models.spec import ArchSpec
from .models.surgery import fold_layer_norms, layers_of, linears_of
from .layerfile import SolvedLinear, Transforms, load_module, save_module
from .runfolder import RunFolder
from .solvers import SOLVERS, proxy_loss
from .stats import collect_input_stats
from .fakequant.install import calibrate_kv_scales, install_layer_quantizers
from .fakequant.kvcache import prepare_kv_scales
from .transforms.plan import TransformPlan

log = logging.getLogger(__name__)
Quantized = dict[str, SolvedLinear]


def attach_solved(layer: nn.Module, transforms: Transforms) -> None:
    """Install the online transforms a solver chose per linear (idempotent)."""
    for path, sides in transforms.items():
        linear = layer.get_submodule(path)
        if "input_transform" in sides:
            input_pipeline(linear).set("solver", [sides["input_transform"].forward])
        if "output_transform" in sides:
            output_pipeline(linear).ops = [_output_op(linear, sides["output_transform"])]


def _output_op(linear: nn.Module, t):
    """``y → t(y)`` on the product only: the bias, kept in the original basis, is added after."""
    if getattr(linear, "bias", None) is None:
        return t.forward
    return lambda y: t.forward(y - linear.bias) + linear.bias


def install_runtime(layer: nn.Module, index: int, arch: ArchSpec, recipe: Recipe, plan: TransformPlan,
                    solved: Transforms) -> None:
    """What runs at inference in a finished layer: online transforms, then fake-quantizers."""
    plan.attach_layer(layer, index)
    attach_solved(layer, solved)
    install_layer_quantizers(layer, f"{arch.layers}.{index}.", arch, recipe)


def solved_transforms(quantized: Quantized) -> Transforms:
    return {path: {side: t for side in ("input_transform", "output_transform")
                   if (t := getattr(s, side)) is not None}
            for path, s in quantized.items()}


@dataclass
class LayerwiseQuantizer:
    """Quantizes the decoder layers of ``model`` one at a time.

    :param source: where layer weights come from (streamed from shards, or already in memory).
    :param run: the run folder for checkpoints and resume (None: nothing is written).
    :param plan: the recipe's transforms, fused into each fresh layer after its norms are folded.
    """

    model: nn.Module
    spec: ArchSpec
    recipe: Recipe
    source: WeightSource
    device: torch.device
    plan: TransformPlan
    run: RunFolder | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    _bar: Any = field(default=None, init=False, repr=False)

    def _stage(self, stage: str) -> None:
        """Name the stage the current layer is in on the progress bar (calibrate / solve / propagate)."""
        if self._bar is not None:  # tqdm counts a layer done only when the next one starts
            self._bar.set_postfix_str(f"layer {self._bar.n + 1}/{self._bar.total}: {stage}", refresh=True)

    def run_layers(self, inputs: LayerInputs) -> LayerInputs:
        """Quantize every layer; returns the inputs of the final norm (the last layer's outputs)."""
        layers = layers_of(self.model, self.spec)
        self._bar = bar = tqdm(range(len(layers)), desc="quantize", unit="layer")
        for i in bar:
            layer, prefix = layers[i], f"{self.spec.layers}.{i}."
            self.source.materialize(layer, prefix, self.device)
            if self._finished_before(i):
                self._stage("resumed")
                prepare_kv_scales(layer, self.spec, self.recipe)  # static KV scales are stored with the layer
                solved = load_module(self.run.layer_path(i), layer, self.device)
                self.metrics[str(i)] = self.run.layer_metrics(i)
            else:
                solved = self._quantize_layer(layer, i, prefix, inputs)
            install_runtime(layer, i, self.spec, self.recipe, self.plan, solved)
            self._stage("propagate")
            inputs = LayerInputs(run_layer(layer, inputs, self.device), inputs.kwargs)
            self.source.release(layer)
        return inputs

    def _finished_before(self, index: int) -> bool:
        """Whether an earlier attempt stored this layer whole (a bad file is recomputed, not trusted)."""
        if self.run is None:
            return False
        problem = self.run.layer_problem(index)
        if problem is not None and self.run.layer_path(index).exists():
            log.warning("%s %s: recomputing it", self.run.layer_path(index), problem)
        return problem is None

    def _quantize_layer(self, layer: nn.Module, index: int, prefix: str, inputs: LayerInputs) -> Transforms:
        start = time.perf_counter()
        fold_layer_norms(layer, self.spec)
        self.plan.fuse_layer(layer, index)
        self.plan.attach_layer(layer, index)  # calibrate on what the layer will see at inference
        quantized, losses = self.solve_layer(layer, prefix, inputs)
        self._stage("calibrate KV scales")
        calibrate_kv_scales(layer, prefix, self.spec, self.recipe,  # static KV scales, saved with the layer
                            lambda: run_layer(layer, inputs, self.device, keep=False))
        self.metrics[str(index)] = {"seconds": time.perf_counter() - start, "linears": losses}
        if self.run is not None:
            save_module(self.run.layer_path(index), layer, quantized)
            self.run.record_layer(index, self.metrics[str(index)])
        return solved_transforms(quantized)

    def solve_layer(self, layer: nn.Module, prefix: str, inputs: LayerInputs) -> tuple[Quantized, dict]:
        """Calibrate and solve the layer's linears, in true-sequential steps if the recipe asks."""
        linears = linears_of(layer, self.spec)
        groups = self.spec.input_groups()
        steps = groups if self.recipe.solver.true_sequential else (tuple(r for g in groups for r in g),)
        owner = {role: g[0] for g in groups for role in g}
        quantized: Quantized = {}
        losses: dict[str, dict[str, float]] = {}
        for roles in steps:
            todo = [r for r in roles if self.recipe.weights_for(prefix + self.spec.path(r)) is not None]
            if not todo:
                continue
            watched = {owner[r]: linears[owner[r]] for r in todo}
            self._stage("calibrate")
            with collect_input_stats(watched) as stats:
                run_layer(layer, inputs, self.device, keep=False)
            self._stage("solve " + ",".join(todo))
            for role in todo:
                path = self.spec.path(role)
                q_spec = self.recipe.weights_for(prefix + path)
                quantized[path], losses[path] = self._solve(linears[role], stats[owner[role]].H, q_spec)
            # later steps (true-sequential) calibrate on what these linears will compute at inference
            attach_solved(layer, solved_transforms(quantized))
        return quantized, losses

    def _solve(self, linear: nn.Linear, H: torch.Tensor, q_spec: QuantSpec) -> tuple[SolvedLinear, dict]:
        """Solve one linear in place; returns what to store and its proxy loss (absolute and relative)."""
        W = linear.weight.detach().float()
        reference = proxy_loss(W, torch.zeros_like(W), H)  # tr(W H Wᵀ): the output's energy
        result = SOLVERS.get(self.recipe.solver.name).solve(W, H, make_format(q_spec), self.recipe.solver)
        linear.weight.data = result.weight.to(linear.weight.dtype)
        solved = SolvedLinear(result.qweight, q_spec, result.input_transform, result.output_transform)
        return solved, {"loss": result.loss, "relative": result.loss / max(reference, 1e-30)}
