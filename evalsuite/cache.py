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

Bounded memory (:class:`FeatureStore`, ``CacheEntry.open``): a complete entry can also be read without loading
it. Its shards are opened with ``np.load(mmap_mode="r")`` one at a time and released after each copy (a mapping
held open would count its touched pages in the process's resident memory), and checksums are verified by
streaming each file in 1 MiB pieces. A store reads row ranges (``store[lo:hi]``, ``blocks``), gathers rows
(``store[idx]``) and streams one training epoch in shuffled batches (``shuffled_batches``; the order is
:func:`shuffle_windows`). The memory budget (``EVALSUITE_MEMORY_BUDGET``, ``evalsuite run --memory-budget``,
default 4 GiB) is what the tasks hold features to: features that fit are loaded (``FeatureStore.resident``),
larger ones are streamed; :func:`stream_memory` estimates what a streamed epoch holds. Stores of the same rows
(one per tap) are read in lockstep by :func:`lockstep_batches`: one read of each window serves every tap's reader,
and under ``torchrun`` each rank reads only its share of every batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .console import warn
from .errors import UserError
from .io import atomic_write, is_temporary

CACHE_FORMAT = 1
DEFAULT_SHARD_ROWS = 512
DEFAULT_MEMORY_BUDGET = 4 * 2**30  # bytes of features a task may hold at once (EVALSUITE_MEMORY_BUDGET overrides)
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def default_cache_root() -> Path:
    env = os.environ.get("EVALSUITE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "evalsuite" / "features"


def parse_size(text: str | int | float) -> int:
    """Bytes from ``4G`` / ``512MiB`` / ``1.5GB`` / ``65536`` (K, M, G, T alone are binary units), or UserError."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise UserError(f"cannot read the memory size {text!r}: give bytes or a number with K, M, G or T "
                            f"(e.g. 4G, 512MiB)")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size < 1:
        raise UserError(f"the memory size must be positive, got {text!r}")
    return size


def format_size(n: float) -> str:
    """``n`` bytes in binary units, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def default_memory_budget() -> int:
    """``$EVALSUITE_MEMORY_BUDGET`` (e.g. ``16G``), else :data:`DEFAULT_MEMORY_BUDGET`."""
    env = os.environ.get("EVALSUITE_MEMORY_BUDGET")
    return parse_size(env) if env else DEFAULT_MEMORY_BUDGET


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


def _file_sha256(path: Path, piece: int = 1 << 20) -> str:
    """sha256 of a file read in ``piece``-byte reads (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(piece):
            h.update(chunk)
    return h.hexdigest()


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

    def prepare(self, *, clean: bool = True) -> None:
        """Create the entry directory; drop it first if it holds another key (stale). ``clean`` also removes
        temporary files that killed writers left: never while another process may be writing into the entry."""
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
        for leftover in self.dir.iterdir() if clean else ():
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

    def checked_manifest(self) -> dict[str, Any]:
        """The manifest, checked against the key (CorruptEntry otherwise)."""
        try:
            m = self.manifest()
        except (OSError, json.JSONDecodeError) as e:
            raise CorruptEntry(f"unreadable manifest ({e})") from None
        if m.get("rows") != self.rows or len(m.get("shards", [])) != self.num_shards:
            raise CorruptEntry("manifest does not match the key")
        if m.get("dtype", "float16") not in ("float16", "float32"):
            raise CorruptEntry(f"unknown dtype {m.get('dtype')!r} in the manifest")
        return m

    def open(self, verify: bool = True, memory_budget: int | None = None) -> FeatureStore:
        """The entry as a :class:`FeatureStore` (nothing loaded): every shard's header is checked against the
        manifest and, with ``verify``, its sha256, read in 1 MiB pieces (CorruptEntry otherwise)."""
        m = self.checked_manifest()
        dim = int(m["dim"])
        for i, s in enumerate(m["shards"]):
            path = self.dir / s["file"]
            try:
                if verify and _file_sha256(path) != s["sha256"]:
                    raise CorruptEntry(f"checksum mismatch in {s['file']}")
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError):
                raise CorruptEntry(f"missing or unreadable shard {s['file']}") from None
            lo, hi = self.shard_range(i)
            if arr.shape != (hi - lo, dim) or str(arr.dtype) != s.get("dtype", "float16"):
                raise CorruptEntry(f"shard {s['file']} holds {arr.dtype} {arr.shape}, the manifest says "
                                   f"{s.get('dtype')} {(hi - lo, dim)}")
            del arr  # release the mapping
        files = [self.dir / s["file"] for s in m["shards"]]
        return FeatureStore(self, files, dim, np.dtype(m.get("dtype", "float16")),
                            memory_budget or default_memory_budget())

    def load(self, verify: bool = True) -> np.ndarray:
        """All rows as one array, float16 unless a shard needed float32 (filled in place: no second copy)."""
        m = self.checked_manifest()
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


# ---------------------------------------------------------------------------- bounded-memory reading


def shuffle_windows(shard_ranges: Sequence[tuple[int, int]], buffer_rows: int, seed: int,
                    epoch: int) -> list[tuple[list[int], np.ndarray]]:
    """One epoch's order over a sharded matrix: a list of windows ``(shards, row indices in visiting order)``,
    read one window at a time.

    1. The shards are visited in the order ``default_rng([seed, epoch, 1]).permutation(num_shards)``.
    2. Consecutive shards of that order form a window while it holds at most ``buffer_rows`` rows (a window
       holds at least one shard: the buffer is never smaller than a shard).
    3. Each window's rows, in ascending order, are permuted with ``default_rng([seed, epoch]).permutation``,
       one generator drawn window after window.

    Every row comes exactly once per epoch. A buffer of every row makes one window whose order is
    ``default_rng([seed, epoch]).permutation(rows)``, the in-memory epoch order of the linear probe
    (``tasks.linear.probe.epoch_order``), so streaming with such a buffer trains exactly as in memory.
    """
    if int(buffer_rows) < 1:
        raise UserError(f"the shuffle buffer must hold at least one row, got {buffer_rows}")
    visit = np.random.default_rng([int(seed), int(epoch), 1]).permutation(len(shard_ranges))
    rng = np.random.default_rng([int(seed), int(epoch)])
    windows: list[tuple[list[int], np.ndarray]] = []
    current: list[int] = []
    size = 0

    def close() -> None:
        shards = sorted(current, key=lambda i: shard_ranges[i][0])
        rows = np.concatenate([np.arange(*shard_ranges[i], dtype=np.int64) for i in shards])
        windows.append((shards, rows[rng.permutation(len(rows))]))

    for i in visit.tolist():
        n = shard_ranges[i][1] - shard_ranges[i][0]
        if current and size + n > buffer_rows:
            close()
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        close()
    return windows


def stream_memory(dim: int | Sequence[int], itemsize: int | Sequence[int], buffer_rows: int, shard_rows: int,
                  batch_size: int, world: int = 1) -> dict[str, int]:
    """Bytes a streamed epoch (:func:`lockstep_batches`, :meth:`FeatureStore.shuffled_batches`) holds at its peak, by
    part, and ``total``: the shuffle buffer, one shard mapped while it is copied into the buffer, and two batches (the
    one being gathered and its float32 copy for training). ``dim`` / ``itemsize`` may list several stores read in
    lockstep (every store's rows held at once; one shard mapped at a time); with ``world`` ranks each holds its
    share of the buffer and of a batch."""
    dims = [int(dim)] if isinstance(dim, int | np.integer) else [int(d) for d in dim]
    sizes = [int(itemsize)] * len(dims) if isinstance(itemsize, int | np.integer) else [int(i) for i in itemsize]
    row = sum(d * i for d, i in zip(dims, sizes, strict=True))
    share = -(-max(buffer_rows, shard_rows) // int(world))  # this rank's rows of a window
    parts = {"shuffle_buffer": share * row, "mapped_shard": shard_rows * max(d * i for d, i in zip(dims, sizes)),
             "batches": 2 * -(-batch_size // int(world)) * sum(d * (i + 4) for d, i in zip(dims, sizes))}
    return {**parts, "total": sum(parts.values())}


def default_buffer_rows(stores: Sequence[FeatureStore], batch_size: int) -> int:
    """The shuffle buffer a streamed epoch over ``stores`` (read in lockstep) uses unless told otherwise: the rows half
    the smallest budget holds after the mapped shard and the batches (the other half is left to the caller: models,
    other features), at least one shard. It does not depend on the number of ranks, so every world size reads
    the same order."""
    fixed = stream_memory([s.dim for s in stores], [s.itemsize for s in stores], 0, stores[0].shard_rows, batch_size)
    budget = min(s.memory_budget for s in stores)
    rows = (budget // 2 - fixed["mapped_shard"] - fixed["batches"]) // sum(s.row_bytes for s in stores)
    return max(stores[0].shard_rows, rows)  # a window holds at least one shard


def lockstep_batches(stores: Sequence[FeatureStore], batch_size: int, seed: int, epoch: int,
                     buffer_rows: int | None = None, rank: int = 0,
                     world: int = 1) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """One epoch of ``(row indices, [rows of each store])`` batches over stores of the same rows and shards (one
    tap each), all read in the same :func:`shuffle_windows` order: one pass serves every store's reader.

    Batches are ``min(batch_size, rows)`` rows of the epoch order, the incomplete last one dropped (``max(1, rows //
    batch_size)`` batches, as the linear probe's in-memory epochs). With ``world`` > 1 this ``rank`` gets the
    positions ``rank, rank + world, ...`` of every batch (``batch[rank::world]``, a DistributedSampler-like split
    of each batch) and reads only those rows of each window: the ranks together read every row once. Holds one
    window per store (``buffer_rows`` rows, default :func:`default_buffer_rows`; a rank its share) plus one pending
    batch; a batch may span two windows."""
    first = stores[0]
    ranges = first.shard_ranges()
    if any(s.shard_ranges() != ranges for s in stores[1:]):
        raise ValueError("stores read in lockstep must hold the same rows in the same shards")
    if not 0 <= int(rank) < int(world):
        raise ValueError(f"rank {rank} outside a world of {world}")
    n = len(first)
    bs = min(int(batch_size), n)
    end = max(1, n // int(batch_size)) * bs  # epoch positions past it are the dropped last batch
    buffer_rows = int(buffer_rows or default_buffer_rows(stores, batch_size))
    bufs = None
    if world == 1:  # whole shards are copied in; reused window after window
        rows_max = min(n, max(buffer_rows, first.shard_rows))
        bufs = [np.empty((rows_max, s.dim), dtype=s.dtype) for s in stores]
    pending_ids: list[np.ndarray] = []
    pending_x: list[list[np.ndarray]] = [[] for _ in stores]
    offset = 0  # epoch position of the window's first row
    for shards, ids in shuffle_windows(ranges, buffer_rows, seed, epoch):
        if offset >= end:
            return
        pos = offset + np.arange(len(ids), dtype=np.int64)
        keep = pos < end
        if world > 1:
            keep &= (pos % bs) % world == rank
        mine, mine_pos = ids[keep], pos[keep]
        offset += len(ids)
        if world == 1:  # the window's shards, ascending, one after the other in the buffers
            rows = np.concatenate([np.arange(*ranges[i], dtype=np.int64) for i in shards])
            held, filled = bufs, 0
            for i in shards:
                a, b = ranges[i]
                for s, buf in zip(stores, bufs):
                    s.read(a, b, out=buf[filled:filled + b - a])
                filled += b - a
        else:  # only this rank's rows of the window, gathered shard by shard
            rows = np.sort(mine)
            held = [s.take(rows) for s in stores]
        at = np.searchsorted(rows, mine)  # buffer position of each of this rank's rows, in visiting order
        batch_of = mine_pos // bs  # ascending: each batch's rows are one run
        starts = np.flatnonzero(np.r_[True, batch_of[1:] != batch_of[:-1]]) if len(mine) else np.zeros(0, np.int64)
        for lo, hi in zip(starts.tolist(), [*starts[1:].tolist(), len(mine)]):
            b, sel = int(batch_of[lo]), slice(lo, hi)
            pending_ids.append(mine[sel])
            for j, h in enumerate(held):
                pending_x[j].append(h[at[sel]])  # a copy: the buffer is overwritten by the next window
            if (b + 1) * bs <= offset:  # the batch's last position is in this window: complete
                ids_b = pending_ids[0] if len(pending_ids) == 1 else np.concatenate(pending_ids)
                xs = [p[0] if len(p) == 1 else np.concatenate(p) for p in pending_x]
                yield ids_b, xs
                pending_ids, pending_x = [], [[] for _ in stores]
        del held


class FeatureStore:
    """A complete cache entry's (rows, dim) matrix, read from its memory-mapped shards without loading it.

    Array-like where the tasks need it: ``shape``, ``dtype``, ``nbytes``, ``len()``, ``store[lo:hi]`` (a copy of
    those rows) and ``store[idx]`` (rows gathered shard by shard). A shard is mapped only while rows are copied
    out of it, so the process holds the copies and at most one shard's pages; the page cache keeps re-read
    shards fast without counting against the process. ``memory_budget`` is the budget its readers keep to.
    """

    ndim = 2

    def __init__(self, entry: CacheEntry, files: Sequence[Path], dim: int, dtype: np.dtype, memory_budget: int):
        self.entry, self.files, self.dim = entry, list(files), int(dim)
        self.dtype = np.dtype(dtype)
        self.memory_budget = int(memory_budget)

    def __repr__(self) -> str:
        return f"FeatureStore({self.entry.dir}, shape={self.shape}, dtype={self.dtype})"

    def __len__(self) -> int:
        return self.entry.rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.entry.rows, self.dim)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return self.dim * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.entry.rows * self.row_bytes

    @property
    def shard_rows(self) -> int:
        """Rows of the largest shard (the entry's shard size, or every row of a one-shard entry)."""
        return min(self.entry.shard_rows, self.entry.rows)

    def shard_ranges(self) -> list[tuple[int, int]]:
        return [self.entry.shard_range(i) for i in range(len(self.files))]

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` memory-mapped (read-only); drop the reference when done to release the mapping."""
        return np.load(self.files[i], mmap_mode="r", allow_pickle=False)

    # ------------------------------------------------------------ reading

    def read(self, lo: int, hi: int, dtype: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[lo, hi)`` copied into ``out`` (or a new array of ``dtype``, default the stored one)."""
        lo, hi = max(0, int(lo)), min(len(self), int(hi))
        if out is None:
            out = np.empty((max(0, hi - lo), self.dim), dtype=dtype or self.dtype)
        sr = self.entry.shard_rows
        for i in range(lo // sr, -(-hi // sr)):
            a, b = self.entry.shard_range(i)
            s, e = max(lo, a), min(hi, b)
            m = self.shard(i)
            out[s - lo:e - lo] = m[s - a:e - a]
            del m  # unmapped before the next shard
        return out

    def take(self, idx: Any) -> np.ndarray:
        """Rows ``idx`` (any order, repeats allowed), read shard by shard."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        idx = np.where(idx < 0, idx + len(self), idx)
        out = np.empty((len(idx), self.dim), dtype=self.dtype)
        sr = self.entry.shard_rows
        shard_of = idx // sr
        for i in np.unique(shard_of).tolist():
            sel = np.flatnonzero(shard_of == i)
            m = self.shard(i)
            out[sel] = m[idx[sel] - i * sr]
            del m
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self.read(start, stop) if step == 1 else self.take(np.arange(start, stop, step))
        if isinstance(key, int | np.integer):
            return self.take([key])[0]
        return self.take(key)

    def blocks(self, block_rows: int, dtype: Any = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows)`` for consecutive blocks of ``block_rows`` rows, in order."""
        for lo in range(0, len(self), int(block_rows)):
            yield lo, self.read(lo, lo + int(block_rows), dtype)

    def load(self, dtype: Any = None) -> np.ndarray:
        """Every row in one array (what ``CacheEntry.load`` returns, read through the mappings)."""
        return self.read(0, len(self), dtype)

    # ------------------------------------------------------------ the memory budget

    def fits(self, nbytes: int | None = None) -> bool:
        """Whether ``nbytes`` (default: the whole matrix as stored) fits the memory budget."""
        return (self.nbytes if nbytes is None else int(nbytes)) <= self.memory_budget

    def resident(self) -> np.ndarray | FeatureStore:
        """The matrix loaded when it fits the memory budget, else this store (to be read in blocks)."""
        return self.load() if self.fits() else self

    def default_buffer_rows(self, batch_size: int) -> int:
        """The shuffle buffer a streamed epoch uses unless told otherwise (:func:`default_buffer_rows`)."""
        return default_buffer_rows([self], batch_size)

    def shuffled_batches(self, batch_size: int, seed: int, epoch: int,
                         buffer_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch of ``(row indices, rows)`` batches in the :func:`shuffle_windows` order, ``min(batch_size,
        rows)`` rows each, the incomplete last batch dropped (:func:`lockstep_batches` over this store alone)."""
        for ids, (rows,) in lockstep_batches([self], batch_size, seed, epoch, buffer_rows):
            yield ids, rows


class FeatureCache:
    def __init__(self, root: str | Path | None = None, shard_rows: int = DEFAULT_SHARD_ROWS,
                 memory_budget: int | str | None = None):
        self.root = Path(root) if root is not None else default_cache_root()
        self.shard_rows = shard_rows
        # what the stores it opens tell their readers to stay within (None: $EVALSUITE_MEMORY_BUDGET or 4 GiB)
        self.memory_budget = parse_size(memory_budget) if memory_budget is not None else default_memory_budget()

    def entry(self, fields: Mapping[str, Any], rows: int) -> CacheEntry:
        fields = json.loads(json.dumps(dict(fields), sort_keys=True, default=str))
        key = cache_key({**fields, "rows": rows, "shard_rows": self.shard_rows})
        return CacheEntry(self.root, key, fields, rows, self.shard_rows)
