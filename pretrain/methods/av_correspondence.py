"""Audio-visual correspondence (Arandjelović & Zisserman, ICCV 2017, "Look, Listen and Learn"): does this frame
go with this sound?

Data (per example, ``AVPairSampler``; marl/l3embedding l3embedding/train.py ``sampler``, ``sample_one_second``,
``sample_one_frame``): the example's video gives the frame; with probability ``pos_fraction`` (0.5) the sound is
its own (label 1), else that of another video drawn uniformly (label 0). The sound is ``clip_s`` (1 s) starting at
a uniformly drawn sample of its track; the frame is drawn uniformly among the frames of that second
(``int(start * fps) + randrange(fps)``, clamped to the video), so a positive's frame and sound are simultaneous.

Network (l3embedding/audio_model.py, model.py): the trunk on the frame (its pooled embedding); the audio
subnetwork ``pretrain.audio.AudioNet`` (width ``audio_width``, L3's 64) on the decibel log-spectrogram of the
sound (10 ms windows every 5 ms); the two vectors concatenated, Linear(``fusion_dim`` 128) + ReLU + Linear(2),
softmax cross-entropy. Adam lr 1e-4 at batch 64, weight decay 1e-5 (l3embedding's ``train`` and the audio model's
L2 of 1e-5). Only the image trunk is the checkpoint; the audio branch stays in the resume state.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evalsuite.errors import UserError

from ..audio import AudioNet, log_spectrogram, require_audio, stft_sizes
from ..base import Batch, optim_config
from ..losses import classification_step
from ..video import VideoMethod, VideoSampler, read_frames


class AVPairSampler(VideoSampler):
    """A frame of the example's video and a sound clip: keys ``frames`` (3, S, S), ``audio`` (samples,) mono at
    the reader's rate, ``label`` (1: the clip is the frame's video's, at the frame's time), ``time`` the frame's
    index, ``audio_video`` the clip's video and ``audio_start`` its start (seconds)."""

    name = "av_pair"

    def __init__(self, image_size: int, clip_s: float = 1.0, pos_fraction: float = 0.5, crop_scale_min: float = 1.0,
                 flip: bool = False):
        super().__init__(image_size, crop_scale_min, flip)
        self.clip_s, self.pos_fraction = float(clip_s), float(pos_fraction)

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        info, rate = dataset.info(video), dataset.sample_rate
        positive = rng.random() < self.pos_fraction
        source = video
        if not positive:  # another video, uniformly
            source = int(rng.integers(len(dataset) - 1))
            source += source >= video
        n = round(self.clip_s * rate)
        first = int(rng.integers(max(0, round(dataset.info(source).duration * rate) - n) + 1))
        wave = dataset.audio(source, first / rate, (first + n) / rate).mean(0)
        start = first / rate
        k = min(int(start * info.fps) + int(rng.integers(max(1, round(self.clip_s * info.fps)))), info.num_frames - 1)
        return {"frames": self.crop(read_frames(dataset, video, [k]), rng)[0], "audio": wave,
                "label": torch.tensor(int(positive)), "time": torch.tensor(k), "audio_video": torch.tensor(source),
                "audio_start": torch.tensor(start, dtype=torch.float32)}

    def settings(self) -> dict:
        return {"clip_s": self.clip_s, "pos_fraction": self.pos_fraction}


class AVCorrespondence(VideoMethod):
    name = "av_correspondence"
    description = "Look, Listen and Learn: does this frame go with this 1 s of sound? (image trunk + audio CNN, " \
                  "fusion MLP, 2-way classifier)"
    data_kinds = ("video",)
    defaults = {"clip_s": 1.0, "pos_fraction": 0.5, "audio_width": 64, "fusion_dim": 128, "spec_window_s": 0.01,
                "spec_hop_s": 0.005, "crop_scale_min": 1.0, "flip": False}
    optim = optim_config("adam", lr=1e-4, weight_decay=1e-5, base_batch_size=64)
    short = {"hp": {"audio_width": 16, "crop_scale_min": 0.5, "flip": True}, "optim": {"lr": 5e-4}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        if not (hp["clip_s"] > 0 and 0.0 < hp["pos_fraction"] < 1.0 and hp["audio_width"] >= 1
                and hp["fusion_dim"] >= 1 and 0 < hp["spec_hop_s"] <= hp["spec_window_s"]):
            raise UserError("av_correspondence: needs clip_s > 0, 0 < pos_fraction < 1, audio_width and fusion_dim "
                            ">= 1, 0 < spec_hop_s <= spec_window_s")
        self.audio_net = AudioNet(hp["audio_width"])
        self.fusion = nn.Sequential(nn.Linear(self.feat_dim + self.audio_net.out_dim, hp["fusion_dim"]),
                                    nn.ReLU(inplace=True), nn.Linear(hp["fusion_dim"], 2))
        #: the reader's audio rate (set in on_train_start; the readers' default until then)
        self.sample_rate = 16000

    def sampler(self, image_size):
        hp = self.hp
        return AVPairSampler(image_size, hp["clip_s"], hp["pos_fraction"], hp["crop_scale_min"], hp["flip"])

    def on_train_start(self, trainer) -> None:
        require_audio(self.name, trainer.data)
        if len(trainer.data) < 2:
            raise UserError("av_correspondence needs at least 2 videos (a negative's sound comes from another one)")
        self.sample_rate = int(trainer.data.sample_rate)

    def spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, 1, freq, time) decibel log-spectrogram."""
        return log_spectrogram(audio, self.sample_rate, self.hp["spec_window_s"], self.hp["spec_hop_s"]).unsqueeze(1)

    def training_step(self, batch: Batch):
        frames, audio, labels = batch.extra["frames"], batch.extra["audio"], batch.extra["label"]
        fused = torch.cat([self.embed(frames), self.audio_net(self.spectrogram(audio)).float()], 1)
        return classification_step(self.fusion(fused), labels)

    def metadata(self) -> dict:
        hp = self.hp
        n_fft, win, hop = stft_sizes(self.sample_rate, hp["spec_window_s"], hp["spec_hop_s"])
        return {**super().metadata(), "av_correspondence": {
            "audio_rate": self.sample_rate, "spectrogram": {"n_fft": n_fft, "window": win, "hop": hop, "window_fn":
                                                            "hann", "scale": "dB re clip max, floor -80"},
            "audio_branch": f"AudioNet(width={hp['audio_width']}) -> {self.audio_net.out_dim}, not in the checkpoint"
                            " (the resume state holds it)"}}
