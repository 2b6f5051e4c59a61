import pytest

from orthoquant.config import CalibSpec, QuantSpec, Recipe
from orthoquant.recipes import load_recipe, preset_names
from orthoquant.errors import ConfigError, UnknownNameError


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_yaml(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_foundation_presets_exist():
    assert {"fp16", "rtn-w4a16", "rtn-w8a8", "rtn-w4a4kv4"} <= set(preset_names())


def test_unknown_key_is_rejected_with_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bitz'\] in weights.*allowed.*bits"):
        Recipe.from_dict({"weights": {"bitz": 4}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['solverr'\]"):
        Recipe.from_dict({"solverr": {}})


@pytest.mark.parametrize("data, message", [
    ({"weights": {"bits": 9}}, r"weights: bits=9.*\[2, 8\]"),
    ({"weights": {"format": "int7"}}, r"format='int7' is not allowed; choose one of"),
    ({"weights": {"group_size": -3}}, r"group_size=-3"),
    ({"activations": {"clip_ratio": 1.5}}, r"clip_ratio=1.5"),
    ({"solver": {"name": "magic"}}, r"solver.name='magic'.*rtn"),
    ({"calibration": {"nsamples": 0}}, r"nsamples=0"),
    ({"weights": {"bits": "four"}}, r"weights.bits='four' must be of type int"),
    ({"weights": {"symmetric": 1}}, r"symmetric=1 must be of type bool"),
])
def test_invalid_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(data)


def test_set_overrides_edit_fields_by_dotted_path():
    recipe = load_recipe("rtn-w4a16", ["weights.bits=3", "calibration.nsamples=16", "kv_cache.bits=8"])
    assert recipe.weights.bits == 3 and recipe.calibration.nsamples == 16
    assert recipe.kv_cache == QuantSpec(bits=8)  # a section that was empty is created with defaults
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_recipe("rtn-w4a16", ["weights.bits"])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(UnknownNameError, match="unknown recipe preset 'nope'; known: .*rtn-w4a16"):
        load_recipe("nope")


def test_missing_recipe_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_recipe_file_with_partial_override_inherits_the_rest(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(
        "weights: {bits: 4, group_size: 32, clip_search: true}\n"
        "overrides:\n  - {pattern: 'mlp\\.down_proj', weights: {bits: 8}}\n  - {pattern: 'layers\\.0\\.self_attn\\.q_proj', fp: true}\n"
    )
    recipe = load_recipe(str(path))
    down = recipe.weights_for("model.layers.3.mlp.down_proj")
    assert down == QuantSpec(bits=8, group_size=32, clip_search=True)
    assert recipe.weights_for("model.layers.3.mlp.up_proj").bits == 4
    assert recipe.weights_for("model.layers.0.self_attn.q_proj") is None
    assert recipe.weights_for("model.layers.10.self_attn.q_proj").bits == 4
    assert recipe.weights_for("lm_head") is None  # kept in full precision by default
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_recipes_are_frozen():
    recipe = Recipe()
    with pytest.raises(Exception):
        recipe.weights = QuantSpec()  # type: ignore[misc]
    assert CalibSpec().source == "wikitext2"
