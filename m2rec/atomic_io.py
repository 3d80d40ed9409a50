"""Atomic file writes: a reader (or a later run) sees the old file or the new one, never half of one.

The content goes to a temporary file in the destination's own folder (so the final rename stays on one
file system), is flushed to disk, and then ``os.replace`` puts it in place in one step. If anything
fails or is interrupted (Ctrl-C) before that, the temporary file is removed and the destination is
untouched.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, Path]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates its file readable by the owner only; the result gets the mode a plain open() would.
_FILE_MODE = 0o666 & ~_umask()


def _replace_atomically(path: PathLike, write: Callable[[Any], None], binary: bool) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; the folder must exist."""
    return _replace_atomically(path, lambda f: f.write(text), binary=False)


def torch_save_atomic(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically; the folder must exist."""
    import torch
    return _replace_atomically(path, lambda f: torch.save(obj, f), binary=True)
