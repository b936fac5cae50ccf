"""Checkpoint formats: detect, convert to torchvision trunk names, report key matches.

Supported (``evalsuite list --formats``):

=============  ==============================================================
evalsuite      our own: safetensors of trunk weights + JSON metadata header
torchvision    a plain ``state_dict`` (``conv1.weight`` ... ``fc.*``), also timm's ResNets
vissl          ``classy_state_dict.base_model.model.trunk`` with ``_feature_blocks.``
moco           MoCo / PIRL style ``state_dict`` with ``module.encoder_q.``
lightning      solo-learn / PyTorch Lightning ``state_dict`` with ``backbone.``
dino           DINO-style ``teacher`` / ``student`` dicts (teacher is used)
byol           BYOL-style ``online_network.`` / ``online_encoder.`` prefixes
timm           timm checkpoints (``state_dict`` / ``model`` / ``state_dict_ema``)
random         ``random:<arch>``: seeded random init, no file
=============  ==============================================================

Pickled files are read with ``torch.load(weights_only=True)``; a pickle that
needs to run code is refused unless the user passes ``--trust-pickle``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BadCheckpoint, UserError, require_file
from .trunks import ARCHS, build_trunk, trunk_state_keys

FORMATS: dict[str, str] = {
    "evalsuite": "safetensors trunk weights + JSON metadata (written by `evalsuite pretrain`)",
    "torchvision": "plain state_dict with torchvision key names (also timm ResNets)",
    "vissl": "VISSL: classy_state_dict.base_model.model.trunk, _feature_blocks. prefix",
    "moco": "MoCo / PIRL: state_dict with module.encoder_q. prefix",
    "lightning": "solo-learn / PyTorch Lightning: state_dict with backbone. prefix",
    "dino": "DINO-style teacher/student dicts (teacher used)",
    "byol": "BYOL-style online_network. / online_encoder. prefix",
    "timm": "timm training checkpoint: state_dict / state_dict_ema / model",
    "random": "random:<arch> — seeded random initialisation, no file",
    "torchvision-hub": "torchvision:<arch> — torchvision weights already in the local torch hub cache",
}

META_KEY = "evalsuite"
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
# Preferred sub-dicts / prefixes when several candidates match equally well.
PREFERENCES = ("teacher", "encoder_q", "online", "backbone", "trunk", "model", "student", "encoder_k", "target")
# nn.Sequential(*list(resnet.children())[:-1]) numbering used by several BYOL/SimCLR codes.
RESNET_CHILD_INDEX = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


@dataclass
class KeyReport:
    source: str  # where in the file the trunk weights were found, e.g. "state_dict[module.encoder_q.]"
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"matched {len(self.matched)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}"
            + (f", shape mismatch {len(self.shape_mismatch)}" if self.shape_mismatch else "")
        )


@dataclass
class LoadedCheckpoint:
    spec: str
    path: Path | None
    sha256: str
    format: str
    arch: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    report: KeyReport
    seed: int | None = None

    @property
    def id(self) -> str:
        return self.sha256

    @property
    def method(self) -> str:
        return str(self.metadata.get("method", "unknown"))

    @property
    def pretrain_data(self) -> str:
        return str(self.metadata.get("pretrain_data", "unknown"))

    def build_trunk(self) -> nn.Module:
        trunk = build_trunk(self.arch, seed=self.seed if self.format == "random" else 0)
        if self.format != "random":
            trunk.load_state_dict(self.state_dict, strict=False)
        trunk.eval()
        return trunk

    def describe(self) -> dict[str, Any]:
        return {
            "checkpoint": self.spec,
            "checkpoint_id": self.sha256,
            "checkpoint_format": self.format,
            "arch": self.arch,
            "method": self.method,
            "pretrain_data": self.pretrain_data,
            "checkpoint_meta": self.metadata,
        }


# ---------------------------------------------------------------- public API


def load_checkpoint(
    spec: str | Path,
    arch: str | None = None,
    allow_partial: bool = False,
    trust_pickle: bool = False,
    seed: int = 0,
) -> LoadedCheckpoint:
    """Load any supported checkpoint and convert it to torchvision trunk names.

    Raises :class:`BadCheckpoint` (exit code 2 at the CLI) for anything the user
    can fix: missing/truncated file, unsafe pickle, wrong architecture, missing keys.
    """
    spec_s = str(spec)
    if spec_s.startswith("random:"):
        return _random_checkpoint(spec_s[len("random:") :] or arch or "resnet50", seed)
    if spec_s.startswith("torchvision:"):
        return _torchvision_hub(spec_s[len("torchvision:") :], allow_partial)
    path = require_file(spec_s, "checkpoint file")
    if path.stat().st_size == 0:
        raise BadCheckpoint("checkpoint file is empty", path)
    sha = file_sha256(path)
    obj, meta, fmt_hint = _read_file(path, trust_pickle)
    meta = dict(meta)
    arch = arch or meta.get("arch")
    candidates = list(_tensor_dicts(obj))
    if not candidates:
        raise BadCheckpoint("no tensors found: this is not a model checkpoint", path)
    if arch is None:
        arch = _infer_arch(candidates)
        if arch is None:
            raise BadCheckpoint("cannot infer the architecture from the keys; pass --arch", path)
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHS)}")
    expected = trunk_state_keys(arch)
    best = _best_mapping(candidates, expected)
    if best is None:
        guess = _infer_arch(candidates)
        hint = f" (the keys look like {guess})" if guess and guess != arch else ""
        raise BadCheckpoint(f"no {arch} trunk weights found in this file{hint}", path)
    source, mapped, unexpected = best
    report = _report(source, mapped, unexpected, expected, arch)
    if report.shape_mismatch:
        guess = _infer_arch(candidates)
        hint = f"; the keys look like {guess}" if guess and guess != arch else ""
        raise BadCheckpoint(
            f"wrong architecture: {len(report.shape_mismatch)} tensor shapes do not fit {arch} "
            f"(first: {report.shape_mismatch[0]}){hint}",
            path,
        )
    if report.missing and not allow_partial:
        raise BadCheckpoint(
            f"{len(report.missing)} {arch} trunk keys are missing (first: {report.missing[0]}); "
            "pass --allow-partial to evaluate with those left at random init",
            path,
        )
    bad = [k for k, v in mapped.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BadCheckpoint(f"NaN/Inf values in {len(bad)} trunk tensors (first: {sorted(bad)[0]})", path)
    fmt = fmt_hint or _format_name(source, obj)
    meta.setdefault("arch", arch)
    state = {k: v for k, v in mapped.items() if k in expected}
    return LoadedCheckpoint(spec_s, path, sha, fmt, arch, state, meta, report)


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write our format atomically: safetensors weights + JSON metadata (``method``, ``arch``, ... )."""
    from safetensors.torch import save_file

    for key in ("method", "arch"):
        if key not in metadata:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": META_KEY, META_KEY: json.dumps(dict(metadata), default=str)})
    os.replace(tmp, path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of one of our checkpoints, without loading the weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(META_KEY, "{}"))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- reading files


def _read_file(path: Path, trust_pickle: bool) -> tuple[Any, dict, str | None]:
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return _read_safetensors(path)
    return _read_pickle(path, trust_pickle), {}, None


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < 100_000_000 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[Any, dict, str | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        meta_raw = read_metadata_raw(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise BadCheckpoint(f"truncated or corrupt safetensors file ({_first_line(e)})", path) from None
    if meta_raw.get("format") == META_KEY:
        try:
            meta = json.loads(meta_raw.get(META_KEY, "{}"))
        except json.JSONDecodeError:
            raise BadCheckpoint("metadata header is not valid JSON", path) from None
        return tensors, meta, "evalsuite"
    return tensors, {}, "timm" if "timm" in json.dumps(meta_raw) else None


def read_metadata_raw(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _read_pickle(path: Path, trust_pickle: bool) -> Any:
    if not (zipfile.is_zipfile(path) or _legacy_pickle(path)):
        raise BadCheckpoint("not a PyTorch checkpoint (neither a zip archive nor a pickle) or truncated", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise BadCheckpoint(
                "the pickle contains code or objects that weights_only loading refuses "
                f"({_first_line(e)[:120]}); re-run with --trust-pickle only if you trust this file",
                path,
            ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise BadCheckpoint(f"truncated or corrupt checkpoint ({_first_line(e)[:120]})", path) from None
    warnings.warn(
        f"--trust-pickle: loading {path} with weights_only=False executes code inside the file", stacklevel=2
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # the file's own code may raise anything
        raise BadCheckpoint(f"cannot unpickle ({type(e).__name__}: {_first_line(e)[:120]})", path) from None


def _legacy_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------- key mapping


def _tensor_dicts(obj: Any, path: tuple[str, ...] = (), depth: int = 0):
    """Yield (path, dict) for every nested mapping that holds tensors."""
    if not isinstance(obj, Mapping) or depth > 5:
        return
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        yield path, tensors
    for k, v in obj.items():
        if isinstance(v, Mapping):
            yield from _tensor_dicts(v, path + (str(k),), depth + 1)


def _candidate_names(key: str) -> list[tuple[str, str]]:
    """All (prefix, trunk_name) splits of a key at '.' boundaries, with child-index renaming."""
    out = [("", key)]
    for m in re.finditer(r"\.", key):
        prefix, rest = key[: m.end()], key[m.end() :]
        out.append((prefix, rest))
    renamed = []
    for prefix, rest in out:
        head, _, tail = rest.partition(".")
        if head in RESNET_CHILD_INDEX and tail:
            renamed.append((prefix + "#seq#", f"{RESNET_CHILD_INDEX[head]}.{tail}"))
    return out + renamed


def _best_mapping(candidates, expected: set[str]):
    best = None
    best_score: tuple = ()
    for path, tensors in candidates:
        counts: Counter[str] = Counter()
        for key in tensors:
            for prefix, name in _candidate_names(key):
                if name in expected:
                    counts[prefix] += 1
        for prefix, n in counts.items():
            where = ".".join(path) + ("[" + prefix + "]" if prefix else "")
            score = (n, _preference(where), -len(prefix))
            if not best_score or score > best_score:
                best_score = score
                best = (path, prefix)
    if best is None:
        return None
    path, prefix = best
    tensors = dict(candidates)[path]
    seq = prefix.endswith("#seq#")
    raw_prefix = prefix[: -len("#seq#")] if seq else prefix
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in tensors.items():
        if not key.startswith(raw_prefix):
            continue
        name = key[len(raw_prefix) :]
        if seq:
            head, _, tail = name.partition(".")
            name = f"{RESNET_CHILD_INDEX[head]}.{tail}" if head in RESNET_CHILD_INDEX and tail else name
        if name in expected:
            mapped[name] = value
        else:
            unexpected.append(key)
    source = ".".join(path) or "<root>"
    if raw_prefix:
        source += f"[{raw_prefix}]"
    return source, mapped, unexpected


def _preference(where: str) -> int:
    for rank, word in enumerate(PREFERENCES):
        if word in where:
            return len(PREFERENCES) - rank
    return 0


def _report(source: str, mapped: dict, unexpected: list[str], expected: set[str], arch: str) -> KeyReport:
    reference = build_trunk(arch, seed=0).state_dict()
    missing = sorted(k for k in expected - mapped.keys() if not k.endswith(OPTIONAL_SUFFIXES))
    mismatch = [
        f"{k}: {tuple(v.shape)} vs {tuple(reference[k].shape)}"
        for k, v in sorted(mapped.items())
        if tuple(v.shape) != tuple(reference[k].shape)
    ]
    return KeyReport(source, sorted(mapped), missing, sorted(unexpected), mismatch)


def _infer_arch(candidates) -> str | None:
    """Guess the architecture from torchvision-like names anywhere in the file."""
    names: set[str] = set()
    for _, tensors in candidates:
        for key in tensors:
            for _, name in _candidate_names(key):
                names.add(name)
    if "features.0.weight" in names and "features.10.weight" in names:
        return "alexnet"
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"layer3\.(\d+)\.conv1\.weight$", n))}
    if not blocks:
        return None
    n3 = max(blocks) + 1
    bottleneck = "layer1.0.conv3.weight" in names
    if bottleneck:
        return {6: "resnet50", 23: "resnet101"}.get(n3)
    return {2: "resnet18", 6: "resnet34"}.get(n3)


def _format_name(source: str, obj: Any) -> str:
    if source.startswith("classy_state_dict") or "_feature_blocks." in source:
        return "vissl"
    if "encoder_q" in source:
        return "moco"
    if source.startswith(("teacher", "student")):
        return "dino"
    if "online" in source:
        return "byol"
    if "backbone." in source:
        return "lightning"
    if isinstance(obj, Mapping) and any(k in obj for k in ("state_dict_ema", "model")) or "timm" in source:
        return "timm"
    return "torchvision"


# ---------------------------------------------------------------- special specs


def _random_checkpoint(arch: str, seed: int) -> LoadedCheckpoint:
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r} in random:{arch}; supported: {', '.join(ARCHS)}")
    ident = hashlib.sha256(f"random:{arch}:seed={seed}".encode()).hexdigest()
    meta = {"method": "random", "arch": arch, "pretrain_data": "none", "init_seed": seed}
    report = KeyReport("random init")
    return LoadedCheckpoint(f"random:{arch}", None, ident, "random", arch, {}, meta, report, seed=seed)


def _torchvision_hub(arch: str, allow_partial: bool) -> LoadedCheckpoint:
    import torchvision

    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r} in torchvision:{arch}; supported: {', '.join(ARCHS)}")
    weights_enum = torchvision.models.get_model_weights(arch)
    weights = weights_enum.DEFAULT
    hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not hub.is_file():
        raise UserError(
            f"torchvision weights for {arch} are not in the local cache and nothing is downloaded at run "
            f"time; place {Path(weights.url).name} there or pass the file path",
            hub,
        )
    ckpt = load_checkpoint(hub, arch=arch, allow_partial=allow_partial)
    ckpt.spec = f"torchvision:{arch}"
    ckpt.format = "torchvision-hub"
    ckpt.metadata.update({"method": "supervised", "pretrain_data": "imagenet1k", "weights": str(weights)})
    return ckpt
