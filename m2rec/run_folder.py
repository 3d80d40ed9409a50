"""The output folder of one training run (``m2rec train --out``) and the one place that writes it.

A run folder holds ``checkpoint.pt`` (the best epoch's weights), ``train_log.jsonl`` (one record per
finished epoch) and ``train_summary.json`` (how the run ended, its best epoch and configuration). Every
file is replaced atomically (``m2rec.atomic_io``), and a new run first removes an earlier run's files,
so whatever stops a run — divergence, Ctrl-C, a crash — the folder describes that one run: the log up
to the last finished epoch, the checkpoint of the best of those epochs, and a summary saying how it
ended. A non-empty folder is refused unless the caller asks to overwrite it, so no earlier run is lost
by accident.

In a run of several processes only rank 0 writes; the others hold a ``RunFolder(..., writes=False)``
that follows the same calls without touching the disk, so every process can say what the run kept.
"""
from __future__ import annotations

import json
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Union

from .atomic_io import write_text_atomic

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
SUMMARY = "train_summary.json"
RUN_FILES = (CHECKPOINT, LOG, SUMMARY)


def check_output_dir(out_dir: Union[str, Path], overwrite: bool, option: str = "--out") -> None:
    """Raise ValueError (one line naming ``option``) unless ``out_dir`` can hold a new run: it must be
    a folder or creatable as one, and empty unless ``overwrite``. Nothing is created or removed."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: is a file, not a folder")
    for parent in path.parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {path}: {parent} is a file, so no folder can be made below it")
            break
    if path.is_dir() and not overwrite:
        names = sorted(p.name for p in path.iterdir())
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ValueError(f"{option} {path}: the folder is not empty ({shown}); pass --overwrite to "
                             f"replace the run in it, or choose another {option}")


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ctrl-C and SIGTERM are ignored inside the block (main thread only: elsewhere Python cannot
    change handlers). For the summary, the last word of a run that is ending anyway: a second signal
    — or torchrun's SIGTERM to the others once one process has stopped — must not cut it off."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}  # None: set outside Python, keep it
    for s in previous:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class RunFolder:
    """Writes one run's files; see the module docstring. ``writes=False``: the same bookkeeping, no
    files (the processes other than rank 0)."""

    def __init__(self, out_dir: Union[str, Path], writes: bool = True):
        self.path = Path(out_dir)
        self.writes = writes
        self.checkpoint_epoch = 0  # the epoch whose checkpoint is on disk (0: none yet)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def prepare(self, overwrite: bool) -> None:
        """Check the folder (``check_output_dir``), create it, with ``overwrite`` remove an earlier
        run's files (other files in it are left alone), and start an empty log."""
        if not self.writes:
            return
        check_output_dir(self.path, overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            self.write_log([])  # from now on the folder always holds this run's log
        except OSError as e:
            raise ValueError(f"--out {self.path}: cannot prepare the folder ({e.strerror or e})") from None

    def write_log(self, history: List[Dict[str, Any]]) -> None:
        """The whole log so far (one JSON record per finished epoch), replacing the previous one."""
        if not self.writes:
            return
        write_text_atomic(self.path / LOG, "".join(json.dumps(record) + "\n" for record in history))

    def save_checkpoint(self, epoch: int, *args: Any, **kwargs: Any) -> Path:
        """``m2rec.checkpoint.save_checkpoint`` into this folder (atomic too); ``checkpoint_epoch``
        changes only once the file is in place, so it always names what is on disk."""
        from .checkpoint import save_checkpoint
        if self.writes:
            save_checkpoint(self.checkpoint, *args, **kwargs)
        self.checkpoint_epoch = epoch
        return self.checkpoint

    def kept(self) -> str:
        """What a run that ends now leaves behind, for the one-line message."""
        if self.checkpoint_epoch:
            return f"the best checkpoint is {self.checkpoint} (epoch {self.checkpoint_epoch})"
        return "no epoch finished, so no checkpoint was written"

    def write_summary(self, summary: Dict[str, Any]) -> None:
        """The run's last file; Ctrl-C and SIGTERM are ignored while it is written (``_signals_ignored``)."""
        if not self.writes:
            return
        with _signals_ignored():
            write_text_atomic(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")
