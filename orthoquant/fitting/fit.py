"""What the pipeline calls: fit (or import) the recipe's learnable transforms on the whole model, then
hand them to the plan, whose site table fuses them layer by layer in float64 like any transform."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..config import Recipe
from ..device import peak_memory, use_mmap_for_large_blocks
from ..errors import ConfigError
from ..models.loading import InMemorySource, WeightSource
from ..models.spec import ArchSpec
from ..models.surgery import fold_layer_norms, get_module, layers_of
from ..transforms.base import Transform
from ..transforms.learnable import PARAMS, LearnedTransforms
from ..transforms.plan import GLOBAL, TransformPlan
from ..transforms.sites import fuse_residual_rest
from .init import hadamard_init, klt_init
from .loop import train
from .qsur import measure_qsur
from .released import check_released, import_released
from .residency import Resident, residency_for, world
from .session import FitSession
from .step import LayerMajorStep

log = logging.getLogger(__name__)
CHECKPOINT = "fit.safetensors"  # safetensors + JSON, never a pickle (fitting/checkpoint.py)


def check_fitting(recipe: Recipe, plan: TransformPlan) -> None:
    """Fail before any work when a learned parameter would share a site with a recipe transform, or
    the released file to import is not there."""
    clash = sorted({PARAMS.get(n).site for n in recipe.fitting.params} & set(plan.specs))
    if clash and not recipe.fitting.released:
        raise ConfigError(f"fitting.params learn at {clash}, where the recipe already puts a transform; "
                          "drop one of the two")
    if recipe.fitting.released:
        check_released(Path(recipe.fitting.released))


def load_layers(model: nn.Module, arch: ArchSpec, source: WeightSource, residency: Resident,
                device: torch.device) -> None:
    """Read the decoder layers one at a time: each is materialised at the residency's home, its norms
    folded (exact; the layer-wise run's own fold then finds γ = 1), frozen, and handed over before the
    next is read, so a sharded process never holds more than one whole layer besides its shards."""
    for i, layer in enumerate(layers_of(model, arch)):
        source.materialize(layer, f"{arch.layers}.{i}.", residency.home(device))
        fold_layer_norms(layer, arch)
        layer.requires_grad_(False)
        residency.adopt(layer)


def prepare_session(model: nn.Module, arch: ArchSpec, recipe: Recipe, plan: TransformPlan,
                    device: torch.device, source: WeightSource | None = None) -> FitSession:
    """Load the layers (:func:`load_layers`; an in-memory model by default), freeze the model,
    initialise the learnable transforms and install the fitting-time runtime."""
    fit = recipe.fitting
    model.requires_grad_(False)
    residency = residency_for(fit.offload, device)
    residency.adopt_whole_uses([get_module(model, arch.embed), get_module(model, arch.lm_head)])
    load_layers(model, arch, source or InMemorySource(), residency, device)
    n_layers = len(layers_of(model, arch))
    init = (klt_init(model, arch, plan.dims, fit.seed, device, residency.use) if fit.init == "klt"
            else hadamard_init(plan.dims, fit.seed))
    learned = LearnedTransforms(fit.params, plan.dims, arch, n_layers, init, device)
    session = FitSession(model, arch, recipe, plan, learned, device, residency)
    session.install()
    return session


def deploy(model: nn.Module, arch: ArchSpec, plan: TransformPlan, learned: dict[tuple[str, int], Transform]) -> None:
    """Give the plan the learned transforms and fuse the model-level residual into embed/lm_head
    (the layers take theirs when the layer-wise run fuses them)."""
    plan.set_learned(learned)
    residual = learned.get(("residual", GLOBAL))
    if residual is not None:
        fuse_residual_rest(model, arch, residual)


def measure(session: FitSession, windows: torch.Tensor) -> dict[str, list[float]]:
    """QSUR per site and layer of the current transforms, quantizers off."""
    step = LayerMajorStep(session, list(windows[:session.fit.qsur_samples].split(session.fit.batch_size)))
    return measure_qsur(step.observe, session.arch, session.device)


def fit_transforms(model: nn.Module, arch: ArchSpec, recipe: Recipe, plan: TransformPlan, source: WeightSource,
                   windows: torch.Tensor, device: torch.device, run_dir: Path | None = None) -> dict:
    """Fit ``recipe.fitting``'s transforms (or import released ones) and add them to ``plan``.

    The decoder layers are read from ``source`` one at a time into the fit's residency (whole on the
    device, offloaded, or sharded across processes as each is read, the embedding and lm_head sharded
    before them); streamed layers are released afterwards and read again by the layer-wise run. Under
    torchrun only process 0 deploys the result (it alone solves and writes the run, and gets embedding and
    lm_head back whole); the others drop them and return once the fit is done. Returns the fit's metrics.

    :param windows: (n, seqlen) training token windows.
    :param run_dir: where the fit checkpoint lives (None: no checkpoint, no resume).
    """
    fit = recipe.fitting
    check_fitting(recipe, plan)
    if fit.released:
        deploy(model, arch, plan, import_released(Path(fit.released), plan.dims, arch, len(layers_of(model, arch))))
        return {"released": fit.released}
    use_mmap_for_large_blocks()  # freed folds and activations go back to the system, not a growing heap
    layers = layers_of(model, arch)
    try:
        session = prepare_session(model, arch, recipe, plan, device, source)
        report = {"qsur_before": measure(session, windows)} if fit.qsur_samples else {}
        report.update(train(session, windows, run_dir / CHECKPOINT if run_dir is not None else None))
        if fit.qsur_samples:
            report["qsur_after"] = measure(session, windows)
        session.remove_quantizers()
        session.residency.finish(restore=not source.streaming)
    finally:
        if source.streaming:  # before deploy's float64 folds of embedding and lm_head, which need no layer
            for layer in layers:
                source.release(layer)
    if world()[0] == 0:  # under torchrun only process 0 solves and writes; the others stop after the fit
        deploy(model, arch, plan, session.learned.frozen())
    report["peak_memory_bytes"] = peak_memory(device)
    log.info("fitted %s in %d steps: loss %s -> %s", ", ".join(fit.params), len(report["losses"]),
             f"{report['losses'][0]:.4f}" if report["losses"] else "-",
             f"{report['losses'][-1]:.4f}" if report["losses"] else "-")
    return report
