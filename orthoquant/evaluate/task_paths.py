"""Task folders for lm-eval with local data paths made absolute, wherever the command is run from.

lm-eval resolves a task's ``dataset_kwargs.data_files`` (and ``data_dir``, and a local ``dataset_path``)
against the *working directory*, not the YAML's folder, so a task folder with relative data paths
only works when run from one place. :func:`resolved_task_dirs` mirrors each task folder into a
temporary one whose YAMLs name their data by absolute path (relative to the YAML that names it);
every other file is linked, so ``!function module.fn`` helpers and ``include:`` files still resolve.
Folders that need no rewriting are used as they are.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from ..errors import UserError

log = logging.getLogger(__name__)

# The offline tasks ship inside the package (package data), so pip installs have them too.
LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"


@dataclass
class _Tagged:
    """A YAML node with a custom tag (lm-eval's ``!function``), kept as is through a load/dump."""

    tag: str
    value: Any


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


def _construct_tagged(loader: _Loader, suffix: str, node: yaml.Node) -> _Tagged:
    construct = {yaml.ScalarNode: loader.construct_scalar, yaml.SequenceNode: loader.construct_sequence,
                 yaml.MappingNode: loader.construct_mapping}[type(node)]
    return _Tagged("!" + suffix, construct(node))


def _represent_tagged(dumper: _Dumper, data: _Tagged) -> yaml.Node:
    represent = {str: dumper.represent_scalar, list: dumper.represent_sequence,
                 dict: dumper.represent_mapping}[type(data.value)]
    return represent(data.tag, data.value)


_Loader.add_multi_constructor("!", _construct_tagged)
_Dumper.add_representer(_Tagged, _represent_tagged)


def _absolute(value: Any, folder: Path) -> Any:
    """``value`` (a path, a list of paths, or split -> paths) with paths relative to ``folder`` made
    absolute; a path (or glob) that matches nothing there is left alone (it may be a hub name)."""
    if isinstance(value, dict):
        return {k: _absolute(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, folder) for v in value]
    if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
        if (folder / value).exists() or any(folder.glob(value)):
            return str((folder / value).resolve())
    return value


def rewrite_config(config: dict, folder: Path) -> dict:
    """A task config with its local data paths absolute (see the module docstring)."""
    out = dict(config)
    kwargs = out.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        out["dataset_kwargs"] = {k: _absolute(v, folder) if k in ("data_files", "data_dir") else v
                                 for k, v in kwargs.items()}
    if isinstance(out.get("dataset_path"), str):
        out["dataset_path"] = _absolute(out["dataset_path"], folder)
    return out


def _rewritten(path: Path) -> str | None:
    """The YAML text of ``path`` with absolute data paths, or None when nothing changes."""
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        log.warning("%s is not valid YAML (%s); left for lm-eval to report", path, e)
        return None
    if not isinstance(config, dict):
        return None
    new = rewrite_config(config, path.parent)
    return None if new == config else yaml.dump(new, Dumper=_Dumper, sort_keys=False)


def _mirror(src: Path, dst: Path, texts: dict[Path, str]) -> None:
    """Recreate ``src`` under ``dst``: rewritten YAMLs written, every other file linked (copied if
    the file system has no links)."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path in texts:
            target.write_text(texts[path], encoding="utf-8")
        else:
            try:
                os.symlink(path.resolve(), target)
            except OSError:
                shutil.copy2(path, target)


@contextmanager
def resolved_task_dirs(folders: list[Path | str]) -> Iterator[list[str]]:
    """Absolute task folders for ``TaskManager(include_path=...)``, valid inside the ``with`` block."""
    folders = [Path(f).expanduser().resolve() for f in folders]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"task folder {folder} does not exist")
    with tempfile.TemporaryDirectory(prefix="orthoquant-tasks-") as tmp:
        out = []
        for i, folder in enumerate(folders):
            # "*yaml": lm-eval's templates for `include:` are often named like `_default_template_yaml`
            texts = {p: t for p in sorted(folder.rglob("*yaml")) if p.is_file() and (t := _rewritten(p)) is not None}
            if texts:
                _mirror(folder, Path(tmp) / str(i), texts)
                log.debug("%s: %d task YAMLs with absolute data paths", folder, len(texts))
            out.append(str(Path(tmp) / str(i)) if texts else str(folder))
        yield out
