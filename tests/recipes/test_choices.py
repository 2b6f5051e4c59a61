"""The schema's closed sets against the implementations, and the one validate step (check_recipe)."""
import json

import pytest
import yaml

from orthoquant import choices
from orthoquant.config import FitSpec, QuantSpec, Recipe, SolverSpec
from orthoquant.errors import ConfigError, UnknownNameError
from orthoquant.fitting.losses import LOSSES
from orthoquant.formats import FORMATS
from orthoquant.formats.fp4 import MXFP4Format, NVFP4Format
from orthoquant.formats.integer import SYMMETRIC_SCALES
from orthoquant.formats.lattice import LATTICE_CODEBOOKS
from orthoquant.recipes import load_recipe
from orthoquant.refine.reconstruct import OPTIMIZERS
from orthoquant.solvers import SOLVERS
from orthoquant.transforms.learnable import PARAMS
from orthoquant.transforms.sites import SITES
from orthoquant.validate import RECIPE_RULES, check_recipe

from helpers import token_windows


@pytest.mark.parametrize("choice, registry", [
    (choices.Format, FORMATS), (choices.Site, SITES), (choices.FitParam, PARAMS),
    (choices.FitLoss, LOSSES), (choices.RefineOptimizer, OPTIMIZERS),
])
def test_each_named_set_is_its_registry(choice, registry):
    assert sorted(choice) == registry.names()


def test_solver_names_are_the_registered_ones():
    assert choices.SOLVER_NAMES == set(SOLVERS.names())
    with pytest.raises(ConfigError, match="solver.name='mine' is not allowed"):
        SolverSpec(name="mine")
    SOLVERS.add("mine", SOLVERS.get("rtn"))  # a solver of one's own: the schema takes its name from then on
    try:
        assert SolverSpec(name="mine").name == "mine"
    finally:
        SOLVERS._entries.pop("mine")
        choices.SOLVER_NAMES.discard("mine")


def test_format_rules_match_the_formats():
    assert choices.SCALE_RULES[choices.Format.INT] == tuple(SYMMETRIC_SCALES)
    assert choices.E8P_BITS == tuple(sorted(LATTICE_CODEBOOKS))
    assert (MXFP4Format.group, NVFP4Format.group) == (32, 16)  # the OCP MX and NVFP4 block sizes
    assert set(choices.FORMAT_CHECKS) == set(choices.SCALE_RULES) == set(choices.Format)


def test_choices_read_and_write_as_plain_strings():
    spec = QuantSpec(format="mxfp4", group_size=32)
    assert isinstance(spec.format, choices.Format) and spec.format == "mxfp4" and f"{spec.format}" == "mxfp4"
    assert repr(spec).startswith("QuantSpec(format='mxfp4'") and json.dumps(spec.format) == '"mxfp4"'
    text = Recipe(weights=spec, solver=SolverSpec(name="gptq")).to_yaml()
    assert "format: mxfp4" in text and "name: gptq" in text and "!!python" not in text
    assert yaml.safe_load(text)["weights"]["scale_rule"] == "spec"
    assert FitSpec(params=("R_res",)).params == (choices.FitParam.R_RES,)


def test_a_missing_implementation_is_named_by_check_recipe(monkeypatch):
    monkeypatch.setattr(SOLVERS, "_entries", {k: v for k, v in SOLVERS._entries.items() if k != "gptq"})
    with pytest.raises(UnknownNameError, match="unknown solver 'gptq'"):
        check_recipe(Recipe(solver=SolverSpec(name="gptq")))


@pytest.mark.parametrize("sets, message", [
    (["weights.per_head=true"], r"weights.per_head=true: one group per head is for activations"),
    (["kv_cache.bits=8", "kv_cache.per_head=true"], r"kv_cache.per_head=true"),
])
def test_per_head_outside_activations_is_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("rtn-w4a16", sets)
    assert load_recipe("rtn-w4a4kv4", ["activations.per_head=true"]).activations.per_head


def test_fitting_combinations_are_refused_before_the_run():
    with pytest.raises(ConfigError, match=r"fitting.eval_samples=4 holds out every one of the fitting.nsamples=4"):
        load_recipe("ostquant-w4a16", ["fitting.nsamples=4", "fitting.eval_samples=4"])
    load_recipe("ostquant-w4a16", ["fitting.nsamples=5", "fitting.eval_samples=4"])
    no_weights = Recipe(fitting=FitSpec(train_weights=True))
    with pytest.raises(ConfigError, match="fitting.train_weights=true without a weights section"):
        check_recipe(no_weights)
    check_recipe(Recipe(weights=QuantSpec(), fitting=FitSpec(train_weights=True)))


def test_every_rule_passes_every_preset():
    from orthoquant.recipes import preset_names

    for name in preset_names():
        recipe = load_recipe(name)
        assert [rule.__name__ for rule in RECIPE_RULES if rule(recipe)] == [], name


def test_a_recipe_built_in_python_is_checked_before_quantize_writes(tmp_path):
    from orthoquant import quantize
    from orthoquant.models.tiny import tiny_model

    windows = token_windows(2, 16)
    recipe = Recipe(weights=QuantSpec(bits=4, per_head=True))  # the schema alone accepts it
    with pytest.raises(ConfigError, match="weights.per_head=true"):
        quantize(tiny_model("llama"), recipe, windows, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
