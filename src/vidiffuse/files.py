"""Writing files and directories so that a crash never leaves a half-written one in place."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, read in 1 MiB blocks (weights and videos need not fit in memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `<path>.tmp`, then rename it over `path`: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def vidiffuse_home() -> Path:
    """Where vidiffuse keeps its state (signing certificates, jobs, registry): `$VIDIFFUSE_HOME`, else ~/.vidiffuse."""
    return Path(os.environ.get("VIDIFFUSE_HOME") or Path.home() / ".vidiffuse")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty `<path>.tmp` to fill; on success it replaces `path` by renames.

    The previous `path` survives as `<path>.old` until the new one is in place, so a process killed
    between the two renames leaves one complete copy behind.
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
