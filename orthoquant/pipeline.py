"""The quantization pipeline: load → prepare → layer-wise calibrate/solve → lm_head → save.

Two entry points share every step: :func:`quantize_pretrained` streams a hub or local checkpoint one
layer at a time into a run folder, :func:`quantize` works on a model already in memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from .version import __version__
from .autoscale import resolve_auto_scales
from .config import Recipe
from .data import calibration_windows, fitting_windows
from .export.exportable import record_exports
from .fakequant.attention import use_orthoquant_attention
from .fingerprint import calibration_fingerprint, legacy_fingerprint, model_fingerprint, run_fingerprint
from .fitting import fit_transforms
from .fitting.distributed import on_first_process
from .fitting.residency import world
from .formats import make_format
from .layerwise import capture_inputs, final_hidden
from .models.loading import InMemorySource, WeightSource, open_model
from .models.layout import to_layout_
from .models.support import check_support
from .models.spec import ArchSpec
from .models.generic import spec_for
from .models.surgery import fold_final_norm, get_module, untie_embeddings
from .layerfile import SolvedLinear, save_module
from .runfolder import RunFolder
from .runner import LayerwiseQuantizer
from .runtime import (RunSource, Runtime, attach_solved, check_seqlen, open_run,  # noqa: F401  (users' paths)
                      rest_paths, solved_transforms)
from .transforms.plan import TransformPlan
from .validate import check_request
from .solvers import SOLVERS
from .stats import InputStats

log = logging.getLogger(__name__)


def make_plan(model: nn.Module, arch: ArchSpec, recipe: Recipe) -> TransformPlan:
    """The recipe's transforms for ``model`` (a fit adds its learned ones to it)."""
    return Runtime.of(model.config, recipe, arch).plan


def prepare_model(model: nn.Module, arch: ArchSpec, source: WeightSource, device: torch.device,
                  plan: TransformPlan) -> None:
    """Materialise the non-layer modules, untie lm_head, fold the final norm into it and fuse the
    model-level part of the transforms (residual rotation of embeddings and lm_head)."""
    for path in rest_paths(arch):
        source.materialize(get_module(model, path), f"{path}.", device)
    untie_embeddings(model, arch)
    if not arch.generic:  # a generic model takes no transform, so its (maybe biased) norm stays as it is
        fold_final_norm(model, arch)
    plan.fuse_rest(model)
    use_orthoquant_attention(model)


def run_quantization(model: nn.Module, arch: ArchSpec, recipe: Recipe, source: WeightSource,
                     windows: torch.Tensor, device: torch.device, run: RunFolder | None,
                     fit_windows: torch.Tensor | None = None, finetune_windows: torch.Tensor | None = None) -> dict:
    """Prepare the model, quantize it layer by layer, then lm_head if the recipe targets it.

    :param fit_windows: the fit's training sequences (None: the calibration ``windows``).
    :param finetune_windows: QuIP#'s fine-tuning data (None: the calibration ``windows``)."""
    plan = make_plan(model, arch, recipe)
    prepare_model(model, arch, source, device, plan)
    fit_data = windows if fit_windows is None else fit_windows
    fitted = (fit_transforms(model, arch, recipe, plan, source, fit_data, device, run.path if run else None)
              if recipe.fitting is not None else None)  # learned transforms join the plan
    if world()[0] != 0:  # under torchrun the other processes only share the fit
        return {}
    if fitted is not None and run is not None:
        run.record_new_files()  # the finished fit checkpoint: a resume checks it before reading it
    batches = list(windows.split(recipe.calibration.batch_size))
    inputs = capture_inputs(model, arch, batches, device)
    runner = LayerwiseQuantizer(model, arch, recipe, source, device, plan, run)
    if finetune_windows is not None:
        runner.finetune_inputs = capture_inputs(model, arch, list(finetune_windows.split(recipe.calibration.batch_size)),
                                                device)
    if fitted is not None:
        runner.metrics["fitting"] = fitted
    last = runner.run_layers(inputs)
    quantized = _quantize_lm_head(model, arch, recipe, last.hidden, device)
    if run is not None:
        save_module(run.rest_path, model, quantized, exclude=f"{arch.layers}.")
    return runner.metrics


def _quantize_lm_head(model, arch, recipe, hidden, device) -> dict:
    q_spec = recipe.weights_for(arch.lm_head)
    if q_spec is None:
        return {}
    head = get_module(model, arch.lm_head)
    stats = InputStats(head.in_features, device)
    for h in hidden:
        stats.update(final_hidden(model, arch, h.to(device)))
    result = SOLVERS.get(recipe.solver.name).solve(head.weight.detach().float(), stats.H,
                                                    make_format(q_spec), recipe.solver)
    head.weight.data = result.weight.to(head.weight.dtype)
    solved = SolvedLinear(result.qweight, q_spec, result.input_transform, result.output_transform)
    attach_solved(model, solved_transforms({arch.lm_head: solved}))
    return {arch.lm_head: solved}


def quantize(model: nn.Module, recipe: Recipe, windows: torch.Tensor, out: Path | str | None = None,
             device: torch.device | str = "cpu", fit_windows: torch.Tensor | None = None,
             finetune_windows: torch.Tensor | None = None, tokenizer=None) -> nn.Module:
    """Quantize an in-memory model in place on calibration token windows (nsamples, seqlen).

    With ``out`` the run folder is written (and resumed), as the CLI does; ``tokenizer`` is saved into it
    (evaluation and exports need it). ``fit_windows`` / ``finetune_windows``: what a learned-transform
    fit / QuIP#'s fine-tuning trains on (None: the calibration windows; ``fitting.source`` and
    ``finetune.source`` are read only by :func:`quantize_pretrained`, which has the tokenizer).
    """
    device = torch.device(device)
    arch = spec_for(model.config)
    to_layout_(model, arch)
    check_support(arch, model.config, recipe)
    recipe = resolve_auto_scales(recipe, next(model.parameters()).dtype)  # what the run records
    check_seqlen(model, windows.shape[1])
    check_request(model, arch, recipe, out, device)  # before the run folder exists: nothing to clean up
    if out is None:
        run_quantization(model, arch, recipe, InMemorySource(), windows, device, None, fit_windows, finetune_windows)
        return model
    name = f"in-memory:{type(model).__name__}"
    fingerprint = run_fingerprint({"in_memory": name}, calibration_fingerprint(None, windows),
                                  next(model.parameters()).dtype, device, recipe.to_dict())
    run = RunFolder(out)
    with run.locked():
        run.start(fingerprint, recipe.to_yaml(), legacy={"model": name, "recipe": recipe.to_dict()})
        metrics = run_quantization(model, arch, recipe, InMemorySource(), windows, device, run, fit_windows,
                                   finetune_windows)
        if tokenizer is not None:
            tokenizer.save_pretrained(run.path)
        model.config.save_pretrained(run.path)
        run.finish({"metrics": metrics, "orthoquant": __version__})
        record_exports(run.path)
    return model


def quantize_pretrained(model_id: str, recipe: Recipe, out: Path | str, device: torch.device,
                        dtype: str = "auto") -> RunFolder:
    """Quantize a hub id or local folder into the run folder ``out``, streaming one layer at a time."""
    run = RunFolder(out)
    if world()[0] == 0:
        run.refuse_if_busy()  # before loading and tokenizing: a second process fails at once
    model, tokenizer, arch, source, path = open_model(model_id, dtype, device)
    check_support(arch, model.config, recipe)
    recipe = absolute_calibration(resolve_auto_scales(recipe, next(model.parameters()).dtype))  # as recorded
    check_request(model, arch, recipe, out, device)  # before the run folder exists: nothing to clean up
    cal = recipe.calibration
    check_seqlen(model, cal.seqlen)
    windows = calibration_windows(tokenizer, cal.source, cal.nsamples, cal.seqlen, cal.seed)
    fit_windows, finetune_windows = _fit_windows(model, tokenizer, recipe), _finetune_windows(model, tokenizer, recipe)
    fingerprint = run_fingerprint(model_fingerprint(path, model_id), calibration_fingerprint(cal.source, windows),
                                  next(model.parameters()).dtype, device, recipe.to_dict())
    first = world()[0] == 0  # under torchrun process 0 writes the run; the others share the fit
    with run.locked() if first else contextlib.nullcontext():  # a second process on --out fails at once
        legacy = legacy_fingerprint(model_id, recipe.to_dict())
        if on_first_process(lambda: run.start(fingerprint, recipe.to_yaml(), legacy=legacy), device):
            log.info("%s is already complete; nothing to do", run.path)
            return run
        metrics = run_quantization(model, arch, recipe, source, windows, device, run, fit_windows, finetune_windows)
        if not first:
            return run
        tokenizer.save_pretrained(run.path)
        model.config.save_pretrained(run.path)
        run.finish({"metrics": metrics, "orthoquant": __version__, "torch": torch.__version__})
        record_exports(run.path)
    return run


def _finetune_windows(model: nn.Module, tokenizer, recipe: Recipe) -> torch.Tensor | None:
    """QuIP#'s fine-tuning data (``finetune.source``), drawn as calibration windows are; None: fine-tune
    on the calibration windows."""
    ft, cal = recipe.finetune, recipe.calibration
    if ft is None or not ft.active or not ft.source:
        return None
    seqlen = ft.seqlen or cal.seqlen
    check_seqlen(model, seqlen)
    return calibration_windows(tokenizer, ft.source, ft.nsamples or cal.nsamples, seqlen, ft.seed)


def _fit_windows(model: nn.Module, tokenizer, recipe: Recipe) -> torch.Tensor | None:
    """The fit's own training windows (``fitting.source``), before anything is written."""
    fit = recipe.fitting
    if fit is None or fit.released:
        return None
    check_seqlen(model, fit.seqlen)
    return fitting_windows(tokenizer, fit.source, fit.nsamples, fit.seqlen, fit.seed)


def absolute_calibration(recipe: Recipe) -> Recipe:
    """The recipe with a local calibration file or folder named by its absolute path, so that the run's
    recipe (and an export calibrating from it) finds it from any working directory."""
    source = Path(recipe.calibration.source).expanduser()
    if not source.exists():  # a source name (wikitext2, c4, pile)
        return recipe
    return dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration,
                                                                       source=str(source.resolve())))
