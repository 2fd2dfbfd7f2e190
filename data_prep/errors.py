"""Exceptions for bad user input.

Every problem with user-supplied data raises :class:`SpinepipeInputError`; the CLI turns it into one
line ``error: <file>: <problem>`` and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import os


class SpinepipeInputError(Exception):
    """Bad user input: names the offending file and says what was expected and what was found."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)

    def __reduce__(self):
        # picklable across worker processes (the default would call __init__ with the message only)
        return (type(self), (self.path, self.problem))
