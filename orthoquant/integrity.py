"""Files that are whole, recorded and owned: atomic writes under per-process temporary names, sha256
records and their checks, and an exclusive lock on a folder.

Run folders (``run.json``) and exports (``orthoquant_config.json``) record every file they hold with
its sha256 and size; a reader checks a file against its record before trusting it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError

_CHUNK = 1 << 20
TMP_SUFFIX = ".tmp"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def temporary_name(path: Path) -> Path:
    """A name next to ``path`` no other process (nor another call of this one) uses."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename onto ``path``: a crash never leaves a file that looks whole."""
    tmp = temporary_name(Path(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def record_problem(path: Path, record: Any) -> str | None:
    """Why ``path`` does not match its ``record`` ({"sha256", "bytes"}), or None when it does."""
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) \
            or not isinstance(record.get("bytes"), int):
        return "has a malformed record"
    if path.is_symlink():
        return "is a symbolic link (refused: only regular files are read)"
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"is {size} bytes, {record['bytes']} were recorded (truncated or altered)"
    if sha256_file(path) != record["sha256"]:
        return "does not match its recorded sha256 (corrupt or altered)"
    return None


@contextmanager
def exclusive_lock(lock_path: Path, holder: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed) for the ``with`` block.

    :param holder: what the lock protects, for the error when another process holds it.
    :raises UserError: at once (never waiting) when another process holds the lock.
    """
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock_path, flags, 0o644)
    except OSError as e:
        raise UserError(f"cannot create the lock file {lock_path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"{holder} is in use by another orthoquant process (it holds {lock_path}); "
                            "wait for it to finish or choose another --out") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
