"""Content-addressed on-disk feature cache.

One entry per (checkpoint, arch, dataset fingerprint, split, tap, transform,
pooling, precision). An entry is a directory of ``.npy`` shards plus a
``manifest.json`` written last. Shards are float16 (half the disk of float32; features are
L2-normalised or standardised before use); a shard holding a value beyond float16's range (65504:
an unnormalised trunk, a checkpoint whose BatchNorm statistics lag its weights) is kept in float32
instead, and the entry then loads as float32:

    <root>/<key[:2]>/<key>/key.json          the key fields, human-readable
    <root>/<key[:2]>/<key>/shard_00000.npy   rows [0, shard_rows)
    <root>/<key[:2]>/<key>/manifest.json     rows, dim, shard list with sha256 (entry complete)

Every file is written to a temporary name and renamed, so a ``kill -9`` leaves
only whole shards behind; extraction resumes with the missing ones. A complete
entry is verified against its manifest on read; a corrupt or stale entry is
reported and rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .console import warn
from .io import atomic_write, is_temporary

CACHE_FORMAT = 1
DEFAULT_SHARD_ROWS = 512


def default_cache_root() -> Path:
    env = os.environ.get("EVALSUITE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "evalsuite" / "features"


def cache_key(fields: Mapping[str, Any]) -> str:
    payload = json.dumps({"cache_format": CACHE_FORMAT, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, synced to disk before the rename (a crash leaves whole files only)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def storage_array(array: np.ndarray) -> np.ndarray:
    """``array`` as the cache stores it: float16 when every value fits, float32 otherwise."""
    with np.errstate(over="ignore"):  # values beyond float16's range are the float32 case, not a warning
        half = np.asarray(array, dtype=np.float16)
    if np.isfinite(half).all() or not np.isfinite(np.asarray(array, dtype=np.float32)).all():
        return np.ascontiguousarray(half)
    return np.ascontiguousarray(array, dtype=np.float32)


def _atomic_save_npy(path: Path, array: np.ndarray) -> str:
    """Save an array atomically; return the sha256 of the bytes written."""
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    data = buf.getvalue()
    _atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


class CorruptEntry(Exception):
    pass


@dataclass
class CacheEntry:
    """Features of one tap for one dataset split."""

    root: Path
    key: str
    fields: dict[str, Any]
    rows: int
    shard_rows: int = DEFAULT_SHARD_ROWS

    @property
    def dir(self) -> Path:
        return self.root / self.key[:2] / self.key

    @property
    def num_shards(self) -> int:
        return (self.rows + self.shard_rows - 1) // self.shard_rows

    def shard_path(self, i: int) -> Path:
        return self.dir / f"shard_{i:05d}.npy"

    def shard_range(self, i: int) -> tuple[int, int]:
        lo = i * self.shard_rows
        return lo, min(self.rows, lo + self.shard_rows)

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def prepare(self) -> None:
        """Create the entry directory; drop it first if it holds another key (stale)."""
        key_file = self.dir / "key.json"
        if key_file.is_file():
            try:
                stored = json.loads(key_file.read_text())
            except (OSError, json.JSONDecodeError):
                stored = None
            if stored != {"fields": self.fields, "rows": self.rows, "shard_rows": self.shard_rows}:
                warn(f"stale feature cache entry {self.dir} (different key); rebuilding")
                self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not key_file.is_file():
            payload = {"fields": self.fields, "rows": self.rows, "shard_rows": self.shard_rows}
            _atomic_write_bytes(key_file, json.dumps(payload, sort_keys=True, default=str).encode())
        for leftover in self.dir.iterdir():
            if is_temporary(leftover):
                leftover.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def shard_done(self, i: int, dim: int | None = None) -> bool:
        """A shard counts as done if it loads with the expected row count (and dim, when known)."""
        p = self.shard_path(i)
        if not p.is_file():
            return False
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError):
            p.unlink(missing_ok=True)
            return False
        lo, hi = self.shard_range(i)
        ok = arr.ndim == 2 and arr.shape[0] == hi - lo and (dim is None or arr.shape[1] == dim)
        if not ok:
            p.unlink(missing_ok=True)
        return ok

    def missing_shards(self) -> list[int]:
        if self.is_complete():
            return []
        return [i for i in range(self.num_shards) if not self.shard_done(i)]

    def write_shard(self, i: int, array: np.ndarray) -> str:
        lo, hi = self.shard_range(i)
        if array.shape[0] != hi - lo:
            raise ValueError(f"shard {i} expects {hi - lo} rows, got {array.shape[0]}")
        return _atomic_save_npy(self.shard_path(i), storage_array(array))

    def finalize(self, extra: Mapping[str, Any] | None = None) -> None:
        shards = []
        dim = None
        for i in range(self.num_shards):
            data = self.shard_path(i).read_bytes()
            arr = np.load(self.shard_path(i), mmap_mode="r")
            dim = int(arr.shape[1])
            shards.append({"file": self.shard_path(i).name, "rows": int(arr.shape[0]), "dtype": str(arr.dtype),
                           "sha256": hashlib.sha256(data).hexdigest()})
        dtype = "float16" if all(s["dtype"] == "float16" for s in shards) else "float32"
        manifest = {"key": self.key, "rows": self.rows, "dim": dim, "dtype": dtype,
                    "shards": shards, **(dict(extra) if extra else {})}
        _atomic_write_bytes(self.manifest_path, json.dumps(manifest, sort_keys=True, default=str).encode())

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def load(self, verify: bool = True) -> np.ndarray:
        """All rows as one array, float16 unless a shard needed float32 (filled in place: no second copy)."""
        try:
            m = self.manifest()
        except (OSError, json.JSONDecodeError) as e:
            raise CorruptEntry(f"unreadable manifest ({e})") from None
        if m.get("rows") != self.rows or len(m.get("shards", [])) != self.num_shards:
            raise CorruptEntry("manifest does not match the key")
        if m.get("dtype", "float16") not in ("float16", "float32"):
            raise CorruptEntry(f"unknown dtype {m.get('dtype')!r} in the manifest")
        out = np.empty((self.rows, int(m["dim"])), dtype=m.get("dtype", "float16"))
        for i, s in enumerate(m["shards"]):
            path = self.dir / s["file"]
            try:
                data = path.read_bytes()
            except OSError:
                raise CorruptEntry(f"missing shard {s['file']}") from None
            if verify and hashlib.sha256(data).hexdigest() != s["sha256"]:
                raise CorruptEntry(f"checksum mismatch in {s['file']}")
            import io

            try:
                arr = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError, EOFError):
                raise CorruptEntry(f"unreadable shard {s['file']}") from None
            lo, hi = self.shard_range(i)
            if arr.shape != (hi - lo, out.shape[1]):
                raise CorruptEntry(f"shard {s['file']} has shape {arr.shape}")
            if str(arr.dtype) != s.get("dtype", "float16"):
                raise CorruptEntry(f"shard {s['file']} holds {arr.dtype}, the manifest says {s.get('dtype')}")
            out[lo:hi] = arr
        return out


class FeatureCache:
    def __init__(self, root: str | Path | None = None, shard_rows: int = DEFAULT_SHARD_ROWS):
        self.root = Path(root) if root is not None else default_cache_root()
        self.shard_rows = shard_rows

    def entry(self, fields: Mapping[str, Any], rows: int) -> CacheEntry:
        fields = json.loads(json.dumps(dict(fields), sort_keys=True, default=str))
        key = cache_key({**fields, "rows": rows, "shard_rows": self.shard_rows})
        return CacheEntry(self.root, key, fields, rows, self.shard_rows)
