"""``evalsuite watch DIR``: evaluate every new checkpoint a training run writes into a folder, once.

Each poll lists the folder's checkpoint files (the suffixes of :data:`evalsuite.checkpoints.NAME_SUFFIXES`; hidden
files and :func:`evalsuite.io.atomic_write` leftovers are passed over). A file is evaluated when its size and
modification time are the same as at the previous poll, through :func:`evalsuite.runner.run` exactly as
``evalsuite run --checkpoint FILE --tasks ... --protocol ...`` does (records appended to ``OUT/results.jsonl``).
A file that does not load yet (a trainer still writing it, or a copy in progress) is not a failure: it is noted once
and tried again when its size or time changes. Afterwards the page of metric-vs-step curves is rewritten
(``evalsuite leaderboard curves``, called as a sub-command: the core never imports the leaderboard plug-in).

The state file ``OUT/watch_state.json`` (written atomically after every checkpoint) keys each evaluated file by
name, size and modification time and keeps its content's sha256, so nothing is evaluated twice across restarts: a
file rewritten in place (``last.ckpt``) is new content and is evaluated again, a copy or rename of an evaluated file
is not. A state written with other tasks, preset or overrides is refused, naming them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .console import note, warn
from .errors import BadCheckpoint, BadFeatures, UserError
from .io import atomic_write_json, is_temporary, settings_diff
from .protocols import check_preset
from .results import RESULTS_FILE, now_iso, training_step

if TYPE_CHECKING:
    from .runner import RunOptions

# .checkpoints and .runner (torch) are imported where a checkpoint is handled: the CLI imports this module to build
# its parser, and `evalsuite --help` should not load torch

STATE_FILE = "watch_state.json"
PAGE_FILE = "curves.html"
STATE_FORMAT = 1
DEFAULT_TASKS = "knn,spectrum"
DEFAULT_METRICS = "headline,alpha_req,uniformity,alignment"


@dataclass
class WatchOptions:
    directory: Path
    out: Path | None = None  # None: DIRECTORY/evalsuite_watch
    tasks: str = DEFAULT_TASKS
    layers: Sequence[str] | None = None  # --layers: restrict every task's taps
    preset: str = "quick"
    overrides: Sequence[str] = ()
    data_root: Path = Path("data")
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 64
    workers: int = 0
    cache_dir: Path | None = None  # None: OUT/cache
    precision: str | None = None
    arch: str | None = None
    allow_partial: bool = False
    trust_pickle: bool = False
    weights: str | None = None
    interval: float = 60.0  # seconds between polls
    settle: float = 2.0  # --once: seconds between its two polls
    metrics: str = DEFAULT_METRICS  # plotted on the page
    progress: bool = True

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.directory) / "evalsuite_watch"

    def settings(self) -> dict[str, Any]:
        """What must match for a state file to be reused (the records' protocol)."""
        return {"tasks": self.tasks, "layers": list(self.layers or []), "preset": self.preset,
                "overrides": list(self.overrides), "seed": self.seed, "arch": self.arch, "weights": self.weights}


@dataclass(frozen=True)
class Signature:
    """A file as one poll sees it."""

    name: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        return f"{self.name}|{self.size}|{self.mtime_ns}"

    @classmethod
    def of(cls, path: Path) -> Signature:
        st = path.stat()
        return cls(path.name, st.st_size, st.st_mtime_ns)


def is_checkpoint_file(path: Path) -> bool:
    """A file a trainer may drop: a checkpoint suffix, not hidden (nor an atomic write's temporary file)."""
    from .checkpoints import NAME_SUFFIXES

    return (path.is_file() and not path.name.startswith(".") and not is_temporary(path)
            and path.suffix.lower() in NAME_SUFFIXES)


class Watcher:
    """One watched folder. ``command`` runs an ``evalsuite`` sub-command (``evalsuite.cli.main``) to write the page;
    None writes no page."""

    def __init__(self, opts: WatchOptions, command: Callable[[list[str]], int] | None = None):
        self.opts, self.command = opts, command
        self.directory = Path(opts.directory)
        if not self.directory.is_dir():
            raise UserError("the folder to watch does not exist", self.directory)
        from .runner import resolve_tasks

        check_preset(opts.preset)
        resolve_tasks([opts.tasks])  # an unknown task name ends here, before any checkpoint appears
        self.out = opts.out_dir
        self.state_path = self.out / STATE_FILE
        self.state = self._load_state()
        self._previous: dict[str, Signature] = {}  # the last poll's view of each file
        self._not_loading: dict[str, Signature] = {}  # files that did not load, at the signature that failed
        self._page_failed = False

    # ------------------------------------------------------------------ state

    def _load_state(self) -> dict[str, Any]:
        fresh = {"format": STATE_FORMAT, "directory": str(self.directory.resolve()),
                 "settings": self.opts.settings(), "files": {}}
        if not self.state_path.is_file():
            return fresh
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(
                    state.get("files"), dict):
                raise ValueError("not a watch state of this version")
        except (OSError, ValueError) as e:
            raise UserError(f"unreadable watch state ({e}); move it away to start afresh", self.state_path) from None
        diff = settings_diff(state.get("settings", {}), self.opts.settings())
        if diff:
            raise UserError(f"this watch state was written with other settings: {diff}; use another --out, or delete "
                            "the state to evaluate every checkpoint again", self.state_path)
        return state

    def _save_state(self) -> None:
        atomic_write_json(self.state_path, self.state, indent=1, sort_keys=True)

    @property
    def evaluated(self) -> dict[str, dict[str, Any]]:
        """Signature key -> what happened to that file (``status``: done, failed or duplicate)."""
        return self.state["files"]

    def _sha_seen(self, sha: str) -> str | None:
        return next((e["name"] for e in self.evaluated.values() if e.get("sha256") == sha
                     and e["status"] == "done"), None)

    # ------------------------------------------------------------------ polling

    def poll(self) -> list[Path]:
        """One look at the folder: the checkpoint files not yet evaluated whose size and time are the same as at the
        previous look (and that did not fail to load at exactly this size and time)."""
        ready, now = [], {}
        for path in sorted(self.directory.iterdir(), key=lambda p: p.name):
            try:
                if not is_checkpoint_file(path):
                    continue
                sig = Signature.of(path)
            except FileNotFoundError:  # removed between the listing and the stat
                continue
            now[sig.name] = sig
            if sig.key in self.evaluated or self._not_loading.get(sig.name) == sig:
                continue
            if self._previous.get(sig.name) == sig:
                ready.append(path)
        self._previous = now
        return sorted(ready, key=lambda p: (now[p.name].mtime_ns, p.name))

    def process(self, ready: Sequence[Path]) -> int:
        """Evaluate the ready files (oldest first); rewrite the page when any was. Returns how many were evaluated."""
        done = sum(self.evaluate(path) for path in ready)
        if done:
            self.write_page()
        return done

    def run_once(self) -> int:
        """Process what is in the folder now: two polls ``settle`` seconds apart, then exit."""
        self.poll()
        time.sleep(self.opts.settle)
        return self.process(self.poll())

    def run_forever(self, sleep: Callable[[float], None] = time.sleep) -> None:
        note(f"watching {self.directory} every {self.opts.interval:g}s (results in {self.out / RESULTS_FILE}, "
             f"curves in {self.out / PAGE_FILE}); Ctrl-C stops")
        while True:
            self.process(self.poll())
            sleep(self.opts.interval)

    # ------------------------------------------------------------------ one checkpoint

    def evaluate(self, path: Path) -> bool:
        """Run the tasks on one stable file; True when it is done with (records appended, or failed for good)."""
        from .checkpoints import file_sha256
        from .runner import run

        sig = Signature.of(path)
        sha = file_sha256(path)
        if Signature.of(path) != sig:  # changed while hashing: still being written
            return False
        entry: dict[str, Any] = {"name": sig.name, "size": sig.size, "mtime_ns": sig.mtime_ns, "sha256": sha}
        same = self._sha_seen(sha)
        if same is not None:
            note(f"{sig.name} has the content of {same}, already evaluated: skipped")
            self._record(sig, {**entry, "status": "duplicate", "duplicate_of": same})
            return False
        note(f"evaluating {sig.name} ({self.opts.tasks}, {self.opts.preset})")
        try:
            report = run(self._run_options(path))
        except BadCheckpoint as e:
            # a file still being written (or not a checkpoint at all): not a failure, tried again when it changes
            self._not_loading[sig.name] = sig
            note(f"{sig.name} does not load ({e.message}); trying again when it changes")
            return False
        except BadFeatures as e:  # this checkpoint's weights are broken (a diverged run): recorded, the watch goes on
            warn(f"{sig.name} failed: {e}")
            self._record(sig, {**entry, "status": "failed", "error": str(e)})
            return True
        ck = report.checkpoint
        step, source = training_step(ck.metadata, path)
        self._record(sig, {**entry, "status": "done", "checkpoint_id": ck.sha256, "step": step,
                           "step_source": source, "records": len(report.results),
                           "skipped_tasks": [name for name, _ in report.skipped]})
        shown = "no training step found" if step is None else f"step {step}"
        note(f"{sig.name} ({shown}): {len(report.results)} records appended to {report.results_file}")
        return True

    def _record(self, sig: Signature, entry: dict[str, Any]) -> None:
        self.evaluated[sig.key] = {**entry, "at": now_iso()}
        self._save_state()

    def _run_options(self, path: Path) -> RunOptions:
        from .runner import RunOptions

        o = self.opts
        return RunOptions(
            checkpoint=str(path), arch=o.arch, tasks=[o.tasks], layers=list(o.layers) if o.layers else None,
            preset=o.preset, overrides=list(o.overrides),
            data_root=Path(o.data_root), out=self.out, device=o.device, seed=o.seed, batch_size=o.batch_size,
            workers=o.workers, cache_dir=Path(o.cache_dir) if o.cache_dir else self.out / "cache",
            precision=o.precision, allow_partial=o.allow_partial, trust_pickle=o.trust_pickle, weights=o.weights,
            progress=o.progress)

    # ------------------------------------------------------------------ the page

    def write_page(self) -> None:
        """``evalsuite leaderboard curves`` on the results file; a missing leaderboard plug-in is said once."""
        results = self.out / RESULTS_FILE
        if self.command is None or not results.is_file():
            return
        argv = ["leaderboard", "curves", "--results", str(results), "--out", str(self.out / PAGE_FILE),
                "--metrics", self.opts.metrics, "--title", f"evalsuite watch: {self.directory.resolve().name}",
                "--refresh", str(max(10, int(self.opts.interval)))]
        rc = self.command(argv)
        if rc != 0 and not self._page_failed:
            warn(f"the curves page was not written (evalsuite {' '.join(argv[:2])} exited {rc}); evaluation goes on")
        self._page_failed = rc != 0
