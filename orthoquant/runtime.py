"""The model at inference: what runs in a quantized layer, and a finished run opened to run it.

- :class:`Runtime` installs a layer's runtime in one place: placeholders for its calibrated scales (static
  KV and input scales, filled when the stored layer is loaded), the recipe's online transforms, the
  solver's online transforms, then the activation and KV-cache fake-quantizers. Quantizing, reopening a
  run, reloading an export and verifying one all go through it, so they run the same model.
- :class:`OpenedRun` opens a finished run folder once (status, file hashes, recipe, config, architecture,
  transform plan); it is the one place that says a run is not complete.
- :class:`RunSource` decodes a run's layers from their codes; :func:`open_run` builds the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from .config import Recipe
from .errors import UserError
from .fakequant.attention import use_orthoquant_attention
from .fakequant.inputs import input_pipeline, output_pipeline
from .fakequant.install import install_layer_quantizers, prepare_layer_scales
from .layerfile import SolvedLinear, Transforms, decoded_state, load_module
from .models.loading import WeightSource, build_skeleton
from .models.generic import spec_for
from .models.spec import ArchSpec
from .models.surgery import layers_of
from .runfolder import RunFolder
from .transforms.plan import TransformPlan
from .transforms.sites import Dims

# Fills a layer (or a whole model) with its stored weights; returns the solver's online transforms, if any.
Fill = Callable[[nn.Module], Transforms | None]


def attach_solved(module: nn.Module, transforms: Transforms) -> None:
    """Install the online transforms a solver chose per linear (idempotent)."""
    for path, sides in transforms.items():
        linear = module.get_submodule(path)
        if "input_transform" in sides:
            input_pipeline(linear).set("solver", [sides["input_transform"].forward])
        if "output_transform" in sides:
            output_pipeline(linear).ops = [_output_op(linear, sides["output_transform"])]


def _output_op(linear: nn.Module, t):
    """``y → t(y)`` on the product only: the bias, kept in the original basis, is added after."""
    if getattr(linear, "bias", None) is None:
        return t.forward
    return lambda y: t.forward(y - linear.bias) + linear.bias


def solved_transforms(quantized: dict[str, SolvedLinear]) -> Transforms:
    """The solver's online transforms of solved linears (linear path -> side -> transform)."""
    return {path: {side: t for side in ("input_transform", "output_transform")
                   if (t := getattr(s, side)) is not None}
            for path, s in quantized.items()}


def rest_paths(arch: ArchSpec) -> tuple[str, ...]:
    """The model-level modules outside the decoder layers (a generic spec lists them all)."""
    return arch.rest or (arch.embed, arch.final_norm, arch.lm_head, arch.rotary)


def check_seqlen(model: nn.Module, seqlen: int | None, default: int = 2048) -> int:
    """The window length to run ``model`` on: ``seqlen``, or without one ``default`` capped at the model's
    ``max_position_embeddings``; a longer ``seqlen`` than the model takes is a :class:`UserError`."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if seqlen is None:
        return min(default, limit or default)
    if limit is not None and seqlen > limit:
        raise UserError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}")
    return seqlen


@dataclass(frozen=True)
class Runtime:
    """What runs at inference in the decoder layers of one recipe's quantized model.

    :param plan: the recipe's transforms (with any learned ones a fit added to it).
    """

    arch: ArchSpec
    recipe: Recipe
    plan: TransformPlan

    @classmethod
    def of(cls, config, recipe: Recipe, arch: ArchSpec | None = None) -> "Runtime":
        """The runtime of ``recipe`` on a model of ``config`` (``arch``: its spec, when already known)."""
        arch = arch if arch is not None else spec_for(config)
        return cls(arch, recipe, TransformPlan(recipe.transforms, Dims.of(config), arch))

    def prefix(self, index: int) -> str:
        return f"{self.arch.layers}.{index}."

    def install(self, layer: nn.Module, index: int, solved: Transforms | None = None) -> None:
        """Online transforms (the recipe's, then the solver's), then fake-quantizers, on a finished layer."""
        self.plan.attach_layer(layer, index)
        attach_solved(layer, solved or {})
        install_layer_quantizers(layer, self.prefix(index), self.arch, self.recipe)

    def load(self, layer: nn.Module, index: int, fill: Fill) -> Transforms:
        """A stored layer made ready to run: its calibrated scales' placeholders, filled by ``fill`` with
        its weights, then :meth:`install`. Returns the solver's online transforms."""
        prepare_layer_scales(layer, self.prefix(index), self.arch, self.recipe)
        solved = fill(layer) or {}
        self.install(layer, index, solved)
        return solved

    def load_model(self, model: nn.Module, fill: Fill) -> nn.Module:
        """A whole model filled at once by ``fill`` (decoded run-level weights) and made ready to run."""
        layers = layers_of(model, self.arch)
        for index, layer in enumerate(layers):
            prepare_layer_scales(layer, self.prefix(index), self.arch, self.recipe)
        fill(model)
        for index, layer in enumerate(layers):
            self.install(layer, index)
        use_orthoquant_attention(model)
        return model.eval()


@dataclass(frozen=True)
class OpenedRun:
    """A finished run folder (or a native export of one), its files checked, opened once.

    :param runtime: architecture, recipe and transform plan of the run's model.
    """

    run: RunFolder
    config: Any
    runtime: Runtime

    @classmethod
    def open(cls, run_dir: Path | str, manifest_checked: bool = False) -> "OpenedRun":
        """Check that the run finished and that every file matches its sha256 in run.json, then read it.

        :param manifest_checked: ``run_dir`` is a native export whose manifest the caller has checked
            (its files are trusted through it); an export is refused otherwise.
        """
        from transformers import AutoConfig

        run = RunFolder(run_dir)
        if run.info()["status"] != "complete":
            raise UserError(f"run {run.path} is not complete; rerun `orthoquant quantize` with the same --out "
                            "to resume")
        if run.is_export and not manifest_checked:
            raise UserError(f"{run.path} is an orthoquant export without a verified manifest "
                            "(orthoquant_config.json); load it with orthoquant.load_quantized, or export the run "
                            "again if its export did not finish")
        if not run.is_export:  # an export's files are checked against its manifest instead
            run.verify()
        recipe = Recipe.from_yaml((run.path / "recipe.yaml").read_text())
        config = AutoConfig.from_pretrained(run.path)
        run.require_records(int(config.num_hidden_layers))
        return cls(run, config, Runtime.of(config, recipe))

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def recipe(self) -> Recipe:
        return self.runtime.recipe

    @property
    def arch(self) -> ArchSpec:
        return self.runtime.arch

    @property
    def plan(self) -> TransformPlan:
        return self.runtime.plan

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def load(self, device: torch.device, dtype: torch.dtype = torch.float32, stream: bool = False):
        """The quantized model as (model, tokenizer, arch, source); without ``stream`` every layer is loaded."""
        from transformers import AutoTokenizer

        model = build_skeleton(self.config, dtype)
        source = RunSource(self.run, self.runtime, dtype)
        source.load_rest(model, device)
        use_orthoquant_attention(model)
        if not stream:
            for i, layer in enumerate(layers_of(model, self.arch)):
                source.materialize(layer, self.runtime.prefix(i), device)
        tokenizer = AutoTokenizer.from_pretrained(self.path) if (self.path / "tokenizer_config.json").is_file() \
            else None
        return model, tokenizer, self.arch, source


class RunSource(WeightSource):
    """Weights of a finished run: decoder layers decoded from their codes, their runtime installed."""

    streaming = True

    def __init__(self, run: RunFolder, runtime: Runtime, dtype: torch.dtype) -> None:
        self.run, self.runtime, self.dtype = run, runtime, dtype

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        index = int(prefix[len(self.runtime.arch.layers) + 1:].rstrip("."))
        self.runtime.load(module, index, lambda layer: load_module(self.run.layer_path(index), layer, device))

    def load_rest(self, model: nn.Module, device: torch.device) -> None:
        state, solved = decoded_state(self.run.rest_path)
        for name, value in state.items():
            set_module_tensor_to_device(model, name, device, value=value.to(self.dtype))
        attach_solved(model, solved)


def open_run(run_dir: Path | str, device: torch.device, dtype: torch.dtype = torch.float32, stream: bool = False,
             manifest_checked: bool = False):
    """A finished run as (model, tokenizer, arch, source). Without ``stream`` every layer is loaded.

    Every file is checked against its sha256 in run.json first (:meth:`OpenedRun.open`).

    :param manifest_checked: the folder is a native export whose manifest the caller has checked
        (:func:`orthoquant.load_quantized`); an export is refused otherwise.
    """
    return OpenedRun.open(run_dir, manifest_checked).load(device, dtype, stream)
