"""Atomic writes: a reader sees the old file (or directory) or the new one, never a torn one.

Every file or directory this toolkit writes outside a checkpoint goes through :func:`atomic_output`: it is written
under a temporary name next to its destination, then renamed into place (``os.replace`` is atomic on POSIX within
one filesystem). Checkpoints add a ``COMPLETE`` marker and their own rename on top (checkpoint.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


@contextmanager
def atomic_output(
    output: str | os.PathLike, *, is_dir: bool = False, overwrite: bool = True
) -> Iterator[Path]:
    """Yield a temporary path next to ``output`` to write a file (or, with ``is_dir``, a directory) into; when the
    block ends without error, move it into place. On any error the temporary path is removed and ``output`` (an
    existing one too) is untouched.

    ``overwrite=False`` refuses to replace an ``output`` that appeared while the block ran (``FileExistsError``).
    An existing directory is swapped out (renamed aside, then deleted), since ``os.replace`` cannot replace one.
    """
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    target = tmp if is_dir else tmp / output.name
    try:
        yield target
        if output.is_dir() and not output.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{output} appeared while it was being written")
            old = output.parent / f".{output.name}.old"
            if old.exists() or old.is_symlink():
                _remove(old)
            os.replace(output, old)
            os.replace(target, output)
            _remove(old)
        else:
            if not overwrite and (output.exists() or output.is_symlink()):
                raise FileExistsError(f"{output} appeared while it was being written")
            os.replace(target, output)  # replaces an existing file in one step
        fsync_dir(output.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, flushed to disk before the rename."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, flushed to disk before the rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
