"""Atomic writes and resumable training state: the one way the suite writes files and resumes loops.

- :func:`atomic_write` and its text / JSON / torch forms write to a unique temporary file in the target's
  folder and rename it into place, so a reader never sees half a file and concurrent writers never share a
  temporary name; :func:`replace_dir` does the same for a whole folder.
- :class:`ResumeState` is every training loop's resume policy (pretraining, linear probe, Fast R-CNN, dense
  heads): the state is loaded with ``weights_only=True`` (a planted pickle cannot run code); a state written
  with other settings is refused in one line naming the settings that differ; a corrupt state is reported
  in one line and ignored (training starts over), never a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a unique temporary path beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp (and some writers) make the file 0600: give it the mode a plain open() would
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, **dumps))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def is_temporary(path: Path) -> bool:
    """A leftover of an interrupted :func:`atomic_write` (safe to delete)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


@contextmanager
def replace_dir(out: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in for ``out`` only when the block succeeds.

    The new folder gets the umask's permissions (never 0700 from mkdtemp); an existing ``out`` keeps its own.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        tmp.chmod(out.stat().st_mode & 0o7777 if out.exists() else _default_dir_mode())
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            old.rmdir()
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_dir_mode() -> int:
    return 0o777 & ~_umask()


# --------------------------------------------------------------------------------- resumable state

STATE_FORMAT = 1


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_diff(saved: Mapping[str, Any], now: Mapping[str, Any], may_change: frozenset[str] = frozenset()) -> str:
    """``"lr=0.1 (now 0.2), epochs=3 (now 4)"`` for the settings that differ ('' when none do)."""
    a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(now)))
    changed = [k for k in sorted(set(a) | set(b)) if k not in may_change and a.get(k) != b.get(k)]
    return ", ".join(f"{k}={a.get(k)!r} (now {b.get(k)!r})" for k in changed)


class ResumeState:
    """A training loop's resume file: ``{"format", "what", "settings", "payload"}`` saved with torch.save.

    ``settings`` is everything that must match for a resume to be valid (JSON-serialisable; recorded as
    JSON text so the file loads with ``weights_only=True``); keys in ``may_change`` may differ.
    """

    def __init__(self, path: str | Path, settings: Mapping[str, Any], what: str = "training",
                 may_change: frozenset[str] = frozenset()):
        self.path, self.what, self.may_change = Path(path), what, may_change
        self.settings = json.loads(json.dumps(settings))

    def load(self, map_location: Any = "cpu") -> dict[str, Any] | None:
        """The saved payload; None when there is no state or it is unreadable (reported in one line)."""
        import torch

        from .console import warn

        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location=map_location, weights_only=True)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise ValueError("not a resume state of this version")
            saved = json.loads(state["settings"])
            payload = state["payload"]
        except Exception as e:  # noqa: BLE001 - any unreadable state means "start over"
            warn(f"ignoring unreadable {self.what} resume state {self.path} ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:160] if str(e) else ''}); starting over")
            return None
        diff = settings_diff(saved, self.settings, self.may_change)
        if diff:
            raise UserError(f"{self.what} resume state was written with other settings: {diff}; rerun with those "
                            "settings, or delete the state to start afresh", self.path)
        return payload

    def save(self, payload: Mapping[str, Any]) -> None:
        atomic_torch_save({"format": STATE_FORMAT, "what": self.what, "settings": json.dumps(self.settings),
                           "payload": dict(payload)}, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
