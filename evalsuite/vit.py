"""Vision Transformers (timm's ``VisionTransformer``) as trunks: archs, taps, token pooling, checkpoint layouts.

Architectures (registered into :data:`evalsuite.trunks.ARCHS`, family ``"vit"``):

- ``vit_{tiny,small,base,large}_patch16``: DeiT / DINO / MAE / MoCo v3's ViTs (timm ``vit_*_patch16_224``,
  224 px grid 14 x 14, no LayerScale); ``vit_small_patch16_h12`` is MoCo v3's ViT-S (12 heads, same weights'
  shapes as ``vit_small_patch16``: picked for MoCo v3 files, or by ``--arch``).
- ``vit_{tiny,small,base,large}_patch8``: the same ViTs with 8 px patches (224 px grid 28 x 28; timm
  ``vit_small_patch8_224`` / ``vit_base_patch8_224``, DINO's ViT-S/8 and ViT-B/8 releases): four times the tokens
  of ``patch16`` at any size, e.g. an 8 x 8 grid at 64 px, for pretraining on small images.
- ``vit_{...}_patch14`` and ``vit_{...}_patch14_reg4``: DINOv2's ViTs without / with 4 register tokens (timm
  ``vit_*_patch14[_reg4]_dinov2``: LayerScale, position embeddings for 518 px, a 37 x 37 grid);
  ``vit_giant_patch14[_reg4]``: DINOv2's ViT-g (1536 dims, 40 blocks, SwiGLU MLPs: the hub's ``mlp.w12`` /
  ``mlp.w3`` are timm's packed ``mlp.fc1`` / ``mlp.fc2``).
- ``vit_{...}_patch{32,16,14}_clip_quickgelu`` and ``vit_{...}_patch{32,16,14}_clip``: CLIP image towers (timm
  ``vit_*_clip[_quickgelu]_224``: a LayerNorm before the blocks, no patch-embedding bias, 224 px). OpenAI's models
  use QuickGELU, open_clip's LAION / DataComp models GELU; the weights do not tell them apart (same shapes).
- ``timm:<name>``: any timm ``VisionTransformer`` model, random init (nothing is downloaded).

Every trunk is built with ``dynamic_img_size=True``: position embeddings are resampled (bicubic, timm's
``resample_abs_pos_embed``) to the input's patch grid, and the pooling op records it (``pos_embed=14x14->2x2``).
An input side that is not a multiple of the patch is zero-padded at the bottom / right to the next multiple
(timm's ``dynamic_img_pad``; the recorded transform size and the patch determine it).

Taps: ``block0`` .. ``block{N-1}``: all tokens (prefix + patches) after block K with the trunk's final norm
applied, as DINO's ``get_intermediate_layers``, DINOv2's linear evaluation and timm's
``forward_intermediates(norm=True)`` return them; ``block{N-1}`` is the model's own output. ``last4``: the
tokens of the last four blocks concatenated along channels (4 x D), so its CLS is DINO's linear-eval
feature. One forward pass serves all taps (``forward_intermediates``, stopping at the deepest one).
A tap's shape (``tap_shapes``) is (channels, h, w) of its patch grid.

Pooling per tap (the op is recorded with every feature; ``skip`` = CLS + register tokens left out):

- ``cls``: the CLS token. ``mean``: average of the patch tokens. ``gem``: GeM (p=3) over patch tokens.
- ``cls+mean``: [CLS, patch mean] concatenated (DINO's ``avgpool_patchtokens``, in DINOv2's order; DINO
  interleaves the two, a permutation of the same dims). On ``last4`` the mean is the last block's (D dims),
  as in DINO/DINOv2: 4D + D dims.
- ``avg`` (the ResNets' global average): the trunk's own global representation, timm's ``global_pool``:
  CLS for ``token`` models (DINO's kNN feature), the patch mean for ``avg`` models.
- ``goyal`` / ``vissl`` (the ResNets' ~9k-dim spatial pooling): the CLS token, as VISSL's ViT configs
  (``lastCLS`` / ``concatCLS4``) and DINO read ViT features; no published protocol pools ViT grids to 9k dims.
- ``none``: the patch-token grid flattened as (D, h, w).

:func:`patch_grid` gives the same grid as a (N, D, h, w) map (navigation compresses it like a ResNet tap).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import UserError

# size: (embed dim, depth, heads)
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
# the timm model each variant is built from (its config; the size's dim / depth / heads override it), its patch and
# image size; patch8 is timm's vit_{small,base}_patch8_224 (patch16's config with 8 px patches)
VARIANTS = {"patch16": ("vit_{size}_patch16_224", 16, 224), "patch8": ("vit_{size}_patch16_224", 8, 224),
            "patch14": ("vit_small_patch14_dinov2", 14, 518),
            "patch14_reg4": ("vit_small_patch14_reg4_dinov2", 14, 518)}
# DINOv2's ViT-g/14: timm's own configs (SwiGLU MLP, 24 heads of 64 dims)
GIANT = {"patch14": "vit_giant_patch14_dinov2", "patch14_reg4": "vit_giant_patch14_reg4_dinov2"}
# CLIP image towers: variant -> (timm model whose config is used, patch); QuickGELU first: OpenAI's, the default
CLIP_VARIANTS = {f"patch{p}_clip{act}": (f"vit_{size}_patch{p}_clip{act}_224", p)
                 for act in ("_quickgelu", "") for p, size in ((32, "base"), (16, "base"), (14, "large"))}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOKEN_METHODS = ("cls", "mean", "cls+mean", "gem")
GEM_P = 3.0
GEM_EPS = 1e-6
# MoCo v3's ViT-S has 12 heads (moco-v3 vits.py vit_small); its weights have vit_small_patch16's shapes.
MOCO_V3_ARCHS = {"vit_small_patch16": "vit_small_patch16_h12"}


def _info(timm_name: str, overrides: dict, dim: int, depth: int, patch: int, img_size: int, prefix: int,
          global_pool: str = "token") -> dict:
    taps = tuple(f"block{i}" for i in range(depth)) + (("last4",) if depth >= 4 else ())
    return {"family": "vit", "taps": taps, "channels": (dim,) * depth + ((4 * dim,) if depth >= 4 else ()),
            "default_taps": (f"block{depth - 1}",) + (("last4",) if depth >= 4 else ()),
            "timm": (timm_name, overrides), "embed_dim": dim, "depth": depth, "patch": patch,
            "grid": img_size // patch, "prefix_tokens": prefix, "global_pool": global_pool}


def _named_archs() -> dict[str, dict]:
    archs = {}
    for size, (dim, depth, heads) in SIZES.items():
        for variant, (base, patch, img) in VARIANTS.items():
            name = base.format(size=size)
            if variant.startswith("patch14"):
                overrides = {"embed_dim": dim, "depth": depth, "num_heads": heads}
            else:  # timm's own config of the size, with the variant's patch
                overrides = {} if patch == 16 else {"patch_size": patch}
            archs[f"vit_{size}_{variant}"] = _info(name, overrides, dim, depth, patch, img,
                                                   prefix=5 if variant.endswith("reg4") else 1)
    for variant, name in GIANT.items():
        archs[f"vit_giant_{variant}"] = _info(name, {}, 1536, 40, 14, 518, prefix=5 if variant.endswith("reg4") else 1)
    archs["vit_small_patch16_h12"] = _info("vit_small_patch16_224", {"num_heads": 12}, 384, 12, 16, 224, 1)
    for variant, (timm_name, patch) in CLIP_VARIANTS.items():
        for size, (dim, depth, heads) in SIZES.items():
            overrides = {"embed_dim": dim, "depth": depth, "num_heads": heads}
            archs[f"vit_{size}_{variant}"] = _info(timm_name, overrides, dim, depth, patch, 224, prefix=1)
    return archs


VIT_ARCHS: dict[str, dict] = _named_archs()


def timm_arch(name: str) -> tuple[str, dict]:
    """The arch name and info of ``timm:<name>``: one of ours when it is the same model, else ``timm:<name>``."""
    for arch, info in VIT_ARCHS.items():
        if info["timm"] == (name, {}):
            return arch, info
    with torch.device("meta"):
        model = _create(name, {})
    h, w = model.patch_embed.grid_size
    info = _info(name, {}, model.embed_dim, len(model.blocks), model.patch_embed.patch_size[0],
                 h * model.patch_embed.patch_size[0], model.num_prefix_tokens,
                 "avg" if model.global_pool == "avg" else "token")
    info["grid"] = h if h == w else info["grid"]
    return f"timm:{name}", info


def timm_normalize(name: str) -> dict | None:
    """timm's mean/std for the model ``name`` (its pretrained config), or None."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return None
    return {"mean": list(cfg.mean), "std": list(cfg.std)}


def _create(name: str, overrides: dict) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    refused = f"timm:{name} is not a timm VisionTransformer; only VisionTransformer models are trunks so far"
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True,
                                  dynamic_img_pad=True, **overrides)
    except RuntimeError as e:  # an unknown name
        raise UserError(f"timm:{name}: {e}") from None
    except TypeError:  # a model class without dynamic input sizes
        raise UserError(refused) from None
    if not isinstance(model, VisionTransformer):
        raise UserError(refused)
    return model


class ViTTaps:
    """The trunk interface on top of a timm ``VisionTransformer``: ``forward(x, taps) -> {tap: tokens}``.

    Mixed into the model's own class (:func:`build_vit`), so the state-dict keys stay timm's.
    """

    arch: str
    tap_names: tuple[str, ...]
    supports_channels_last = False  # tokens, not maps: channels_last buys nothing

    def forward(self, x: torch.Tensor, taps: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        from .trunks import check_taps

        wanted = list(self.tap_names if taps is None else taps)
        check_taps(self, wanted)
        depth = len(self.blocks)
        last4 = list(range(depth - 4, depth))
        blocks = sorted({int(t[len("block"):]) for t in wanted if t.startswith("block")}
                        | (set(last4) if "last4" in wanted else set()))
        outs = self.forward_intermediates(x, indices=blocks, norm=True, output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=True, stop_early=True)
        tokens = {i: torch.cat([o[1], o[0]], dim=1) if isinstance(o, tuple) else o for i, o in zip(blocks, outs)}
        acts = {f"block{i}": t for i, t in tokens.items()}
        if "last4" in wanted:
            acts["last4"] = torch.cat([tokens[i] for i in last4], dim=-1)
        return {t: acts[t] for t in wanted}


@functools.cache
def _trunk_class(base: type) -> type:
    return type(f"{base.__name__}Trunk", (ViTTaps, base), {"__module__": __name__})


def build_vit(arch: str, info: Mapping) -> nn.Module:
    """A randomly initialised ViT trunk for ``arch`` (timm model, no classifier, dynamic input size)."""
    model = _create(*info["timm"])
    model.__class__ = _trunk_class(type(model))
    model.arch, model.tap_names = arch, tuple(info["taps"])
    return model


def tap_shapes(info: Mapping, image_size: int, taps: Sequence[str] | None = None) -> dict[str, tuple[int, int, int]]:
    g = -(-image_size // info["patch"])  # a side that is not a multiple of the patch is padded (dynamic_img_pad)
    shapes = {t: (c, g, g) for t, c in zip(info["taps"], info["channels"])}
    return {t: shapes[t] for t in (taps or info["taps"])}


# ---------------------------------------------------------------- pooling


def token_method(info: Mapping, method: str) -> str:
    """The token pooling a method name means on a ViT (see the module docstring)."""
    if method in ("goyal", "vissl"):
        return "cls"
    if method == "avg":
        return "mean" if info["global_pool"] == "avg" else "cls"
    return method


def pool_op(info: Mapping, tap: str, channels: int, grid: int, method: str) -> tuple[str, tuple[int, ...]]:
    """(op, output shape) of ``method`` on a ViT tap with ``channels`` and a ``grid`` x ``grid`` patch grid."""
    how = token_method(info, method)
    args = [f"skip={info['prefix_tokens']}"]
    if how == "gem":
        args.append(f"p={GEM_P:g}")
    if how == "cls+mean" and tap == "last4":
        args.append(f"last={info['embed_dim']}")
    if grid != info["grid"]:
        args.append(f"pos_embed={info['grid']}x{info['grid']}->{grid}x{grid}")
    name = {"cls": "cls", "mean": "patch_mean", "cls+mean": "cls+patch_mean", "gem": "patch_gem",
            "none": "patch_grid"}[how]
    if how == "none":
        shape: tuple[int, ...] = (channels, grid, grid)
    elif how == "cls+mean":
        shape = (channels + (info["embed_dim"] if tap == "last4" else channels),)
    else:
        shape = (channels,)
    return f"{name}({','.join(args)})", shape


def is_token_op(op: str) -> bool:
    return op.split("(")[0] in ("cls", "patch_mean", "cls+patch_mean", "patch_gem", "patch_grid")


def pool_tokens(x: torch.Tensor, op: str) -> torch.Tensor:
    """Pool (N, T, C) tokens to (N, D) according to a :func:`pool_op` op."""
    name, _, rest = op.partition("(")
    args = dict(a.split("=", 1) for a in rest.rstrip(")").split(",") if a)
    patches = x[:, int(args["skip"]):]
    if name == "cls":
        return x[:, 0]
    if name == "patch_mean":
        return patches.mean(dim=1)
    if name == "cls+patch_mean":
        last = int(args.get("last", x.shape[-1]))
        return torch.cat([x[:, 0], patches[..., -last:].mean(dim=1)], dim=1)
    if name == "patch_gem":
        p = float(args["p"])
        return patches.clamp(min=GEM_EPS).pow(p).mean(dim=1).pow(1.0 / p)
    return patches.transpose(1, 2).reshape(x.shape[0], -1)  # patch_grid: (C, h, w) flattened


def patch_grid(tokens: torch.Tensor, prefix_tokens: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, T, C) tokens -> (N, C, h, w): the patch tokens (CLS and register tokens, the first ``prefix_tokens``,
    left out) as a map in the patch grid's row-major order, for heads that want convolutional maps. ``size`` is
    (h, w); without it the grid must be square."""
    patches = tokens[:, prefix_tokens:]
    n = patches.shape[1]
    h, w = size if size is not None else (math.isqrt(n), math.isqrt(n))
    if h * w != n:
        raise ValueError(f"{n} patch tokens do not form a {h} x {w} grid (give the grid's size)")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


# ---------------------------------------------------------------- checkpoint layouts

_KEY = re.compile(r"(cls_token|pos_embed|reg_token|register_tokens|patch_embed\.proj\.(weight|bias)"
                  r"|(norm|norm_pre)\.(weight|bias)"
                  r"|blocks\.\d+\.((norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.(weight|bias)"
                  r"|ls[12]\.gamma))")
# DINOv2's SwiGLU MLP (dinov2/layers/swiglu_ffn.py) -> timm's packed GluMlp (timm's _convert_dinov2)
_SWIGLU = re.compile(r"(blocks\.\d+\.mlp)\.(w12|w3)\.")
_SWIGLU_NAMES = {"w12": "fc1", "w3": "fc2"}
# OpenAI CLIP / open_clip image towers (under ``visual.``); ``proj`` (image-text projection) is not a trunk key
_CLIP_KEY = re.compile(r"class_embedding|positional_embedding|conv1\.weight|(ln_pre|ln_post)\.(weight|bias)"
                       r"|transformer\.resblocks\.\d+\.((ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)"
                       r"|attn\.in_proj_(weight|bias))")
# CLIP name part -> timm's, applied in order (timm's _convert_openai_clip)
_CLIP_RENAMES = (("conv1.", "patch_embed.proj."), ("transformer.resblocks.", "blocks."), ("ln_pre.", "norm_pre."),
                 ("ln_post.", "norm."), ("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.in_proj_", "attn.qkv."),
                 ("attn.out_proj.", "attn.proj."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def is_vit_key(name: str) -> bool:
    """Whether a (prefix-free) key names a ViT trunk tensor, in timm's, DINOv2's or CLIP's naming."""
    return _KEY.fullmatch(name) is not None or _CLIP_KEY.fullmatch(name) is not None


def is_vit_layout(named: Mapping[str, torch.Tensor]) -> bool:
    """Whether prefix-free tensors hold a ViT (timm / DINOv2 ``cls_token``, CLIP ``class_embedding``)."""
    return "cls_token" in named or "class_embedding" in named


def from_clip(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP image tower's tensors (``visual.`` prefix removed) under timm's ``vit_*_clip`` names: the class
    embedding becomes ``cls_token`` (1, 1, D), the position embedding gets its batch axis; ``proj`` keeps its name
    (it is no trunk key: the trunk's output is ``ln_post``'s, before the image-text projection)."""
    out = {}
    for key, value in named.items():
        if key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        else:
            for old, new in _CLIP_RENAMES:
                key = key.replace(old, new)
            out[key] = value
    return out


def to_timm_layout(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViT tensors under timm's names: CLIP image towers (:func:`from_clip`); DINOv2 hub state dicts
    (``register_tokens``, CLS position in ``pos_embed``) become timm's ``vit_*_reg4_dinov2`` layout (``reg_token``;
    the CLS position embedding folded into ``cls_token``, as timm's ``_convert_dinov2``), the SwiGLU MLPs' ``w12`` /
    ``w3`` become ``fc1`` / ``fc2``; ``mask_token`` (DINOv2, MAE) is left out."""
    if "class_embedding" in named:
        return from_clip(named)
    out = {_SWIGLU.sub(lambda m: f"{m[1]}.{_SWIGLU_NAMES[m[2]]}.", k): v for k, v in named.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out.pop("pos_embed")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def infer_arch(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The named ViT arch whose state-dict shapes equal these (timm-named) ones, or None."""
    if "cls_token" not in shapes or "patch_embed.proj.weight" not in shapes:
        return None
    from .trunks import trunk_state_shapes

    depth = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    dim, patch = shapes["cls_token"][-1], shapes["patch_embed.proj.weight"][-1]
    for arch, info in VIT_ARCHS.items():
        if (info["embed_dim"], info["depth"], info["patch"]) != (dim, depth, patch):
            continue
        ref = trunk_state_shapes(arch)
        if _signature(ref) == _signature(shapes) and ref["pos_embed"] == shapes.get("pos_embed", ref["pos_embed"]):
            return arch
    return None


def _signature(keys) -> tuple[bool, bool, bool]:
    """Register tokens, LayerScale, a norm before the blocks (CLIP): what tells the variants of one size and patch
    apart."""
    return "reg_token" in keys, "blocks.0.ls1.gamma" in keys, "norm_pre.weight" in keys
