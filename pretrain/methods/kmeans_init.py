"""Data-dependent k-means initialisation (Krähenbühl, Doersch, Donahue & Darrell, ICLR 2016; philkr/magic_init,
``magic_init.py -t kmeans``): a baseline that writes a checkpoint without any gradient step. Layer by layer in
forward order, every convolution's filters are k-means centroids of its input patches, whitened, then the layer
is rescaled so that its outputs have unit variance on the data.

Per convolution (the patches of its input, computed by the already-initialised layers below it, on ``images``
training images, centre views):

1. patches: the conv's receptive fields (its kernel, stride, padding and dilation; ``F.unfold``), at most
   ``max_patches`` of them drawn uniformly; centred per dimension;
2. whitening (magic_init.py initializeWeight): eigendecomposition of the patches' scatter matrix D^T D, the top
   ``out_channels`` eigenpairs kept, eigenvalues below 1e-6 zeroed, the others mapped to 1 / sqrt(s + 1e-3);
   whitened patches D V S, each row L2-normalised;
3. k-means with ``out_channels`` clusters on them (Lloyd's algorithm, ``kmeans_iters`` iterations from distinct
   random patches; :func:`kmeans`); the filters are the centroids mapped back, C S V^T, each divided by the std of
   its responses to the centred patches. Fewer patches than filters: Gaussian random filters (the reference's
   fallback);
4. rescaling (initializeLayer): the conv's outputs on the images have per-channel mean mu and std sigma; the
   weights are divided by sigma. The reference then sets the bias to -mu / sigma + ``bias``; our convolutions
   have no bias and feed a BatchNorm, so that BN gets running_mean = mu / sigma, running_var = 1, weight 1 and
   bias ``bias``: in eval mode (how the suite extracts features) each BN output then has mean ``bias`` and
   variance 1 / (1 + eps) on these images, as the reference's pre-activations do.

Deviations (recorded in the checkpoint's ``kmeans_init`` metadata and docs/pretraining.md): the reference gathers
its data as responses to random Gaussian filters (Caffe's convolution does the patch extraction) and whitens in
that projected space; we whiten the patches themselves (the same when the kept components span the patches).
It clusters with scikit-learn's MiniBatchKMeans; we run full-batch Lloyd on the device. Residual additions,
max-pool and the shortcut convolutions are handled as the forward pass gives them (the reference supports plain
feed-forward Caffe nets); its optional between-layer gradient calibration (``-cs``) is not applied. Convolutional
trunks whose every conv is followed by a BatchNorm (the ResNets) only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.trunks import arch_info

from ..base import Method

#: images per forward/unfold chunk while gathering patches and output statistics
CHUNK = 16


class _Captured(Exception):
    """Stops the forward pass once the wanted conv's input is captured."""


def whiten(patches: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """magic_init.py's whitening of centred patches (n, d): (whitened rows L2-normalised (n, r), V (d, r), the
    diagonal of S (r,)), keeping the top r = min(n_out, d) eigenpairs of D^T D."""
    d = patches.double()
    s, v = torch.linalg.eigh(d.t() @ d)  # ascending
    keep = min(n_out, d.shape[1])
    s, v = s[-keep:], v[:, -keep:]
    scale = torch.where(s < 1e-6, torch.zeros_like(s), 1.0 / torch.sqrt(s.clamp_min(0) + 1e-3))
    w = d @ v * scale
    return F.normalize(w, dim=1), v, scale


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means on (n, d) rows, started from ``k`` distinct random rows: the (k, d) centroids. A cluster
    that empties keeps its previous centroid."""
    c = x[torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
    return c


def kmeans_filters(patches: torch.Tensor, n_out: int, iters: int = 20,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, str]:
    """(n_out, d) filters from (n, d) input patches (steps 1-3 of the module docstring) and how they were made
    ("kmeans", or "random" when there are fewer patches than filters)."""
    generator = generator or torch.Generator().manual_seed(0)
    d = patches.double()
    if d.shape[0] < n_out:
        return torch.randn(n_out, d.shape[1], generator=generator, dtype=torch.float64).to(d.device), "random"
    d = d - d.mean(0, keepdim=True)
    wd, v, scale = whiten(d, n_out)
    centroids = kmeans(wd, n_out, iters, generator)
    filters = centroids * scale @ v.t()
    return filters / (d @ filters.t()).std(0, unbiased=False)[:, None].clamp_min(1e-12), "kmeans"


def conv_bn_pairs(trunk: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """Every conv of the trunk in registration (= forward) order with the BatchNorm registered right after it."""
    mods = list(trunk.named_modules())
    pairs = []
    for i, (name, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = mods[i + 1][1] if i + 1 < len(mods) else None
            if not isinstance(nxt, nn.BatchNorm2d):
                from evalsuite.errors import UserError

                raise UserError(f"kmeans_init: conv {name} of {trunk.arch} is not followed by a BatchNorm")
            pairs.append((name, m, nxt))
    return pairs


class KMeansInit(Method):
    name = "kmeans_init"
    description = "k-means data-dependent init (Krähenbühl et al.): whitened-patch k-means filters, unit-variance " \
                  "layers, no gradient step"
    defaults = {"images": 160, "max_patches": 50000, "kmeans_iters": 20, "bias": 0.1}
    n_views = 1
    augment = "center"
    trains = False  # the trainer calls on_train_start, then writes the checkpoint (steps 0)

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if arch_info(arch)["family"] != "resnet":
            from evalsuite.errors import UserError

            raise UserError(f"kmeans_init supports the ResNet trunks (conv + BatchNorm), not {arch}")
        self.report: dict[str, str] = {}

    def on_train_start(self, trainer) -> None:
        """The whole initialisation (``trains = False``: no gradient step follows)."""
        ds = trainer.dataset
        g = torch.Generator().manual_seed(self.seed)
        picks = torch.randperm(len(ds), generator=g)[: self.hp["images"]].tolist()
        images = trainer.to_input(torch.stack([ds[i][0][0] for i in picks]))
        self.initialise(images, g)

    @torch.no_grad()
    def initialise(self, images: torch.Tensor, generator: torch.Generator) -> None:
        was = self.trunk.training
        self.trunk.eval()
        last = self.trunk.tap_names[-1]
        try:
            for name, conv, bn in conv_bn_pairs(self.trunk):
                x = self._conv_input(conv, images, last)
                self.report[name] = self._init_conv(conv, bn, x, generator)
        finally:
            self.trunk.train(was)

    def _conv_input(self, conv: nn.Conv2d, images: torch.Tensor, last_tap: str) -> torch.Tensor:
        """The conv's input on every image: the trunk's forward, stopped at the conv, a chunk at a time."""
        box = []

        def grab(_module, args):
            box.append(args[0].float())
            raise _Captured

        handle = conv.register_forward_pre_hook(grab)
        try:
            for chunk in images.split(CHUNK):
                try:
                    self.trunk(chunk, [last_tap])
                except _Captured:
                    pass
        finally:
            handle.remove()
        return torch.cat(box)

    def _init_conv(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, generator: torch.Generator) -> str:
        filters, how = kmeans_filters(self._patches(conv, x, generator), conv.out_channels, self.hp["kmeans_iters"],
                                      generator)
        conv.weight.copy_(filters.reshape(conv.weight.shape).to(conv.weight))
        total, count = torch.zeros(2, conv.out_channels, dtype=torch.float64, device=x.device), 0
        for chunk in x.split(CHUNK):  # per-channel sum and sum of squares of the outputs
            y = conv(chunk).double()
            total += torch.stack([y.sum(dim=(0, 2, 3)), y.pow(2).sum(dim=(0, 2, 3))])
            count += y.numel() // y.shape[1]
        mu = total[0] / count
        sigma = (total[1] / count - mu**2).clamp_min(1e-24).sqrt()
        conv.weight.div_(sigma.to(conv.weight)[:, None, None, None])
        bn.running_mean.copy_(mu / sigma)
        bn.running_var.fill_(1.0)
        bn.weight.fill_(1.0)
        bn.bias.fill_(self.hp["bias"])
        return how

    def _patches(self, conv: nn.Conv2d, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """At most ``max_patches`` of the conv's (C * kh * kw)-long input patches (the weight's layout), drawn
        uniformly over images and positions (unfolded a chunk of images at a time)."""
        n_pos = F.unfold(x[:1], conv.kernel_size, conv.dilation, conv.padding, conv.stride).shape[-1]
        total = x.shape[0] * n_pos
        keep = torch.arange(total) if total <= self.hp["max_patches"] else \
            torch.randperm(total, generator=generator)[: self.hp["max_patches"]].sort().values
        out = []
        for start in range(0, x.shape[0], CHUNK):
            cols = F.unfold(x[start:start + CHUNK], conv.kernel_size, conv.dilation, conv.padding, conv.stride)
            cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            lo = start * n_pos
            mine = keep[(keep >= lo) & (keep < lo + cols.shape[0])] - lo
            out.append(cols[mine.to(cols.device)])
        return torch.cat(out)

    def metadata(self):
        return {**super().metadata(), "kmeans_init": {
            "layers": dict(self.report), "whitening": "patch space (reference: random-projection space)",
            "kmeans": "full-batch Lloyd (reference: MiniBatchKMeans)", "rescale": "conv / sigma, BN running stats",
            "gradient_calibration": False}}
