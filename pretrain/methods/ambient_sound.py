"""Ambient sound (Owens, Wu, McDermott, Freeman & Torralba, ECCV 2016): predict from one frame a statistical
summary of the sound around it.

Targets (``on_train_start``: one pass over the training videos' sound; the paper released no code and its
statistics are simplified here, docs/pretraining.md): each video's sound is cut into windows of ``window_s``
seconds (the paper's 3.75 s), one centred on every ``hop_s`` seconds of video (shifted to fit inside it; the whole
track when it is shorter). A window is summarised by ``pretrain.audio.sound_statistics`` of its ``n_bands``
compressed mel-band envelopes (a stand-in for the paper's McDermott-Simoncelli cochleagram statistics: band means
and spreads, cross-band correlations, octave modulation spectra); each statistic is standardised over all windows;
then, ``target``:

- ``clusters``: k-means (Lloyd, ``kmeans_iters``, seeded) into ``n_clusters`` (the paper's 30); the frame's class
  is its window's cluster, cross-entropy;
- ``binary``: the signs of the projections on the top ``n_bits`` principal components (the paper's binary-coding
  variant predicts 30 bits), one logistic loss per bit (``pretrain.losses.bit_prediction_loss``).

Data (``SoundFrameSampler``): one frame drawn uniformly; its target is that of the window centred nearest its
time. Network: the trunk's pooled embedding and a linear layer to the targets.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from evalsuite.console import note
from evalsuite.errors import UserError

from ..audio import band_envelopes, require_audio, sound_statistics, stft_sizes
from ..base import Batch, optim_config
from ..losses import bit_prediction_loss, classification_step
from ..video import VideoMethod, VideoSampler, read_frames
from .kmeans_init import kmeans

#: the band-envelope analysis (32 ms Hann windows every 10 ms: a 100 Hz envelope) and its summary
ENVELOPE_WINDOW_S, ENVELOPE_HOP_S = 0.032, 0.01
CORR_OFFSETS = (1, 2, 4, 8)


def sound_windows(duration: float, window_s: float, hop_s: float) -> np.ndarray:
    """(n, 2) [start, end] seconds of the windows of a track of ``duration`` s: one centred on (j + 1/2) hop_s for
    j < ceil(duration / hop_s), shifted to lie inside [0, duration]; the whole track when it is shorter."""
    n = max(1, math.ceil(duration / hop_s - 1e-9))
    if window_s >= duration:
        return np.tile([0.0, duration], (n, 1))
    start = np.clip((np.arange(n) + 0.5) * hop_s - window_s / 2, 0.0, duration - window_s)
    return np.stack([start, start + window_s], 1)


def frame_windows(num_frames: int, fps: float, hop_s: float, n_windows: int) -> np.ndarray:
    """The window (of :func:`sound_windows`) whose centre is nearest each frame's time k / fps: (num_frames,)."""
    return np.minimum((np.arange(num_frames) / fps / hop_s).astype(np.int64), n_windows - 1)


def envelope_frames(t0: float, t1: float, rate: int, n_fft: int, hop: int, n_frames: int) -> slice:
    """The envelope frames (frame m covers samples [m hop, m hop + n_fft)) lying inside [t0, t1] seconds; at
    least the one starting nearest t0 when none fits."""
    lo = min(n_frames - 1, math.ceil(t0 * rate / hop - 1e-9))
    hi = max(lo + 1, min(n_frames, math.floor((t1 * rate - n_fft) / hop + 1e-9) + 1))
    return slice(lo, hi)


class SoundFrameSampler(VideoSampler):
    """One frame: key ``frames`` (3, S, S) and ``time`` its index (the method looks its sound target up)."""

    name = "sound_frame"

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        k = int(rng.integers(dataset.info(video).num_frames))
        return {"frames": self.crop(read_frames(dataset, video, [k]), rng)[0], "time": torch.tensor(k)}


class AmbientSound(VideoMethod):
    name = "ambient_sound"
    description = "ambient sound: predict the k-means cluster (or binary code) of the sound statistics around a " \
                  "frame from the frame alone"
    data_kinds = ("video",)
    defaults = {"target": "clusters", "n_clusters": 30, "n_bits": 30, "window_s": 3.75, "hop_s": 0.5,
                "n_bands": 32, "n_mod": 5, "mod_low_hz": 1.0, "kmeans_iters": 20, "crop_scale_min": 1.0,
                "flip": False}
    optim = optim_config("sgd", lr=0.01, weight_decay=5e-4, base_batch_size=128)
    #: the synthetic videos run 3 s: 1 s windows give each frame its own sound; fewer clusters for a few hundred
    #: windows
    short = {"hp": {"n_clusters": 8, "n_bits": 8, "window_s": 1.0, "crop_scale_min": 0.5, "flip": True},
             "optim": {"lr": 0.05}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        if hp["target"] not in ("clusters", "binary"):
            raise UserError("ambient_sound: target must be clusters or binary")
        if min(hp["n_clusters"], hp["n_bits"], hp["n_bands"], hp["kmeans_iters"]) < 1 or hp["n_mod"] < 0 \
                or min(hp["window_s"], hp["hop_s"], hp["mod_low_hz"]) <= 0:
            raise UserError("ambient_sound: n_clusters, n_bits, n_bands, kmeans_iters must be >= 1, n_mod >= 0, "
                            "window_s, hop_s, mod_low_hz > 0")
        outputs = hp["n_clusters"] if hp["target"] == "clusters" else hp["n_bits"]
        self.classifier = nn.Linear(self.feat_dim, outputs)
        #: (videos, max frames) cluster of each frame's sound, or (videos, max frames, bits); on_train_start
        self.targets: torch.Tensor | None = None
        self.summary: dict = {}

    def sampler(self, image_size):
        return SoundFrameSampler(image_size, self.hp["crop_scale_min"], self.hp["flip"])

    def window_statistics(self, data, video: int) -> tuple[torch.Tensor, np.ndarray]:
        """(windows, statistics) of one video's sound and each frame's window."""
        hp, info = self.hp, data.info(video)
        wave = data.audio(video, 0.0, info.duration).mean(0)
        rate = data.sample_rate
        n_fft, _, hop = stft_sizes(rate, ENVELOPE_WINDOW_S, ENVELOPE_HOP_S)
        env = band_envelopes(wave, rate, hp["n_bands"], ENVELOPE_WINDOW_S, ENVELOPE_HOP_S)
        windows = sound_windows(info.duration, hp["window_s"], hp["hop_s"])
        stats = torch.stack([
            sound_statistics(env[:, envelope_frames(t0, t1, rate, n_fft, hop, env.shape[1])], rate / hop,
                             hp["n_mod"], hp["mod_low_hz"], CORR_OFFSETS) for t0, t1 in windows])
        return stats, frame_windows(info.num_frames, info.fps, hp["hop_s"], len(windows))

    @torch.no_grad()
    def on_train_start(self, trainer) -> None:
        hp, data = self.hp, trainer.data
        require_audio(self.name, data)
        start = time.perf_counter()
        per_video = [self.window_statistics(data, v) for v in range(trainer.n_images)]
        stats = torch.cat([s for s, _ in per_video])
        stats = (stats - stats.mean(0)) / stats.std(0, unbiased=False).clamp_min(1e-8)
        if hp["target"] == "clusters":
            k = min(hp["n_clusters"], stats.shape[0])
            centroids = kmeans(stats, k, hp["kmeans_iters"], torch.Generator().manual_seed(self.seed))
            codes = torch.cdist(stats, centroids).argmin(1)
            found = {"clusters": k, "cluster_sizes": torch.bincount(codes, minlength=k).tolist()}
        else:
            _, _, vh = torch.linalg.svd(stats, full_matrices=False)
            bits = min(hp["n_bits"], vh.shape[0])
            codes = (stats @ vh[:bits].t() > 0).long()
            codes = torch.cat([codes, codes.new_zeros(codes.shape[0], hp["n_bits"] - bits)], 1)
            found = {"bits": bits, "bit_means": [round(float(m), 4) for m in codes[:, :bits].float().mean(0)]}
        max_frames = max(len(f) for _, f in per_video)
        table = codes.new_zeros((len(per_video), max_frames, *codes.shape[1:]))
        first = 0
        for v, (s, frames) in enumerate(per_video):
            table[v, :len(frames)] = codes[first + torch.from_numpy(frames)]
            first += len(s)
        self.targets = table.to(next(self.parameters()).device)
        self.summary = {"windows": stats.shape[0], "statistics_dim": stats.shape[1], **found,
                        "seconds": round(time.perf_counter() - start, 2)}
        if trainer.rank == 0:
            note(f"ambient_sound: {stats.shape[0]} sound windows of {trainer.n_images} videos, "
                 f"{stats.shape[1]}-d statistics -> {found.get('clusters', found.get('bits'))} "
                 f"{'clusters' if hp['target'] == 'clusters' else 'bits'}")

    def training_step(self, batch: Batch):
        if self.targets is None:
            raise UserError("ambient_sound: the sound targets are computed in on_train_start")
        target = self.targets[batch.index, batch.extra["time"]]
        logits = self.classifier(self.embed(batch.extra["frames"]))
        if self.hp["target"] == "clusters":
            return classification_step(logits, target)
        return bit_prediction_loss(logits, target)

    def metadata(self) -> dict:
        return {**super().metadata(), "ambient_sound": {
            **self.summary, "envelopes": {"window_s": ENVELOPE_WINDOW_S, "hop_s": ENVELOPE_HOP_S, "compression": 0.3,
                                          "bands": "HTK mel, 0 Hz to Nyquist"},
            "statistics": ["band mean", "band std", f"band correlations at offsets {list(CORR_OFFSETS)}",
                           "modulation power share in octave bands"]}}
