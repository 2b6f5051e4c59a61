"""The quantization pipeline: load → prepare → layer-wise calibrate/solve → lm_head → save.

Two entry points share every step: :func:`quantize_pretrained` streams a hub or local checkpoint one
layer at a time into a run folder, :func:`quantize` works on a model already in memory.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from . import __version__
from .config import Recipe
from .data import calibration_windows, fitting_windows
from .errors import UserError
from .fakequant.attention import use_orthoquant_attention
from .fakequant.kvcache import prepare_kv_scales
from .fitting import fit_transforms
from .fitting.distributed import on_first_process
from .fitting.residency import world
from .formats import make_format
from .layerwise import capture_inputs, final_hidden
from .models.loading import InMemorySource, WeightSource, build_skeleton, open_model
from .models.spec import ArchSpec, spec_for
from .models.surgery import fold_final_norm, get_module, layers_of, untie_embeddings
from .runfolder import RunFolder, SolvedLinear, decoded_state, load_module, save_module
from .runner import LayerwiseQuantizer, attach_solved, install_runtime, solved_transforms
from .transforms.plan import TransformPlan
from .transforms.sites import Dims
from .solvers import SOLVERS
from .stats import InputStats

log = logging.getLogger(__name__)


def rest_paths(spec: ArchSpec) -> tuple[str, ...]:
    """The model-level modules outside the decoder layers."""
    return (spec.embed, spec.final_norm, spec.lm_head, spec.rotary)


def make_plan(model: nn.Module, spec: ArchSpec, recipe: Recipe) -> TransformPlan:
    return TransformPlan(recipe.transforms, Dims.of(model.config), spec)


def prepare_model(model: nn.Module, spec: ArchSpec, source: WeightSource, device: torch.device,
                  plan: TransformPlan) -> None:
    """Materialise the non-layer modules, untie lm_head, fold the final norm into it and fuse the
    model-level part of the transforms (residual rotation of embeddings and lm_head)."""
    for path in rest_paths(spec):
        source.materialize(get_module(model, path), f"{path}.", device)
    untie_embeddings(model, spec)
    fold_final_norm(model, spec)
    plan.fuse_rest(model)
    use_orthoquant_attention(model)


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise UserError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}")


def run_quantization(model: nn.Module, spec: ArchSpec, recipe: Recipe, source: WeightSource,
                     windows: torch.Tensor, device: torch.device, run: RunFolder | None,
                     fit_windows: torch.Tensor | None = None) -> dict:
    """Prepare the model, quantize it layer by layer, then lm_head if the recipe targets it.

    :param fit_windows: the fit's training sequences (None: the calibration ``windows``)."""
    plan = make_plan(model, spec, recipe)
    prepare_model(model, spec, source, device, plan)
    fit_data = windows if fit_windows is None else fit_windows
    fitted = (fit_transforms(model, spec, recipe, plan, source, fit_data, device, run.path if run else None)
              if recipe.fitting is not None else None)  # learned transforms join the plan
    if world()[0] != 0:  # under torchrun the other processes only share the fit
        return {}
    batches = list(windows.split(recipe.calibration.batch_size))
    inputs = capture_inputs(model, spec, batches, device)
    runner = LayerwiseQuantizer(model, spec, recipe, source, device, plan, run)
    if fitted is not None:
        runner.metrics["fitting"] = fitted
    last = runner.run_layers(inputs)
    quantized = _quantize_lm_head(model, spec, recipe, last.hidden, device)
    if run is not None:
        save_module(run.rest_path, model, quantized, exclude=f"{spec.layers}.")
    return runner.metrics


def _quantize_lm_head(model, spec, recipe, hidden, device) -> dict:
    q_spec = recipe.weights_for(spec.lm_head)
    if q_spec is None:
        return {}
    head = get_module(model, spec.lm_head)
    stats = InputStats(head.in_features, device)
    for h in hidden:
        stats.update(final_hidden(model, spec, h.to(device)))
    result = SOLVERS.get(recipe.solver.name).solve(head.weight.detach().float(), stats.H,
                                                    make_format(q_spec), recipe.solver)
    head.weight.data = result.weight.to(head.weight.dtype)
    solved = SolvedLinear(result.qweight, q_spec, result.input_transform, result.output_transform)
    attach_solved(model, solved_transforms({spec.lm_head: solved}))
    return {spec.lm_head: solved}


def quantize(model: nn.Module, recipe: Recipe, windows: torch.Tensor, out: Path | str | None = None,
             device: torch.device | str = "cpu", fit_windows: torch.Tensor | None = None) -> nn.Module:
    """Quantize an in-memory model in place on calibration token windows (nsamples, seqlen).

    With ``out`` the run folder is written (and resumed), as the CLI does. ``fit_windows``: what a
    learned-transform fit trains on (None: the calibration windows; ``fitting.source`` is read only
    by :func:`quantize_pretrained`, which has the tokenizer).
    """
    device = torch.device(device)
    spec = spec_for(model.config)
    check_seqlen(model, windows.shape[1])
    run = RunFolder(out) if out is not None else None
    if run is not None:
        run.start({"model": f"in-memory:{type(model).__name__}", "recipe": recipe.to_dict()}, recipe.to_yaml())
    source = InMemorySource()
    metrics = run_quantization(model, spec, recipe, source, windows, device, run, fit_windows)
    if run is not None:
        model.config.save_pretrained(run.path)
        run.finish({"metrics": metrics, "orthoquant": __version__})
    return model


def quantize_pretrained(model_id: str, recipe: Recipe, out: Path | str, device: torch.device,
                        dtype: str = "auto") -> RunFolder:
    """Quantize a hub id or local folder into the run folder ``out``, streaming one layer at a time."""
    model, tokenizer, spec, source, path = open_model(model_id, dtype, device)
    cal = recipe.calibration
    check_seqlen(model, cal.seqlen)
    run = RunFolder(out)
    fingerprint = {"model": model_id if not Path(model_id).exists() else str(Path(model_id).resolve()),
                   "recipe": recipe.to_dict()}
    windows = calibration_windows(tokenizer, cal.source, cal.nsamples, cal.seqlen, cal.seed)
    fit_windows = _fit_windows(model, tokenizer, recipe)
    if on_first_process(lambda: run.start(fingerprint, recipe.to_yaml()), device):
        log.info("%s is already complete; nothing to do", run.path)
        return run
    start = time.perf_counter()
    metrics = run_quantization(model, spec, recipe, source, windows, device, run, fit_windows)
    if world()[0] != 0:
        return run
    tokenizer.save_pretrained(run.path)
    model.config.save_pretrained(run.path)
    run.finish({"metrics": metrics, "seconds": time.perf_counter() - start, "orthoquant": __version__,
                "torch": torch.__version__})
    return run


def _fit_windows(model: nn.Module, tokenizer, recipe: Recipe) -> torch.Tensor | None:
    """The fit's own training windows (``fitting.source``), before anything is written."""
    fit = recipe.fitting
    if fit is None or fit.released:
        return None
    check_seqlen(model, fit.seqlen)
    return fitting_windows(tokenizer, fit.source, fit.nsamples, fit.seqlen, fit.seed)


class RunSource(WeightSource):
    """Weights of a finished run: decoder layers decoded from their codes, fake-quant re-attached."""

    streaming = True

    def __init__(self, run: RunFolder, spec: ArchSpec, recipe: Recipe, dtype: torch.dtype,
                 plan: TransformPlan) -> None:
        self.run, self.spec, self.recipe, self.dtype, self.plan = run, spec, recipe, dtype, plan

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        index = int(prefix[len(self.spec.layers) + 1:].rstrip("."))
        prepare_kv_scales(module, self.spec, self.recipe)  # static KV scales are stored with the layer
        solved = load_module(self.run.layer_path(index), module, device)
        install_runtime(module, index, self.spec, self.recipe, self.plan, solved)

    def load_rest(self, model: nn.Module, device: torch.device) -> None:
        state, solved = decoded_state(self.run.rest_path)
        for name, value in state.items():
            set_module_tensor_to_device(model, name, device, value=value.to(self.dtype))
        attach_solved(model, solved)


def open_run(run_dir: Path | str, device: torch.device, dtype: torch.dtype = torch.float32, stream: bool = False):
    """A finished run as (model, tokenizer, spec, source). Without ``stream`` every layer is loaded."""
    from transformers import AutoConfig, AutoTokenizer

    run = RunFolder(run_dir)
    if run.info()["status"] != "complete":
        raise UserError(f"run {run.path} is not complete; rerun `orthoquant quantize` with the same --out to resume")
    recipe = Recipe.from_yaml((run.path / "recipe.yaml").read_text())
    config = AutoConfig.from_pretrained(run.path)
    model = build_skeleton(config, dtype)
    spec = spec_for(config)
    source = RunSource(run, spec, recipe, dtype, make_plan(model, spec, recipe))
    source.load_rest(model, device)
    use_orthoquant_attention(model)
    if not stream:
        for i, layer in enumerate(layers_of(model, spec)):
            source.materialize(layer, f"{spec.layers}.{i}.", device)
    tokenizer = AutoTokenizer.from_pretrained(run.path) if (run.path / "tokenizer_config.json").is_file() else None
    return model, tokenizer, spec, source
