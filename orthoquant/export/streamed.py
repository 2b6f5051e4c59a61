"""Streamed export verification: the run and its export side by side, one decoder layer of each resident
at a time, so that verifying never holds a whole model (the quantization run's peak plus about one layer).

For each layer, the run's layer is decoded from its codes (:class:`orthoquant.pipeline.RunSource`) and the
export's from the checkpoint (the format's decoder restricted to that layer's tensors, or the native
export's own run source), with online transforms and fake-quantizers attached as each loader attaches them.

- ``weights``: every tensor of each layer (and of the model-level rest) compared, no forward.
- ``full``: also each layer's outputs on the same captured inputs (the run's hidden states), and the
  whole model's logits on a few token windows, each side propagating its own hidden states.
- ``stock`` (:func:`orthoquant.export.api.export_run`): ``full``, then the format's stock runtimes reload the
  whole export (they hold whole models: this one mode is not bounded by one layer).

Exact formats must agree bit for bit; the others within :func:`~.verify.relative_tolerance`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from ..config import Recipe
from ..errors import UserError
from ..fakequant.attention import use_orthoquant_attention
from ..fakequant.install import prepare_layer_scales
from ..layerwise import LayerInputs, capture_inputs, final_hidden, run_layer
from ..models.layout import from_stock
from ..models.loading import WeightSource, build_skeleton, views_of
from ..models.generic import spec_for
from ..models.surgery import get_module, layers_of
from ..runner import install_runtime
from ..transforms.plan import TransformPlan
from ..transforms.sites import Dims
from .base import ExportFormat, export_skeleton
from .contents import RunContents
from .verify import ExportCheckError, check_batches, relative_tolerance

# full: streamed weights, layer outputs and logits (peak: the run's plus about one layer); stock: full, then the
# stock runtimes' own reload (transformers / gptqmodel load whole models); weights; none
VERIFY_MODES = ("full", "stock", "weights", "none")


class DenseExportSource(WeightSource):
    """A stock-format export read one decoder layer at a time through the format's decoder."""

    streaming = True

    def __init__(self, folder: Path, recipe: Recipe, model: nn.Module, fmt: ExportFormat) -> None:
        self.folder, self.recipe, self.decode = folder, recipe, fmt.decode
        self.arch = spec_for(model.config)
        self.plan = TransformPlan(recipe.transforms, Dims.of(model.config), self.arch)
        # the checkpoint's own names and shapes (fused qkv_proj, stacked experts) beside the layout's
        stock = build_skeleton(model.config, next(model.parameters()).dtype, layout=False)
        self.shapes = {n: tuple(m.weight.shape) for root in (stock, model)
                       for n, m in root.named_modules() if isinstance(m, nn.Linear)}
        self.views = views_of(model.config)

    def _state(self, keep) -> dict[str, torch.Tensor]:
        """Decoded tensors under the layout's names (fused parts split, Gemma's norms with their 1)."""
        return from_stock(self.decode(self.folder, self.recipe, self.shapes, keep), self.views)

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        index = int(prefix[len(self.arch.layers) + 1:].rstrip("."))
        state = {k[len(prefix):]: v for k, v in self._state(lambda k: k.startswith(prefix)).items()}
        prepare_layer_scales(module, prefix, self.arch, self.recipe)
        expected = module.state_dict()
        missing = sorted(expected.keys() - state.keys())
        if missing:
            raise UserError(f"{self.folder} lacks {prefix}{missing[0]} of its model class")
        module.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True, assign=True)
        module.to(device)
        install_runtime(module, index, self.arch, self.recipe, self.plan, {})

    def load_rest(self, model: nn.Module, device: torch.device) -> None:
        layers = f"{self.arch.layers}."
        state = self._state(lambda k: not k.startswith(layers))
        for name, value in model.state_dict().items():
            if not name.startswith(layers):
                if name not in state:
                    raise UserError(f"{self.folder} lacks {name} of its model class")
                set_module_tensor_to_device(model, name, device, value=state[name].to(value.dtype))
        use_orthoquant_attention(model)


def open_export_streamed(folder: Path, manifest: dict[str, Any], fmt: ExportFormat, device: torch.device,
                         dtype: torch.dtype) -> tuple[nn.Module, WeightSource]:
    """The export as (model with only its model-level rest loaded, source of its layers)."""
    if fmt.decode is None:  # a native export is a run folder
        from ..pipeline import open_run

        model, _, _, source = open_run(folder, device, dtype, stream=True, manifest_checked=True)
        return model, source
    model = export_skeleton(folder, dtype)
    source = DenseExportSource(folder, Recipe.from_dict(manifest["recipe"]), model, fmt)
    source.load_rest(model, device)
    return model, source


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, bool]:
    a, b = a.float(), b.float().to(a.device)
    return float((a - b).abs().max()) if a.numel() else 0.0, float(a.abs().max()) if a.numel() else 0.0, \
        bool(torch.equal(a, b))


class Worst:
    """The largest relative difference seen, and where."""

    def __init__(self) -> None:
        self.rel, self.where, self.exact, self.count = 0.0, None, True, 0

    def add(self, where: str, a: torch.Tensor, b: torch.Tensor) -> None:
        diff, scale, exact = _diff(a, b)
        rel = diff / max(scale, 1e-30)
        self.exact, self.count = self.exact and exact, self.count + 1
        if rel > self.rel or self.where is None:
            self.rel, self.where = rel, where

    def result(self) -> dict[str, Any]:
        return {"max_rel_diff": self.rel, "bit_exact": self.exact, "worst": self.where, "compared": self.count}


def _states(a: nn.Module, b: nn.Module, prefix: str, worst: Worst, skip: str | None = None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sa.items():
        if skip is not None and key.startswith(skip):
            continue
        if key not in sb:
            raise ExportCheckError(f"the export has no {prefix}{key}")
        worst.add(prefix + key, value, sb[key])


@torch.no_grad()
def verify_streamed(contents: RunContents, folder: Path, manifest: dict[str, Any], fmt: ExportFormat,
                    dtype: torch.dtype, device: torch.device, n_batches: int, mode: str) -> dict[str, Any]:
    """Compare the export in ``folder`` (its manifest already checked) with the run, streamed; returns the
    check results. :raises ExportCheckError: a difference beyond the format's tolerance."""
    run_model, _, arch, run_source = contents.open_model(device, dtype, stream=True)
    exp_model, exp_source = open_export_streamed(folder, manifest, fmt, device, dtype)
    tol = 0.0 if fmt.exact else relative_tolerance(dtype)
    weights, outputs = Worst(), Worst()
    _states(run_model, exp_model, "", weights, skip=f"{arch.layers}.")
    batches = [b.to(device) for b in check_batches(contents.config, n_batches)]
    run_in = capture_inputs(run_model, arch, batches, device) if mode == "full" else None
    exp_in = capture_inputs(exp_model, arch, batches, device) if mode == "full" else None
    for index, (ours, theirs) in enumerate(zip(layers_of(run_model, arch), layers_of(exp_model, arch))):
        prefix = contents.layer_prefix(index)
        run_source.materialize(ours, prefix, device)
        exp_source.materialize(theirs, prefix, device)
        _states(ours, theirs, prefix, weights)
        if mode == "full":
            expected = run_layer(ours, run_in, device)
            for b, (got, want) in enumerate(zip(run_layer(theirs, run_in, device), expected)):  # same inputs
                outputs.add(f"{prefix}output[{b}]", want, got)
            exp_in = LayerInputs(run_layer(theirs, exp_in, device), exp_in.kwargs)
            run_in = LayerInputs(expected, run_in.kwargs)
        ours.to("meta"), theirs.to("meta")  # done with this layer
    checks = {"weights": weights.result()}
    if mode == "full":
        checks["layer_outputs"] = outputs.result()
        checks["logits"] = _logits(run_model, exp_model, arch, run_in, exp_in, batches)
    _require_within(checks, tol, fmt.exact, folder)
    return checks


def _logits(run_model, exp_model, arch, run_in: LayerInputs, exp_in: LayerInputs, batches) -> dict[str, Any]:
    worst = Worst()
    for b, (h_run, h_exp) in enumerate(zip(run_in.hidden, exp_in.hidden)):
        a = get_module(run_model, arch.lm_head)(final_hidden(run_model, arch, h_run))
        c = get_module(exp_model, arch.lm_head)(final_hidden(exp_model, arch, h_exp))
        worst.add(f"batch {b}", a, c)
    return {**worst.result(), "batches": [list(t.shape) for t in batches]}


def _require_within(checks: dict[str, Any], tol: float, exact: bool, folder: Path) -> None:
    for name, result in checks.items():
        if result["max_rel_diff"] > tol or (exact and not result["bit_exact"]):
            raise ExportCheckError(f"the export in {folder} differs from the run: {name} relative difference "
                                   f"{result['max_rel_diff']:.3g} at {result['worst']} (allowed {tol:.3g})")
