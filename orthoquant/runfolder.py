"""The run folder: recipe, per-layer quantized state, metrics and status.

It is the resume checkpoint (a rerun skips finished layers) and holds everything needed to rebuild
the quantized model: packed codes and scales of each quantized linear, every other parameter as is.

    RUN/run.json           fingerprint (see orthoquant.fingerprint), status: running | complete,
                           sha256 and size of every finished file, per-layer metrics, seconds so far
    RUN/run.lock           held (flock) by the process quantizing into the folder
    RUN/recipe.yaml        the recipe, for people
    RUN/rest.safetensors   embeddings, final norm, lm_head (after folding / transforms)
    RUN/layers/00012.safetensors

Every file is written to a per-process temporary name and renamed, so a crash never leaves a file
that looks whole, and recorded in ``run.json`` once finished (a layer file as its layer finishes).
Readers check the records: a corrupt or missing file is an error naming it, except a layer file of an
unfinished run, which the resume recomputes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from .errors import UserError
from .fingerprint import describe_changes
from .integrity import (atomic_write, exclusive_lock, file_record, is_temporary, record_problem,
                        refuse_if_locked)

log = logging.getLogger(__name__)
LOCK = "run.lock"
LAYERS = "layers"
# Files that later commands rewrite (eval's results) or that describe the folder itself: never recorded.
_UNRECORDED = ("run.json", LOCK, "results.json", "results.md")


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True)))


class CorruptRunError(UserError):
    """A file of a run folder does not match its record in run.json (hash, size, missing)."""


def _files_under(folder: Path) -> Iterator[Path]:
    """Regular files below ``folder``; symbolic links are neither followed nor listed."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not Path(root, d).is_symlink()]
        yield from (Path(root, n) for n in names if not Path(root, n).is_symlink())


class RunFolder:
    """A run's folder on disk; see the module docstring for the layout."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._began: float | None = None
        self._earlier_seconds = 0.0

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    def info(self) -> dict[str, Any]:
        if not self.info_path.is_file():
            raise UserError(f"{self.path} is not an orthoquant run folder (no run.json)")
        try:
            info = json.loads(self.info_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptRunError(f"{self.info_path} is corrupt ({e}); delete the folder and quantize again") from None
        if not isinstance(info, dict) or not isinstance(info.get("fingerprint"), dict) or "status" not in info:
            raise CorruptRunError(f"{self.info_path} is corrupt (no fingerprint or status)")
        return info

    @property
    def is_export(self) -> bool:
        """A native export (a run folder written by ``orthoquant export``, trusted through its manifest)."""
        return "export_of" in self.info()["fingerprint"]

    # --- starting, resuming, finishing (inside :meth:`locked`) ------------------------------------
    @contextmanager
    def locked(self) -> Iterator["RunFolder"]:
        """Hold the folder's lock for the ``with`` block; a second process gets a UserError at once."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output folder {self.path} is a file; choose another --out")
        self._refuse_foreign()
        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.path / LOCK, f"output folder {self.path}"):
            for folder in (self.path, self.path / LAYERS):  # left by a killed writer: nobody writes here now
                for path in folder.glob("*"):
                    if is_temporary(path) and not path.is_symlink():
                        path.unlink()
            yield self

    def refuse_if_busy(self) -> None:
        """Fail at once, writing nothing, when another process holds the folder's lock."""
        refuse_if_locked(self.path / LOCK, f"output folder {self.path}")

    def _refuse_foreign(self) -> None:
        """A non-empty folder is refused unless orthoquant made it (its run.json or lock file is there:
        a process killed before writing run.json leaves the lock file and maybe an empty layers/)."""
        if self.path.is_dir() and not self.info_path.is_file() and not (self.path / LOCK).exists() \
                and any(self.path.iterdir()):
            raise UserError(f"output folder {self.path} is not empty and holds no orthoquant run")

    def start(self, fingerprint: dict[str, Any], recipe_yaml: str, legacy: dict[str, Any] | None = None) -> bool:
        """Create the folder, or check it holds the same run and its files are whole.

        :param legacy: the fingerprint an older orthoquant would have recorded for this run.
        :returns: True if the run is already complete.
        :raises UserError: another run, a corrupt file, or an unfinished run of an older orthoquant.
        """
        self._began = time.perf_counter()
        self._refuse_foreign()
        if not self.info_path.is_file():
            (self.path / LAYERS).mkdir(parents=True, exist_ok=True)
            write_json(self.info_path, {"fingerprint": fingerprint, "status": "running", "files": {},
                                        "metrics": {}, "seconds": 0.0})
            self.write_text("recipe.yaml", recipe_yaml)
            return False
        info = self.info()
        if "files" not in info:
            return self._start_legacy(info, legacy)
        self._check_same_run(info["fingerprint"], fingerprint)
        if info["status"] == "complete":
            self.verify()
            return True
        self._earlier_seconds = float(info.get("seconds") or 0.0)
        self.verify(layers=False)  # layer files are checked by the runner, which recomputes bad ones
        if "recipe.yaml" not in info["files"]:
            self.write_text("recipe.yaml", recipe_yaml)
        return False

    def _check_same_run(self, recorded: dict[str, Any], fingerprint: dict[str, Any]) -> None:
        changes = describe_changes(recorded, fingerprint)
        if changes:
            raise UserError(f"output folder {self.path} holds a different run: {'; '.join(changes)}; to start "
                            "fresh choose another --out or delete the folder")

    def _start_legacy(self, info: dict[str, Any], legacy: dict[str, Any] | None) -> bool:
        """A folder of an older orthoquant: no content fingerprint and no file records."""
        if legacy is None or info["fingerprint"] != legacy:
            raise UserError(f"output folder {self.path} holds a different run (model or recipe differ); "
                            "choose another --out or delete it")
        if info["status"] != "complete":
            raise UserError(f"output folder {self.path} holds an unfinished run of an older orthoquant, which "
                            "recorded no file hashes, so it cannot be resumed safely; delete it or choose another --out")
        log.warning("%s was written by an older orthoquant without file hashes; its files are not checked", self.path)
        return True

    def elapsed(self) -> float:
        """Seconds spent quantizing this run, earlier interrupted attempts included."""
        now = time.perf_counter() - self._began if self._began is not None else 0.0
        return self._earlier_seconds + now

    def finish(self, extra: dict[str, Any]) -> None:
        """Record every file not recorded yet (rest, config, tokenizer) and mark the run complete."""
        self.record_new_files()
        write_json(self.info_path, {**self.info(), **extra, "seconds": self.elapsed(), "status": "complete"})

    # --- records ---------------------------------------------------------------------------------
    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.path).as_posix()

    def _resolve(self, name: str) -> Path:
        """The path of a name recorded in run.json, which must stay inside the folder."""
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or any(p in ("..", ".") for p in parts) or "\\" in name:
            raise CorruptRunError(f"{self.info_path} records a file outside the run folder: {name!r}")
        return self.path.joinpath(*parts)

    def record_files(self, paths: list[Path], metrics: dict[str, Any] | None = None) -> None:
        """Record finished files (sha256, size) and per-layer metrics in run.json."""
        info = self.info()
        info.setdefault("files", {}).update({self.relative(p): file_record(p) for p in paths})
        info.setdefault("metrics", {}).update(metrics or {})
        info["seconds"] = self.elapsed()
        write_json(self.info_path, info)

    def record_layer(self, index: int, metrics: dict[str, Any]) -> None:
        self.record_files([self.layer_path(index)], {str(index): metrics})

    def record_new_files(self) -> None:
        """Record every regular file not recorded yet, except layer files (recorded as each finishes)."""
        recorded = self.info().get("files", {})
        new = [p for p in _files_under(self.path) if not is_temporary(p)
               and self.relative(p) not in recorded and self.relative(p) not in _UNRECORDED
               and self.relative(p).split("/")[0] != LAYERS]
        self.record_files(sorted(new))

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path / name, lambda p: p.write_text(text))
        self.record_files([self.path / name])

    def layer_metrics(self, index: int) -> dict[str, Any] | None:
        return self.info().get("metrics", {}).get(str(index))

    # --- checks ----------------------------------------------------------------------------------
    def layer_problem(self, index: int) -> str | None:
        """Why layer ``index``'s file cannot be reused, or None when it is whole and recorded."""
        path = self.layer_path(index)
        record = self.info().get("files", {}).get(self.relative(path))
        if record is None:
            return "was not recorded as finished" if path.exists() else "is missing"
        return record_problem(path, record)

    def verify(self, layers: bool = True) -> None:
        """Check every recorded file (``layers``: layer files too) against its sha256 and size.

        :raises CorruptRunError: naming the first file that is missing, truncated or altered.
        """
        info = self.info()
        if "files" not in info:
            log.warning("%s was written by an older orthoquant without file hashes; its files are not checked",
                        self.path)
            return
        advice = "delete the folder and quantize again" if info["status"] == "complete" else \
            "delete the folder to start fresh"
        for name, record in sorted(info["files"].items()):
            if not layers and name.split("/")[0] == LAYERS:
                continue
            problem = record_problem(self._resolve(name), record)
            if problem is not None:
                raise CorruptRunError(f"run {self.path}: {name} {problem}; {advice}")

    def require_records(self, n_layers: int) -> None:
        """Every file a finished run must hold is recorded (runs with records; see :meth:`verify`)."""
        files = self.info().get("files")
        if files is None:
            return
        needed = [self.rest_path, *(self.layer_path(i) for i in range(n_layers))]
        missing = [self.relative(p) for p in needed if self.relative(p) not in files]
        if missing:
            raise CorruptRunError(f"run {self.path} is marked complete but does not record {missing[0]}; "
                                  "delete the folder and quantize again")

    def layer_path(self, index: int) -> Path:
        return self.path / LAYERS / f"{index:05d}.safetensors"

    @property
    def rest_path(self) -> Path:
        return self.path / "rest.safetensors"
