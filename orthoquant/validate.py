"""Whole-request validation: every input a user can get wrong is one :class:`UserError`, raised before
anything is written (a half-made run folder would refuse the corrected rerun as "a different run").

This is the one validate step: the recipe schema (:mod:`orthoquant.config`) checks ranges and its closed
sets of names without importing any implementation; :func:`check_recipe` then checks the recipe
against the implementations (each name resolves in its registry; the combinations the code cannot
run, in :data:`RECIPE_RULES`) and needs no model, so ``load_recipe`` runs it; :func:`check_request`,
which ``quantize`` and ``quantize_pretrained`` run, adds the model's shapes and the output folder.
The request checks are the ones the pipeline makes later, called early on the model's skeleton (no weight is
read): the transform plan builds every recipe Hadamard (sizes, block sizes); each solver's registered
``check`` runs on the shape of every linear it will quantize (group sizes, lattice vectors, QuIP#'s
Hadamards); formats check activation and KV-cache widths; fitting checks its sites and released file.
Paths are probed by creating (and at once deleting) a file, which a permission check cannot replace:
root ignores permission bits but not a read-only filesystem.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .config import QuantSpec, Recipe
from .device import resolve_device
from .errors import ConfigError, UserError
from .finetune import check_recipe as check_finetune
from .fitting.fit import check_fitting
from .fitting.losses import LOSSES
from .formats import FORMATS, make_format
from .models.spec import ArchSpec
from .models.surgery import get_module, layers_of, linears_of
from .refine import OPTIMIZERS, REFINABLE_SOLVERS, refinable_formats
from .solvers import SOLVERS
from .transforms.learnable import PARAMS
from .transforms.plan import TransformPlan
from .transforms.sites import SITES, Dims


def check_request(model: nn.Module, arch: ArchSpec, recipe: Recipe, out: Path | str | None,
                  device: torch.device | str = "cpu") -> None:
    """Raise naming the first problem of quantizing ``model`` (a skeleton will do) with ``recipe``
    on ``device`` into the run folder ``out`` (None: no folder)."""
    check_recipe(recipe)  # a recipe built in Python never went through load_recipe
    resolve_device(str(device))  # library callers pass devices the CLI never checked
    plan = check_transforms(recipe, Dims.of(model.config), arch)
    check_weights(model, arch, recipe)
    check_inputs(model, arch, recipe, plan.dims)
    if recipe.fitting is not None:
        check_fitting(recipe, plan)
    if out is not None:
        check_output_folder(Path(out), "--out")


# --- the recipe alone ---------------------------------------------------------------------------
def _quant_specs(recipe: Recipe) -> list[tuple[str, QuantSpec]]:
    """(section, spec) of every quantization spec the recipe holds, overrides included."""
    sections = [("weights", recipe.weights), ("activations", recipe.activations), ("kv_cache", recipe.kv_cache)]
    sections += [(f"overrides[{i}].{key}", getattr(o, key)) for i, o in enumerate(recipe.overrides)
                 for key in ("weights", "activations")]
    return [(name, spec) for name, spec in sections if spec is not None]


def _registered_names(recipe: Recipe) -> Iterator[tuple[Any, str]]:
    """(registry, name) of every name in ``recipe`` that an implementation is registered under."""
    yield SOLVERS, recipe.solver.name
    yield from ((FORMATS, spec.format) for _, spec in _quant_specs(recipe))
    yield from ((SITES, t.site) for t in recipe.transforms)
    if recipe.fitting is not None:
        yield from ((PARAMS, p) for p in recipe.fitting.params)
        yield LOSSES, recipe.fitting.loss
    if recipe.refine is not None:
        yield OPTIMIZERS, recipe.refine.optimizer


def _per_head_outside_activations(recipe: Recipe) -> str | None:
    section = next((name for name, spec in _quant_specs(recipe) if spec.per_head and "activations" not in name), None)
    return None if section is None else (f"{section}.per_head=true: one group per head is for activations (the "
                                         "o_proj input); set group_size instead")


def _fit_holds_out_all(recipe: Recipe) -> str | None:
    fit = recipe.fitting
    if fit is None or not 0 < fit.nsamples <= fit.eval_samples:
        return None
    return (f"fitting.eval_samples={fit.eval_samples} holds out every one of the fitting.nsamples={fit.nsamples} "
            "fit windows; lower it or give the fit more data")


def _fit_trains_no_weights(recipe: Recipe) -> str | None:
    idle = recipe.fitting is not None and recipe.fitting.train_weights and recipe.weights is None
    return "fitting.train_weights=true without a weights section: no weight format to train with" if idle else None


# Combinations the code would refuse late (after loading the model and data) or run otherwise than
# asked: each returns the one-line message when ``recipe`` has it, else None.
RECIPE_RULES: tuple[Callable[[Recipe], str | None], ...] = (
    _per_head_outside_activations, _fit_holds_out_all, _fit_trains_no_weights,
)


def check_recipe(recipe: Recipe) -> None:
    """Raise :class:`ConfigError` naming the first thing in ``recipe`` (no model needed) that the code
    cannot run: a name with no registered implementation, a combination of :data:`RECIPE_RULES`,
    refinement or fine-tuning of weights they cannot refine."""
    for registry, name in _registered_names(recipe):
        registry.get(name)
    for rule in RECIPE_RULES:
        if message := rule(recipe):
            raise ConfigError(message)
    if recipe.refine is not None and recipe.refine.iters > 0:
        _check_refinable(recipe)
    if recipe.finetune is not None and recipe.finetune.active:
        check_finetune(recipe)


def _check_refinable(recipe: Recipe) -> None:
    _require_one_of("solver.name (with refine)", recipe.solver.name, REFINABLE_SOLVERS)
    if recipe.weights is None:
        raise ConfigError("refine needs quantized weights: set a weights section")
    for section, spec in _quant_specs(recipe):
        if "weights" in section:
            _require_one_of("weights.format (with refine)", spec.format, refinable_formats())


def _require_one_of(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


# --- the recipe on the model ---------------------------------------------------------------------
def check_transforms(recipe: Recipe, dims: Dims, arch: ArchSpec) -> TransformPlan:
    """The recipe's transform plan, whose construction builds every Hadamard; an error names the site."""
    for t in recipe.transforms:
        _check_shape(f"transform at {t.site} (width {SITES.get(t.site).width(dims)})",
                     lambda: TransformPlan((t,), dims, arch))
    return TransformPlan(recipe.transforms, dims, arch)


def _layer_linears(model: nn.Module, arch: ArchSpec) -> Iterator[tuple[str, nn.Linear]]:
    for i, layer in enumerate(layers_of(model, arch)):
        for role, linear in linears_of(layer, arch).items():
            yield f"{arch.layers}.{i}.{arch.path(role)}", linear


def _check_shape(name: str, check: Callable[[], None]) -> None:
    try:
        check()
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def check_weights(model: nn.Module, arch: ArchSpec, recipe: Recipe) -> None:
    """Each quantized weight's shape against its solver and format (lm_head too when targeted)."""
    solver, seen = SOLVERS.get(recipe.solver.name), set()
    head = get_module(model, arch.lm_head)
    for name, linear in [*_layer_linears(model, arch), (arch.lm_head, head)]:
        q_spec = recipe.weights_for(name)
        key = (q_spec, linear.out_features, linear.in_features)
        if q_spec is not None and key not in seen:  # layers repeat shapes: check each once
            seen.add(key)
            _check_shape(f"{name} ({linear.out_features}x{linear.in_features})",
                         lambda: solver.check(make_format(q_spec), recipe.solver, *key[1:]))


def check_inputs(model: nn.Module, arch: ArchSpec, recipe: Recipe, dims: Dims) -> None:
    """Activation formats against each linear's input width, the KV-cache format against head_dim."""
    seen = set()
    for name, linear in _layer_linears(model, arch):
        a_spec, width = recipe.activations_for(name), linear.in_features
        if a_spec is not None and (a_spec, width) not in seen:
            seen.add((a_spec, width))
            _check_shape(f"activations of {name} (width {width})", lambda: make_format(a_spec).check_shape(1, width))
    if recipe.kv_cache is not None:
        _check_shape(f"kv_cache (head_dim {dims.head_dim})",
                     lambda: make_format(recipe.kv_cache).check_shape(1, dims.head_dim))


# --- paths ------------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def check_writable(path: Path, flag: str, folder: Path | None = None) -> None:
    """Files can be created in ``folder`` (default ``path``) or, while it does not exist, in its
    nearest existing parent; an error names ``flag`` and ``path``."""
    folder = _nearest_existing(folder or path)
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({e.strerror})") from None


def check_output_folder(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    check_writable(path, flag)


def check_output_file(path: Path, flag: str) -> None:
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, not a file")
    if not path.exists():
        check_writable(path, flag, path.parent)
        return
    try:
        with open(path, "a"):  # opening to append changes nothing
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write it ({e.strerror})") from None


# --- evaluation options -----------------------------------------------------------------------
def _at_least(n: int, why: str = "") -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= n), f"must be at least {n}" + (f" ({why})" if why else "")


# option -> (its flag, test of a given value, what the test asks); None (not given) always passes
EVAL_OPTIONS: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "seqlen": ("--seqlen", *_at_least(2, "a window needs a token to predict and one before it")),
    "batch_size": ("--batch-size", *_at_least(1)),
    "max_windows": ("--max-windows", *_at_least(1, "leave it out to evaluate every window")),
    "num_fewshot": ("--num-fewshot", *_at_least(0)),
    "max_length": ("--max-length", *_at_least(2)),
    "limit": ("--limit", lambda v: v > 0, "must be positive (a count, or a fraction below 1)"),
}


def check_eval_options(**options: Any) -> None:
    """Raise for the first evaluation option (named as in :data:`EVAL_OPTIONS`) outside its range."""
    for name, value in options.items():
        flag, ok, requirement = EVAL_OPTIONS[name]
        if value is not None and not ok(value):
            raise UserError(f"{flag} {value} {requirement}")
