"""Unpickling files a user hands in (CIFAR batches, proposal files) without letting them run code.

A restricted unpickler resolves only the handful of globals a numpy array needs
(``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``, ``_codecs.encode``);
anything else (a pickle that would call ``os.system``, say) is refused with BadData naming the file.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

from ..errors import BadData

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("__builtin__", "bytes"), ("builtins", "bytes"),  # protocol-2 pickles of empty arrays call bytes()
}


class UnsafePickle(pickle.UnpicklingError):
    """The pickle asks for a global outside the allow-list."""


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise UnsafePickle(f"refusing to load global {module}.{name}")
        if module == "__builtin__":
            module = "builtins"
        if module.startswith("numpy.core"):
            try:  # numpy >= 2 moved numpy.core to numpy._core
                return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def safe_unpickle(path: Path, what: str = "pickle file") -> Any:
    """Unpickle ``what`` (Python 2 pickles too, with bytes keys) allowing only numpy array globals."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadData(f"{what} not found", path) from None
    except OSError as e:
        raise BadData(f"unreadable {what} ({e})", path) from None
    try:
        return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickle as e:
        raise BadData(f"unsafe pickle ({e})", path) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise BadData(f"corrupt {what} ({type(e).__name__}: {e})", path) from None
