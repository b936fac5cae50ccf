"""Errors a user can cause.

Anything raised as :class:`UserError` reaches the CLI as one line on stderr and
exit code 2, with no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input: bad path, wrong format, bad option."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class BadCheckpoint(UserError):
    """The checkpoint file cannot be read or does not fit the architecture."""


class BadData(UserError):
    """A dataset file is missing, empty or corrupt."""


class BadFeatures(UserError):
    """Extracted features are unusable (NaN/Inf, wrong shape)."""


class TaskSkipped(UserError):
    """A task that cannot run here (its data is missing, it has no head for this architecture): ``--tasks all``
    skips it with a note; a task asked for by name fails with the line."""


class NotApplicable(TaskSkipped):
    """The task does not apply to this checkpoint (e.g. a dense task on a ViT before its ViT head exists)."""


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path if it is an existing regular file, else raise a UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found", p)
    if p.is_dir():
        raise UserError(f"expected a {what}, found a directory", p)
    return p


def require_dir(path: str | Path, what: str = "directory") -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found", p)
    if not p.is_dir():
        raise UserError(f"expected a {what}, found a file", p)
    return p
