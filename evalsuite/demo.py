"""``evalsuite demo``: synthetic data -> pretraining -> every task per checkpoint -> leaderboard, as one plan.

The checkpoints: a random and seven briefly pretrained ResNet-18s, and one ViT-Tiny pretrained briefly with MAE
(evaluated on every task with a ViT head).

The plan is a list of steps, each an ``evalsuite`` command line, so every step is also
something a user can run by hand (the plan is printed first). The whole plan shows one
progress bar with an ETA (from per-step cost estimates, corrected by the measured pace),
steps already done are skipped (re-running resumes), and a failing step does not hide
the others: the summary lists it and the exit code is 1.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .io import atomic_write_json
from .results import RESULTS_FILE, iter_records

DEMO_METHODS = ("random", "supervised", "rotnet", "jigsaw", "simclr", "moco_v2", "byol", "swav", "mae")
DEMO_ARCH = "resnet18"
# Methods pretrained on the demo's ViT instead of DEMO_ARCH, with their extra pretraining arguments: MAE trains
# ViTs only; its short recipe (a 2-block decoder) keeps one epoch of ViT-Tiny at 64 px to ~25 s on 2 cores.
DEMO_VIT_ARCH = "vit_tiny_patch16"
VIT_METHODS = {"mae": ("--recipe", "short")}
# Demo-only settings on top of the quick preset (printed with the plan, recorded in every result):
# sliding-window proposals instead of selective search, 50 training iterations and 40 test images keep detection
# to ~18 s per checkpoint on 2 cores (quick: ~45 s), and 1024 PPO frames with 8 evaluation episodes keep navigation
# to ~18 s (quick: ~33 s); the transfer tasks run on the stand-ins `data synth --kind all` writes (linear_transfer
# on CIFAR-10 and DTD, fewshot on EuroSAT: ~5 s and ~1 s), so that the whole plan fits in 10 minutes
DEMO_OVERRIDES = ("detection.proposals=sliding_window", "detection.max_iter=50", "detection.steps=[40]",
                  "detection.max_test_images=40", "navigation.frames=1024", "navigation.eval_episodes=8",
                  "linear_transfer.datasets=cifar10,dtd", "fewshot.datasets=eurosat")
DATA_MARKER = ".evalsuite-demo-data.json"  # written once the synthetic data is complete


@dataclass
class Step:
    label: str
    argv: list[str]
    cost: float  # expected seconds on a 2-core CPU (for the ETA)
    done: Callable[[], bool] = lambda: False
    on_done: Callable[[], None] | None = None  # called after the step succeeded (e.g. write a marker)


@dataclass
class Outcome:
    step: Step
    status: str  # "done", "skipped" (already done), "failed"
    seconds: float = 0.0
    error: str = ""


@dataclass
class DemoConfig:
    data_root: Path = Path("data/demo")
    out: Path = Path("runs/demo")
    methods: Sequence[str] = DEMO_METHODS
    arch: str = DEMO_ARCH
    tasks: Sequence[str] = ("all",)
    preset: str = "quick"
    epochs: int = 1
    seed: int = 0
    data_scale: float = 1.0
    overrides: Sequence[str] = ()
    pretrain_batch_size: int = 32
    extra_pretrain_args: Sequence[str] = field(default_factory=list)
    vit_arch: str = DEMO_VIT_ARCH
    vit_methods: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(VIT_METHODS))


def arch_of(cfg: DemoConfig, method: str) -> str:
    return cfg.vit_arch if method in cfg.vit_methods else cfg.arch


def checkpoint_spec(cfg: DemoConfig, method: str) -> str:
    if method == "random":
        return f"random:{cfg.arch}"
    return str(cfg.out / "checkpoints" / f"{method}_{arch_of(cfg, method)}.safetensors")


def finished_pairs(results_dir: Path, preset: str) -> set[tuple[str, str]]:
    """(checkpoint spec, task) pairs that already have records under this preset."""
    path = results_dir / RESULTS_FILE
    if not path.exists():
        return set()
    return {(r.get("checkpoint"), r.get("task")) for r in iter_records(path) if r.get("protocol") == preset}


def build_plan(cfg: DemoConfig, task_names: Sequence[str]) -> list[Step]:
    marker = cfg.data_root / DATA_MARKER
    steps = [Step("generate synthetic data",
                  ["data", "synth", "--kind", "all", "--out", str(cfg.data_root), "--seed", str(cfg.seed),
                   "--size", str(cfg.data_scale)],
                  cost=30 * cfg.data_scale, done=marker.exists,
                  on_done=lambda: atomic_write_json(marker, {"seed": cfg.seed, "scale": cfg.data_scale}))]
    for m in cfg.methods:
        if m == "random":
            continue
        ck = Path(checkpoint_spec(cfg, m))
        vit = m in cfg.vit_methods
        steps.append(Step(f"pretrain {m}" + (f" on {cfg.vit_arch}" if vit else ""),
                          ["pretrain", "--method", m, "--arch", arch_of(cfg, m), "--data-root",
                           str(cfg.data_root), "--epochs", str(cfg.epochs), "--seed",
                           str(cfg.seed), "--batch-size", str(cfg.pretrain_batch_size),
                           "--out", str(ck), "--no-progress", *cfg.vit_methods.get(m, ()),
                           *cfg.extra_pretrain_args],
                          cost=25 * cfg.epochs, done=ck.exists))
    from . import registry

    known = [*registry.task_names(), *task_names]  # a demo of some tasks drops the others' --set items
    for m in cfg.methods:
        spec = checkpoint_spec(cfg, m)
        for t in task_names:
            items = overrides_for(t, [*DEMO_OVERRIDES, *cfg.overrides], known)
            if t == "navigation" and m != cfg.methods[0]:
                items.append("navigation.baselines=[]")  # random/blind baselines do not depend on the trunk
            sets = [x for o in items for x in ("--set", o)]
            steps.append(Step(
                f"evaluate {m} on {t}",
                ["run", "--checkpoint", spec, "--tasks", t, "--protocol", cfg.preset, "--data-root",
                 str(cfg.data_root), "--out", str(cfg.out), "--cache-dir", str(cfg.out / "cache"),
                 "--seed", str(cfg.seed), "--no-progress", *sets],
                cost=TASK_COST.get(t, 10.0),
                done=lambda spec=spec, t=t: (spec, t) in finished_pairs(cfg.out, cfg.preset)))
    steps.append(Step("build leaderboard", ["leaderboard", "build", "--results", str(cfg.out), "--out",
                                            str(cfg.out / "site")], cost=10.0))
    return steps


def overrides_for(task: str, overrides: Sequence[str], task_names: Sequence[str]) -> list[str]:
    """The ``--set`` items that concern one task: unscoped ones and ``task.key=value`` for this task (items scoped
    to another of ``task_names`` are left out)."""
    others = set(task_names) - {task}
    return [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] not in others]


# Rough seconds per quick-preset evaluation of a ResNet-18 on the default data (2 CPU cores).
TASK_COST = {"centroid": 3.0, "knn": 4.0, "places205_linear": 8.0, "voc07_svm": 8.0, "lowshot_svm": 8.0,
             "detection": 18.0, "surface_normals": 6.0, "navigation": 18.0, "semi_supervised": 8.0,
             "imagenet_linear": 6.0, "spectrum": 3.0, "linear_transfer": 5.0, "fewshot": 2.0}


def run_plan(steps: Sequence[Step], run_argv: Callable[[list[str]], int], *, progress: bool = True,
             echo: Callable[[str], None] = print) -> list[Outcome]:
    """Run the steps in order with one progress bar over the whole plan; return what happened to each."""
    from .console import progress as progress_bar

    outcomes: list[Outcome] = []
    with progress_bar(total=sum(s.cost for s in steps), desc="plan", enabled=progress, unit="s", leave=True) as bar:
        for i, step in enumerate(steps, 1):
            bar.set_description(f"[{i}/{len(steps)}] {step.label}")
            if step.done():
                outcomes.append(Outcome(step, "skipped"))
                bar.update(step.cost)
                continue
            t0 = time.perf_counter()
            try:
                rc = run_argv(step.argv)
                error = "" if rc == 0 else f"exit code {rc}"
            except UserError as e:
                error = str(e)
            except Exception as e:  # keep going: one broken step must not hide the rest of the plan
                error = f"{type(e).__name__}: {e}"
            secs = time.perf_counter() - t0
            if not error and step.on_done is not None:
                step.on_done()
            outcomes.append(Outcome(step, "failed" if error else "done", secs, error))
            if not progress:
                echo(f"[{i}/{len(steps)}] {step.label}: {'FAILED ' + error if error else 'done'} ({secs:.1f}s)")
            bar.update(step.cost)
    return outcomes


def logged_step(log_dir: Path, run_argv: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """Wrap ``run_argv`` so each step's output goes to its own log file, keeping the terminal for the plan.

    A failing step raises a UserError carrying the step's own error line (so the summary can show it).
    """
    counter = {"n": 0}

    def run(argv: list[str]) -> int:
        counter["n"] += 1
        log_dir.mkdir(parents=True, exist_ok=True)
        keys = ("--method", "--checkpoint", "--tasks")
        named = [Path(argv[i + 1]).stem for i, x in enumerate(argv[:-1]) if x in keys]
        words = named or [x for x in argv[1:4] if not x.startswith("-")]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(argv[:1] + words))
        log = log_dir / f"{counter['n']:03d}-{name}.log"
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            f.write(f"$ evalsuite {shlex.join(argv)}\n")
            rc = run_argv(argv)
        if rc != 0:
            errors = [x for x in log.read_text().splitlines() if "error" in x.lower()]
            raise UserError(f"{errors[-1] if errors else f'exit code {rc}'} (log: {log})")
        return rc

    return run


def summary_table(results_dir: Path, preset: str):
    """Checkpoint x task table of each task's headline number (best layer), as a pandas DataFrame."""
    import pandas as pd

    rows = []
    path = results_dir / RESULTS_FILE
    if path.exists():
        for r in iter_records(path):
            if r.get("protocol") != preset or r.get("value") is None:
                continue
            metric = headline_metric(r["task"])
            if metric and r["metric"] != metric:
                continue
            if (r.get("params") or {}).get("agent") in BASELINE_AGENTS:
                continue  # navigation's random/blind baselines are not the checkpoint's score
            rows.append({"checkpoint": r.get("method") or r.get("checkpoint"), "task": r["task"],
                         "value": float(r["value"]), "metric": r["metric"], "lower": r["metric"] in LOWER_IS_BETTER})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    best = df.groupby(["checkpoint", "task"]).apply(
        lambda g: g["value"].min() if g["lower"].iloc[0] else g["value"].max(), include_groups=False)
    return best.unstack("task")


# The number shown per task in the terminal summary (best over layers).
def headline_metric(task: str) -> str | None:
    """The first of the task's ``headline_metrics`` (the summary's number for it), None for an unknown task."""
    from . import registry
    from .errors import UserError

    try:
        return registry.get_task(task).headline_metrics[0]
    except UserError:  # a task no longer installed: every metric of its records is shown
        return None


LOWER_IS_BETTER = {"median_angle_error_deg", "mean_angle_error_deg", "rmse_angle_error_deg"}
BASELINE_AGENTS = {"random", "blind"}


def format_plan(steps: Sequence[Step]) -> str:
    return "\n".join(f"  {i:2d}. {s.label:40s} evalsuite {shlex.join(s.argv)}" for i, s in enumerate(steps, 1))


def write_outcomes(path: Path, outcomes: Sequence[Outcome]) -> None:
    payload = [{"step": o.step.label, "status": o.status, "seconds": round(o.seconds, 2), "error": o.error,
                "command": ["evalsuite", *o.step.argv]} for o in outcomes]
    atomic_write_json(path, payload, indent=2)
