"""The preset recipes (the YAML files of this folder) and :func:`load_recipe`, the way a recipe enters a run.

A loaded recipe is validated (:func:`orthoquant.validate.check_recipe`): its names resolve to
registered implementations and the combinations the code cannot run are refused here, before a run
starts. Listing presets reads only their YAML, so ``orthoquant recipes`` imports no torch.
"""
from __future__ import annotations

import typing
from importlib import resources
from pathlib import Path

from ..config import Recipe
from ..errors import ConfigError, UnknownNameError

_PRESETS = resources.files(__name__)


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _PRESETS.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of the preset called ``name`` (one of :func:`preset_names`)."""
    return _PRESETS.joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe file {path} is not UTF-8 text (byte {e.start})") from None


def _read_recipe(name_or_path: str) -> Recipe:
    """A preset by name, or a recipe YAML file by path, as written (not yet validated)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} {'is not a file' if path.exists() else 'does not exist'}")
        return Recipe.from_yaml(_read_text(path), f"recipe file {path}")
    if name_or_path in preset_names():
        return Recipe.from_yaml(preset_text(name_or_path))
    raise UnknownNameError(f"unknown recipe preset '{name_or_path}'; known: {', '.join(preset_names())}")


def load_recipe(name_or_path: str, overrides: typing.Sequence[str] = ()) -> Recipe:
    """A preset by name, or a recipe YAML file by path, with ``--set`` overrides applied, validated."""
    # Imported here: validation resolves names in the registries, which import torch; listing the
    # presets (``orthoquant recipes``) must not.
    from ..validate import check_recipe

    recipe = _read_recipe(name_or_path)
    recipe = recipe.with_overrides(overrides) if overrides else recipe
    check_recipe(recipe)
    return recipe
