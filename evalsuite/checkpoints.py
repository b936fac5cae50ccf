"""Checkpoint formats: detect, convert to torchvision trunk names, report key matches.

Supported (``evalsuite list --formats``):

=============  ==============================================================
evalsuite      our own: safetensors of trunk weights + JSON metadata header
torchvision    a plain ``state_dict`` (``conv1.weight`` ... ``fc.*``), also timm's ResNets
vissl          ``classy_state_dict.base_model.model.trunk`` with ``_feature_blocks.`` (ResNets; RegNetYs in
               ClassyVision's layout, e.g. SEER's)
moco           MoCo / PIRL style ``state_dict`` with ``module.encoder_q.``
lightning      solo-learn / PyTorch Lightning ``state_dict`` with ``backbone.`` (older solo-learn: ``encoder.``)
dino           DINO-style ``teacher`` / ``student`` dicts (teacher is used)
byol           BYOL-style ``online_network.`` / ``online_encoder.`` prefixes
timm           timm checkpoints (``state_dict`` / ``model`` / ``state_dict_ema``), timm ViT safetensors
mae            MAE ViT: ``model`` with ``decoder_*`` / ``mask_token`` (ignored)
moco_v3        MoCo v3 ViT: ``state_dict`` with ``module.base_encoder.`` (head dropped)
dinov2         DINOv2 torch-hub ViT state dicts (``register_tokens``, ``ls1.gamma``, ``mask_token``)
ibot           iBOT ``teacher`` / ``student`` dicts like DINO's (teacher used; ``ibot_loss``, ``masked_embed``)
clip           OpenAI CLIP / open_clip image tower (``visual.class_embedding``, ``ln_pre``, ``transformer.resblocks``)
random         ``random:<arch>`` / ``timm:<name>``: seeded random init, no file
=============  ==============================================================

solo-learn's run arguments (the checkpoint's ``hyper_parameters``, else the ``args.json`` its Checkpointer writes
beside the ``.ckpt``) name the method, the backbone and the dataset; a ResNet trained on CIFAR-10/100 is the
``<resnet>_cifar`` arch, as solo-learn builds it for those datasets (:func:`_solo_learn_metadata`).

RegNets saved by VISSL (``vissl/models/trunks/regnet.py``: ClassyVision's RegNet as ``_feature_blocks.conv1`` and
``res2`` .. ``res5``) are renamed to torchvision's (:func:`classy_regnet_name`); ClassyVision's RegNetY and
torchvision's have the same modules, SE placement and widths except where noted in :data:`CLASSY_ONLY_REGNETS`,
which are refused in one line.

ViT checkpoints are converted to timm's key names (:func:`evalsuite.vit.to_timm_layout`) and their architecture
is read from the tensor shapes (:func:`evalsuite.vit.infer_arch`).

Which weights are evaluated never depends on the order of the file's keys: among the entries holding a trunk
(``state_dict`` and ``state_dict_ema``, ``teacher`` and ``student``, ...) the most complete wins, then the
preferred name (:data:`PREFERENCES`: EMA weights as timm's ``load_state_dict(use_ema=True)``, DINO's teacher),
then the name itself; ``--weights KEY`` picks another. The architecture the keys show (blocks per stage, block
type) must agree with ``--arch`` and with the metadata.

Pickled files are read with ``torch.load(weights_only=True)`` plus the harmless types of
:data:`SAFE_GLOBALS`; a pickle that needs anything else is refused, naming what, unless the user passes
``--trust-pickle``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import vit
from .console import warn
from .errors import BadCheckpoint, UserError, require_file
from .io import atomic_write
from .trunks import (
    ARCHS,
    arch_info,
    build_trunk,
    describe_layout,
    infer_arch,
    is_regnet_key,
    is_trunk_key,
    regnet_fits,
    regnet_layout,
    trunk_state_shapes,
)

FORMATS: dict[str, str] = {
    "evalsuite": "safetensors trunk weights + JSON metadata (written by `evalsuite pretrain`)",
    "torchvision": "plain state_dict with torchvision key names (also timm ResNets)",
    "vissl": "VISSL: classy_state_dict.base_model.model.trunk, _feature_blocks. prefix (ResNets; RegNetYs in "
             "ClassyVision's layout, e.g. SEER's, renamed to torchvision's)",
    "moco": "MoCo / PIRL: state_dict with module.encoder_q. prefix",
    "lightning": "solo-learn / PyTorch Lightning: state_dict with backbone. (older: encoder.) prefix; solo-learn's "
                 "hyper_parameters or args.json name method, backbone and dataset (CIFAR: <resnet>_cifar)",
    "dino": "DINO-style teacher/student dicts (teacher used)",
    "byol": "BYOL-style online_network. / online_encoder. prefix",
    "timm": "timm training checkpoint: state_dict / state_dict_ema / model (EMA used); timm ViT weights",
    "mae": "MAE ViT: model dict, decoder_* and mask_token ignored",
    "moco_v3": "MoCo v3 ViT: state_dict with module.base_encoder. prefix",
    "dinov2": "DINOv2 torch-hub ViT state dict: register_tokens, ls1.gamma LayerScale, mask_token ignored",
    "ibot": "iBOT teacher/student dicts like DINO's (teacher used; masked_embed ignored)",
    "clip": "OpenAI CLIP / open_clip image tower under visual. (text tower and proj ignored); QuickGELU unless "
            "--arch vit_*_clip",
    "random": "random:<arch> or timm:<name> (a timm ViT) — seeded random initialisation, no file",
    "torchvision-hub": "torchvision:<arch> — torchvision weights already in the local torch hub cache",
}

META_KEY = "evalsuite"
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
# Preferred entries / prefixes when several hold equally complete trunks, best first: EMA weights (timm's
# state_dict_ema / model_ema), DINO's teacher, MoCo's query encoder (v3: base encoder), BYOL's online network, ...
PREFERENCES = ("state_dict_ema", "model_ema", "teacher", "encoder_q", "base_encoder", "online", "backbone", "trunk",
               "model", "student", "encoder_k", "target")
# nn.Sequential(*list(resnet.children())[:-1]) numbering used by several BYOL/SimCLR codes.
RESNET_CHILD_INDEX = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
# Markers ending a source's prefix whose keys are renamed: nn.Sequential child numbering, ClassyVision's RegNet.
SEQ, CLASSY = "#seq#", "#classy#"
# Inside a ClassyVision RegNet block (classy_vision/models/anynet.py ResBottleneckBlock, BottleneckTransform,
# squeeze_and_excitation_layer.py) -> torchvision's (torchvision/models/regnet.py); f.a.0/1 and f.b.0/1 agree.
# The same renaming as timm's regnet.py _filter_fn for the released SEER files.
CLASSY_REGNET_MODULES = {"proj": "proj.0", "bn": "proj.1", "f.a.0": "f.a.0", "f.a.1": "f.a.1", "f.b.0": "f.b.0",
                         "f.b.1": "f.b.1", "f.se.excitation.0": "f.se.fc1", "f.se.excitation.2": "f.se.fc2",
                         "f.c": "f.c.0", "f.final_bn": "f.c.1"}
# ClassyVision RegNets no torchvision RegNetY matches, by (stage depths, stage widths), and why. ClassyVision rounds
# a stage's width to its group width with round() (regnet.py _quantize_float: halves to even), torchvision with
# _make_divisible (halves up, at least 90 % of the width), so two of its named RegNetYs differ; SEER's larger ones
# are not in torchvision (VISSL configs/config/benchmark/linear_image_classification/imagenet1k/models/
# regnet64Gf_3.yaml, regnet256Gf_1.yaml, regnet10B.yaml).
CLASSY_ONLY_REGNETS = {
    ((1, 3, 8, 2), (64, 128, 320, 768)): "ClassyVision's regnet_y_800mf (torchvision's: widths 64-144-320-784)",
    ((2, 4, 10, 1), (168, 448, 896, 2016)): "ClassyVision's regnet_y_8gf (torchvision's: widths 224-448-896-2016)",
    ((2, 5, 12, 1), (328, 984, 1968, 4920)): "SEER's RegNetY-64GF, which torchvision does not have",
    ((2, 7, 17, 1), (746, 1492, 4103, 10444)): "SEER's RegNetY-256GF, which torchvision does not have",
    ((2, 7, 17, 1), (2020, 4040, 11110, 28280)): "SEER's RegNet-10B, which torchvision does not have",
}
# Suffixes stripped from a file name to name the checkpoint (moco_v2_800ep.pth.tar -> moco_v2_800ep).
NAME_SUFFIXES = (".tar", ".pth", ".pt", ".pyth", ".ckpt", ".safetensors", ".torch", ".pkl", ".bin")
MISSING_KEYS_RECORDED = 50
# solo-learn builds its ResNets with the CIFAR stem for these datasets (solo/methods/base.py: cfg.data.dataset in
# ["cifar10", "cifar100"]); its ResNets are torchvision's (solo/backbones/resnet/resnet.py).
SOLO_LEARN_CIFAR = ("cifar10", "cifar100")
SOLO_LEARN_RESNETS = ("resnet18", "resnet34", "resnet50")

# The types besides torch's defaults that published checkpoints pickle next to their weights, allowed in
# weights_only loading. Each is a plain data container: unpickling only fills its attributes, no code of the
# file runs. Needed by: DINO's full checkpoints (main_dino.py saves 'args') and timm's training checkpoints
# (CheckpointSaver saves 'args'). MoCo (epoch/arch/state_dict/optimizer), SwAV (+ apex 'amp' state) and VISSL
# (classy_state_dict, loss state) pickle only dicts, lists, numbers, strings and tensors: torch's defaults.
# Deliberately absent: omegaconf containers (solo-learn / Lightning 'hyper_parameters'), whose rebuilding
# runs omegaconf code; such files need --trust-pickle.
SAFE_GLOBALS: dict[Any, str] = {
    argparse.Namespace: "DINO full checkpoints and timm training checkpoints: the parsed command line ('args')",
}
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


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
    sha256: str  # the evaluated weights' id (keys the feature cache): see _weights_id
    format: str
    arch: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    report: KeyReport
    seed: int | None = None
    name: str = ""  # --name, else the file name without its suffixes, else the spec
    weights: str = ""  # the file's entry that was evaluated ("state_dict_ema", "teacher", ...; "" = top level)
    alternatives: list[str] = field(default_factory=list)  # the file's other entries holding a trunk
    partial: bool = False  # loaded with --allow-partial and trunk keys were missing
    file_sha256: str = ""

    @property
    def id(self) -> str:
        return self.sha256

    @property
    def method(self) -> str:
        return str(self.metadata.get("method", "unknown"))

    @property
    def pretrain_data(self) -> str:
        return str(self.metadata.get("pretrain_data", "unknown"))

    @property
    def load_info(self) -> dict[str, Any]:
        """What every result record says about the loading (``Result.checkpoint_load``)."""
        return {"weights": self.weights, "partial": self.partial, "missing": len(self.report.missing),
                "missing_keys": self.report.missing[:MISSING_KEYS_RECORDED]}

    def weights_note(self) -> str:
        """Why these weights and how to pick the others: "EMA; --weights state_dict for the raw weights"."""
        others = self.alternatives
        if not others:
            return ""
        if _is_ema(self.weights) and (raw := [a for a in others if not _is_ema(a)]):
            return f"EMA; --weights {raw[0]} for the raw weights"
        if self.weights == "teacher" and "student" in others:
            return "DINO teacher; --weights student for the student"
        if ema := [a for a in others if _is_ema(a)]:
            return f"--weights {ema[0]} for the EMA weights"
        if "teacher" in others:
            return "--weights teacher for the DINO teacher"
        return "also in this file: " + ", ".join(f"--weights {a}" for a in others)

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


@dataclass
class _Source:
    """One place in the file that may hold the trunk: an entry (a nested dict) and a key prefix inside it."""

    path: tuple[str, ...]
    prefix: str  # ends with SEQ for nn.Sequential child numbering, CLASSY for ClassyVision's RegNet names
    tensors: dict[str, torch.Tensor]  # the entry's tensors, by the file's keys
    names: dict[str, str]  # torchvision-style name -> the file's key, for every key under the prefix
    count: int  # required trunk keys (of any architecture) found

    @property
    def entry(self) -> str:
        return ".".join(self.path)

    @property
    def raw_prefix(self) -> str:
        return self.prefix.removesuffix(SEQ).removesuffix(CLASSY)

    def describe(self) -> str:
        return (self.entry or "<root>") + (f"[{self.raw_prefix}]" if self.raw_prefix else "")


# ---------------------------------------------------------------- public API


def load_checkpoint(
    spec: str | Path,
    arch: str | None = None,
    allow_partial: bool = False,
    trust_pickle: bool = False,
    seed: int = 0,
    weights: str | None = None,
    name: str | None = None,
) -> LoadedCheckpoint:
    """Load any supported checkpoint and convert it to torchvision trunk names.

    ``weights`` names the file's entry to evaluate (``state_dict``, ``student``, ...) instead of the default
    choice; ``name`` is the checkpoint's name in the records. Raises :class:`BadCheckpoint` (exit code 2 at
    the CLI) for anything the user can fix: missing/truncated file, unsafe pickle, wrong architecture, missing
    or unexpected trunk keys, unknown ``weights``.
    """
    spec_s = str(spec)
    if spec_s.startswith(("random:", "torchvision:", "timm:")) and weights is not None:
        raise UserError(f"--weights chooses an entry of a checkpoint file; {spec_s} has none")
    if spec_s.startswith("random:"):
        ck = _random_checkpoint(spec_s[len("random:") :] or arch or "resnet50", seed)
    elif spec_s.startswith("timm:"):
        ck = _timm_random(spec_s[len("timm:") :], seed)
    elif spec_s.startswith("torchvision:"):
        ck = _torchvision_hub(spec_s[len("torchvision:") :], allow_partial)
    else:
        ck = _load_file(require_file(spec_s, "checkpoint file"), arch, allow_partial, trust_pickle, weights)
        ck.spec = spec_s
    ck.name = name or ck.name or ck.spec
    return ck


def checkpoint_name(path: str | Path) -> str:
    """The file's name without the usual suffixes: moco_v2_800ep.pth.tar -> moco_v2_800ep."""
    name = Path(path).name
    while (suffix := Path(name).suffix.lower()) in NAME_SUFFIXES and len(name) > len(suffix):
        name = name[: -len(suffix)]
    return name


def _load_file(path: Path, arch: str | None, allow_partial: bool, trust_pickle: bool,
               weights: str | None) -> LoadedCheckpoint:
    if path.stat().st_size == 0:
        raise BadCheckpoint("checkpoint file is empty", path)
    file_sha = file_sha256(path)
    obj, meta, fmt_hint = _read_file(path, trust_pickle)
    candidates = dict(_tensor_dicts(obj))
    if not candidates:
        raise BadCheckpoint("no tensors found: this is not a model checkpoint", path)
    sources = [s for s in (_best_source(p, t) for p, t in candidates.items()) if s is not None]
    trunks = sorted((s for s in sources if _keys_arch(s) is not None), key=lambda s: s.entry)
    pool = trunks
    if weights is not None:
        pool = [s for s in trunks if s.entry == weights or s.entry.startswith(weights + ".")]
        if not pool:
            available = ", ".join(s.entry or "<root>" for s in trunks) or "none"
            raise BadCheckpoint(f"--weights {weights!r}: no trunk weights under that entry; entries with trunk "
                                f"weights: {available}", path)
    if not (pool or sources):
        raise BadCheckpoint("no trunk weights found in this file (no key looks like a ResNet, AlexNet or ViT "
                            "layer)", path)
    source = min(pool or sources, key=_source_rank)
    fmt = fmt_hint or _vit_format(source, set(candidates)) or _format_name(source.describe(), obj)
    meta = {**_format_metadata(fmt, source, obj, path), **meta}
    arch = _resolve_arch(arch, meta.get("arch"), source, path)
    state, report = _convert(path, source, arch, allow_partial)
    alternatives = [s.entry for s in trunks if s.entry != source.entry]
    return LoadedCheckpoint(
        spec=str(path), path=path, sha256=_weights_id(file_sha, source.entry, alternatives),
        format=fmt, arch=arch, state_dict=state,
        metadata={**meta, "arch": meta.get("arch", arch)}, report=report,
        name=checkpoint_name(path),
        weights=source.entry, alternatives=alternatives, partial=bool(report.missing), file_sha256=file_sha,
    )


def _weights_id(file_sha: str, entry: str, alternatives: list[str]) -> str:
    """The file's sha256; for a file holding several trunks (EMA and raw, teacher and student) the hash of it
    and the evaluated entry, so that their records and cached features never mix."""
    if not alternatives:
        return file_sha
    return hashlib.sha256(f"{file_sha}|weights={entry}".encode()).hexdigest()


def _resolve_arch(arch: str | None, meta_arch: str | None, source: _Source, path: Path) -> str:
    """--arch, the metadata's arch and the architecture the keys show must agree; the first one given wins.
    Archs with the same weights' shapes agree (MoCo v3's 12-head ViT-S and vit_small_patch16)."""
    keys_arch = _keys_arch(source)
    if keys_arch is None and (unfit := _unsupported_regnet(source)):
        raise BadCheckpoint(unfit, path)
    arch = _canonical_arch(arch) if arch else arch
    looks = f"the keys look like {keys_arch}{_layout(source)}" if keys_arch else ""
    if arch and meta_arch and arch != meta_arch:
        raise BadCheckpoint(f"--arch {arch} contradicts the checkpoint's metadata (arch {meta_arch})", path)
    if arch and keys_arch and not _same_weights(arch, keys_arch):
        raise BadCheckpoint(f"--arch {arch} does not fit this file: {looks}; pass --arch {keys_arch} or leave "
                            "--arch out", path)
    if meta_arch and keys_arch and not _same_weights(meta_arch, keys_arch):
        raise BadCheckpoint(f"the metadata says arch {meta_arch} but {looks}", path)
    arch = arch or meta_arch or keys_arch
    if arch is None:
        raise BadCheckpoint(f"cannot infer the architecture from the keys{_layout(source)}; "
                            "pass --arch", path)
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHS)}")
    return arch


def _keys_arch(source: _Source) -> str | None:
    """The architecture the source's keys (ResNet, AlexNet; conv1's shape tells the stem) or tensor shapes (ViT)
    show, or None."""
    arch = infer_arch(source.names, _shapes(source))
    if arch is None:
        arch = vit.infer_arch({n: tuple(v.shape) for n, v in _named_tensors(source).items()})
        if arch and "base_encoder" in source.raw_prefix:
            arch = vit.MOCO_V3_ARCHS.get(arch, arch)
    return arch


def _shapes(source: _Source) -> dict[str, tuple[int, ...]]:
    return {n: tuple(source.tensors[k].shape) for n, k in source.names.items()}


def _unsupported_regnet(source: _Source) -> str:
    """Why the source's RegNet stages fit none of the RegNetY archs, in one line ("" when they fit one, or the
    keys are no RegNet's): loading them into another RegNetY would fail on shapes or, worse, not fail."""
    shapes = _shapes(source)
    if not any(n.startswith("trunk_output.") for n in shapes) or regnet_fits(shapes):
        return ""
    known = CLASSY_ONLY_REGNETS.get(regnet_layout(shapes))
    what = f"this is {known}" if known else "no supported RegNetY has these stages"
    regnets = ", ".join(a for a, info in ARCHS.items() if info["family"] == "regnet")
    return f"{describe_layout(shapes, shapes)}: {what}; the supported RegNetYs are torchvision's ({regnets})"


def _named_tensors(source: _Source) -> dict[str, torch.Tensor]:
    """The source's tensors by trunk name; ViT layouts converted to timm's names."""
    named = {n: source.tensors[key] for n, key in source.names.items()}
    return vit.to_timm_layout(named) if vit.is_vit_layout(named) else named


def _same_weights(a: str, b: str) -> bool:
    """Whether two archs take the same weights (equal names, equal state-dict shapes)."""
    return a == b or (a in ARCHS and b in ARCHS and trunk_state_shapes(a) == trunk_state_shapes(b))


def _canonical_arch(arch: str) -> str:
    """``timm:<name>`` -> our name for that model when we have one (registering it); other names unchanged."""
    if arch.startswith("timm:"):
        arch_info(arch)
        return vit.timm_arch(arch[len("timm:") :])[0]
    return arch


def _layout(source: _Source) -> str:
    """ " (blocks 3-4-6-3, bottleneck)" when the keys hold ResNet stages, " (RegNet stages: depths ..., widths ...)"
    for RegNet stages, else ""."""
    if any(n.startswith("trunk_output.") for n in source.names):
        return f" ({describe_layout(source.names, _shapes(source))})"
    return f" ({describe_layout(source.names)})" if any(n.startswith("layer") for n in source.names) else ""


def _convert(path: Path, source: _Source, arch: str, allow_partial: bool) -> tuple[dict, KeyReport]:
    """The trunk's tensors under their torchvision names and the key report, refusing what does not fit."""
    reference = trunk_state_shapes(arch)
    named = _named_tensors(source)
    state = {n: v for n, v in named.items() if n in reference}
    if not state:
        raise BadCheckpoint(f"no {arch} trunk weights found in this file", path)
    extra = sorted(n for n in named if n not in reference and is_trunk_key(arch, n))
    if extra:
        raise BadCheckpoint(f"{len(extra)} unexpected {arch} trunk keys (first: {extra[0]}): the file's trunk"
                            f"{_layout(source)} is not a {arch}; pass the right --arch", path)
    mismatch = [f"{n}: {tuple(v.shape)} vs {reference[n]}" for n, v in sorted(state.items())
                if tuple(v.shape) != reference[n]]
    if mismatch:
        raise BadCheckpoint(f"wrong architecture: {len(mismatch)} tensor shapes do not fit {arch} "
                            f"(first: {mismatch[0]})", path)
    missing = sorted(k for k in reference.keys() - state.keys() if not k.endswith(OPTIONAL_SUFFIXES))
    if missing and not allow_partial:
        raise BadCheckpoint(f"{len(missing)} {arch} trunk keys are missing (first: {missing[0]}); "
                            "pass --allow-partial to evaluate with those left at random init", path)
    if missing:
        warn(f"--allow-partial: {len(missing)} {arch} trunk keys missing from {path.name}, left at random init "
             f"(first: {', '.join(missing[:3])})")
    bad = sorted(n for n, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise BadCheckpoint(f"NaN/Inf values in {len(bad)} trunk tensors (first: {bad[0]})", path)
    unexpected = sorted(source.names.get(n, n) for n in named if n not in reference)
    return state, KeyReport(source.describe(), sorted(state), missing, unexpected)


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write our format atomically: safetensors weights + JSON metadata (``method``, ``arch``, ... )."""
    from safetensors.torch import save_file

    for key in ("method", "arch"):
        if key not in metadata:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header = {"format": META_KEY, META_KEY: json.dumps(dict(metadata), default=str)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of one of our checkpoints, without loading the weights."""
    return _parse_metadata(read_metadata_raw(Path(path)), Path(path))


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
    obj = _read_pickle(path, trust_pickle)
    return (obj.state_dict() if isinstance(obj, nn.Module) else obj), {}, None


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
        return tensors, _parse_metadata(meta_raw, path), "evalsuite"
    return tensors, {}, "timm" if "timm" in json.dumps(meta_raw) else None


def _parse_metadata(meta_raw: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The JSON object under the header's ``evalsuite`` key; anything else is a broken file, said in one line."""
    try:
        meta = json.loads(meta_raw.get(META_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise BadCheckpoint(f"the {META_KEY} metadata in the safetensors header is not valid JSON ({e})",
                            path) from None
    if not isinstance(meta, dict):
        raise BadCheckpoint(f"the {META_KEY} metadata in the safetensors header is not a JSON object (found a "
                            f"JSON {type(meta).__name__})", path)
    return meta


def read_metadata_raw(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _read_pickle(path: Path, trust_pickle: bool) -> Any:
    if not (zipfile.is_zipfile(path) or _legacy_pickle(path)):
        raise BadCheckpoint("not a PyTorch checkpoint (neither a zip archive nor a pickle) or truncated", path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            # torch's multi-line note on a pickle protocol it may not read: the refusal below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise BadCheckpoint(_refusal(path, e), path) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise BadCheckpoint(f"truncated or corrupt checkpoint ({_first_line(e)})", path) from None
    warn(f"--trust-pickle: loading {path} with weights_only=False executes code inside the file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # the file's own code may raise anything
        raise BadCheckpoint(f"cannot unpickle ({type(e).__name__}: {_first_line(e)})", path) from None


def _refusal(path: Path, e: pickle.UnpicklingError) -> str:
    """Why weights_only loading refused the file, naming what it refused."""
    refused = _refused_globals(path, e)
    if any(g.startswith("torch.nn.modules.") for g in refused):
        return ("a whole pickled nn.Module (torch.save(model)); load it with --trust-pickle only if you trust "
                "it, or save model.state_dict()")
    if refused:
        more = f" (and {len(refused) - 1} more: {', '.join(refused[1:4])}{', ...' if len(refused) > 4 else ''})"
        what = f"refusing global {refused[0]}" + (more if len(refused) > 1 else "")
    else:
        what = f"refusing the pickle ({_first_line(e)})"
    return (f"{what}: weights_only loading admits tensors and plain data only; re-run with --trust-pickle only "
            "if you trust this file")


def _refused_globals(path: Path, e: Exception) -> list[str]:
    """Every global the pickle needs beyond the allowed ones (read, never imported), else the one in ``e``."""
    if zipfile.is_zipfile(path):
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if found:
                return sorted(found)
        except Exception:  # an unreadable archive: fall back to torch's message
            pass
    named = re.findall(r"GLOBAL ([\w.]+)", ANSI_ESCAPE.sub("", str(e)))[:1]
    return named or _scan_pickle_globals(path)


def _scan_pickle_globals(path: Path) -> list[str]:
    """The globals a plain (non-zip) pickle file names beyond torch's and :data:`SAFE_GLOBALS`, read opcode by
    opcode with pickletools (nothing is imported or run): for pickles torch stops reading before any global."""
    safe = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS}
    found: list[str] = []
    strings: list[str] = []  # string arguments pushed so far (STACK_GLOBAL takes the last two)
    memo: dict[int, str] = {}
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET") and arg in memo:
                    strings.append(memo[arg])
                elif op.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # past the pickle (legacy files append raw storage bytes) or a broken file
        pass
    plain = ("torch.", "collections.", "_codecs.", "builtins.")
    return sorted({g for g in found if not g.startswith(plain) and g not in safe})


def _legacy_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _first_line(e: BaseException) -> str:
    text = ANSI_ESCAPE.sub("", str(e)).strip().splitlines()
    return text[0].strip() if text else type(e).__name__


# ---------------------------------------------------------------- finding the trunk


def _tensor_dicts(obj: Any, path: tuple[str, ...] = (), depth: int = 0):
    """Yield (path, dict) for every nested mapping that holds tensors (a pickled module counts as its
    state dict)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or depth > 5:
        return
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        yield path, tensors
    for k, v in obj.items():
        if isinstance(v, (Mapping, nn.Module)):
            yield from _tensor_dicts(v, path + (str(k),), depth + 1)


def _candidate_names(key: str) -> list[tuple[str, str]]:
    """All (prefix, trunk_name) splits of a key at '.' boundaries, with child-index renaming."""
    out = [("", key)]
    for m in re.finditer(r"\.", key):
        prefix, rest = key[: m.end()], key[m.end() :]
        out.append((prefix, rest))
    renamed = []
    for prefix, rest in out:
        for marker in (SEQ, CLASSY):
            name = _renamed(marker, rest)
            if name is not None:
                renamed.append((prefix + marker, name))
    return out + renamed


def _renamed(marker: str, name: str) -> str | None:
    """``name`` in torchvision's layout under a marked prefix, or None when it is not one of that layout's keys."""
    if marker == SEQ:
        head, _, tail = name.partition(".")
        return f"{RESNET_CHILD_INDEX[head]}.{tail}" if head in RESNET_CHILD_INDEX and tail else None
    return classy_regnet_name(name)


def classy_regnet_name(key: str) -> str | None:
    """torchvision's name of a key of VISSL's RegNet trunk (after ``_feature_blocks.``), or None: ``conv1.stem.0``
    -> ``stem.0``, ``res2.block1-0.f.final_bn`` -> ``trunk_output.block1.block1-0.f.c.1`` (``res<s+1>`` holds
    ``block<s>``)."""
    m = re.fullmatch(r"conv1\.stem\.([01])\.(\w+)", key)
    if m:
        return f"stem.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"res([2-5])\.block([1-4])-(\d+)\.(.+)\.(\w+)", key)
    if not m or int(m.group(1)) != int(m.group(2)) + 1 or m.group(4) not in CLASSY_REGNET_MODULES:
        return None
    stage = m.group(2)
    return f"trunk_output.block{stage}.block{stage}-{m.group(3)}.{CLASSY_REGNET_MODULES[m.group(4)]}.{m.group(5)}"


def _best_source(path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> _Source | None:
    """The prefix inside one entry under which the most trunk keys (of any architecture) sit."""
    known = _all_trunk_names()
    counts: dict[str, int] = {}
    for key in tensors:
        for prefix, name in _candidate_names(key):
            # RegNet stages only: other models' stem.0 / stem.1 (timm's ConvNeXt) must not pass for a RegNet's
            regnet = name.startswith("trunk_output.") and is_regnet_key(name)
            if (name in known or vit.is_vit_key(name) or regnet) and not name.endswith(OPTIONAL_SUFFIXES):
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return None
    where = ".".join(path)
    prefix = min(counts, key=lambda p: (-counts[p], -_preference(f"{where}[{p}]"), len(p), p))
    raw = prefix.removesuffix(SEQ).removesuffix(CLASSY)
    marker = prefix[len(raw) :]
    names = {}
    for key in tensors:
        if key.startswith(raw):
            name = key[len(raw) :]
            names[(_renamed(marker, name) if marker else None) or name] = key
    return _Source(path, prefix, tensors, names, counts[prefix])


def _source_rank(s: _Source) -> tuple:
    """Most complete first, then the preferred name, then the shallower entry, then the name: never key order."""
    return (-s.count, -_preference(f"{s.entry}[{s.prefix}]"), len(s.path), s.entry, s.prefix)


def _preference(where: str) -> int:
    for rank, word in enumerate(PREFERENCES):
        if word in where:
            return len(PREFERENCES) - rank
    return 0


def _is_ema(entry: str) -> bool:
    return re.search(r"(^|[._])ema($|[._])", entry) is not None


@cache
def _all_trunk_names() -> frozenset[str]:
    """The ResNet and AlexNet key names (ViT and RegNet keys are matched by pattern: :func:`evalsuite.vit.is_vit_key`,
    :func:`evalsuite.trunks.is_regnet_key`)."""
    return frozenset(n for arch, info in ARCHS.items() if info["family"] in ("resnet", "alexnet")
                     for n in trunk_state_shapes(arch))


def _vit_format(source: _Source, entries: set[tuple[str, ...]]) -> str | None:
    """The ViT layouts told apart by their keys and the file's entries (None: not a ViT, or one the generic rules
    name). iBOT saves DINO's teacher / student plus ``ibot_loss``; its student backbone has ``masked_embed``."""
    if "class_embedding" in source.names:
        return "clip"
    if "cls_token" not in source.names:
        return None
    if ("ibot_loss",) in entries or "masked_embed" in source.names:
        return "ibot"
    if "base_encoder" in source.raw_prefix:
        return "moco_v3"
    if any(k.startswith("decoder_") for k in source.tensors):
        return "mae"
    if "register_tokens" in source.names or "mask_token" in source.names:
        return "dinov2"
    if source.path[:1] in (("teacher",), ("student",)):
        return "dino"
    return "timm"


def _format_metadata(fmt: str, source: _Source, obj: Any, path: Path) -> dict[str, Any]:
    """What a layout implies beyond the weights: CLIP's mean/std and bicubic resizing (its preprocessing) and the
    image-text projection left out of the trunk; solo-learn's method, dataset and arch; a ClassyVision RegNet's
    renaming. The file's own metadata overrides these."""
    if fmt == "lightning":
        return _solo_learn_metadata(obj, path)
    if source.prefix.endswith(CLASSY):
        return {"converted_from": "ClassyVision RegNet (VISSL _feature_blocks.conv1, res2..res5), renamed to "
                                  "torchvision's RegNet names"}
    if fmt != "clip":
        return {}
    meta: dict[str, Any] = {"normalize": {"mean": list(vit.CLIP_MEAN), "std": list(vit.CLIP_STD)},
                            "interpolation": "bicubic"}
    if "proj" in source.names:
        proj = source.tensors[source.names["proj"]]
        meta["image_projection"] = (f"{source.names['proj']} {tuple(proj.shape)} left out: the trunk's features are "
                                    "ln_post's output, before the image-text projection")
    return meta


def _format_name(source: str, obj: Any) -> str:
    if source.startswith("classy_state_dict") or "_feature_blocks." in source:
        return "vissl"
    if "encoder_q" in source:
        return "moco"
    if source.startswith(("teacher", "student")):
        return "dino"
    if "online" in source:
        return "byol"
    if "backbone." in source or (isinstance(obj, Mapping) and "pytorch-lightning_version" in obj):
        return "lightning"
    if isinstance(obj, Mapping) and any(k in obj for k in ("state_dict_ema", "model")) or "timm" in source:
        return "timm"
    return "torchvision"


def _solo_learn_metadata(obj: Any, path: Path) -> dict[str, Any]:
    """Method, pretraining data and arch from solo-learn's run arguments: the checkpoint's ``hyper_parameters``,
    else ``args.json`` beside it (solo/utils/checkpointer.py ``save_args``; main_knn.py reads it from the same
    folder). Three generations of names: ``backbone: {name}`` + ``data: {dataset}`` (omegaconf, since 2022-09),
    flat ``backbone`` + ``dataset`` (argparse), ``encoder`` + ``dataset`` (before 2021-12). {} without them."""
    found = _solo_learn_args(obj, path)
    if found is None:
        return {}
    args, where = found
    backbone = args.get("backbone", args.get("encoder"))
    name = str(backbone.get("name", "")) if isinstance(backbone, Mapping) else str(backbone or "")
    data = args.get("data")
    dataset = str(data.get("dataset", "")) if isinstance(data, Mapping) else str(args.get("dataset", ""))
    meta: dict[str, Any] = {"solo_learn": {"args": where, "backbone": name, "dataset": dataset}}
    if args["method"]:
        meta["method"] = str(args["method"])
    if dataset:
        meta["pretrain_data"] = dataset
    if name in SOLO_LEARN_RESNETS:
        meta["arch"] = f"{name}_cifar" if dataset in SOLO_LEARN_CIFAR else name
    return meta


def _solo_learn_args(obj: Any, path: Path) -> tuple[Mapping, str] | None:
    """solo-learn's arguments and where they were found, or None when neither place holds them."""
    hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    hp = vars(hp) if isinstance(hp, argparse.Namespace) else hp
    if _is_solo_learn_args(hp):
        return hp, "hyper_parameters"
    args_json = path.parent / "args.json"
    if not args_json.is_file():
        return None
    try:
        args = json.loads(args_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warn(f"ignoring {args_json}: not readable JSON ({_first_line(e)})")
        return None
    return (args, args_json.name) if _is_solo_learn_args(args) else None


def _is_solo_learn_args(args: Any) -> bool:
    """Every solo-learn generation names the method and the backbone (``encoder`` before 2021-12)."""
    return isinstance(args, Mapping) and "method" in args and ("backbone" in args or "encoder" in args)


# ---------------------------------------------------------------- special specs


def _random_checkpoint(arch: str, seed: int) -> LoadedCheckpoint:
    arch = _canonical_arch(arch)
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r} in random:{arch}; supported: {', '.join(ARCHS)}")
    ident = hashlib.sha256(f"random:{arch}:seed={seed}".encode()).hexdigest()
    meta = {"method": "random", "arch": arch, "pretrain_data": "none", "init_seed": seed}
    report = KeyReport("random init")
    return LoadedCheckpoint(f"random:{arch}", None, ident, "random", arch, {}, meta, report, seed=seed)


def _timm_random(name: str, seed: int) -> LoadedCheckpoint:
    """``timm:<name>``: the timm ViT, randomly initialised, with timm's mean/std for it (nothing downloaded)."""
    ck = _random_checkpoint(f"timm:{name}", seed)
    ck.spec = f"timm:{name}"
    ck.metadata["timm_model"] = name
    norm = vit.timm_normalize(name)
    if norm:
        ck.metadata["normalize"] = norm
    return ck


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
    ckpt.spec = ckpt.name = f"torchvision:{arch}"
    ckpt.format = "torchvision-hub"
    ckpt.metadata.update({"method": "supervised", "pretrain_data": "imagenet1k", "weights": str(weights)})
    return ckpt
