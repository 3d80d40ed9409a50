"""The one error type for bad data files: it always names the file, and the line when there is one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class DataFormatError(ValueError):
    """A data file cannot be used; the message reads ``<file>:<line>: <problem>``."""

    def __init__(self, path: Union[str, Path], problem: str, line: Optional[int] = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")
