"""Sound for the video methods (pure functions of tensors, and one small network).

- :func:`power_spectrogram`, :func:`log_spectrogram`: the input of Look, Listen and Learn's audio subnetwork
  (a decibel spectrogram of 10 ms Hann windows every 5 ms, relative to each clip's maximum, floored at -80 dB);
- :func:`band_envelopes`, :func:`sound_statistics`: Ambient Sound's targets, a simplified texture summary in the
  spirit of McDermott & Simoncelli (2011): compressed mel-band envelopes (a stand-in for a cochleagram) and their
  means, spreads, cross-band correlations and modulation spectra;
- :class:`AudioNet`: L3-Net's audio subnetwork (conv-BN-ReLU blocks, global max pool);
- :func:`require_audio`: the one-line refusal of videos without sound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.errors import UserError


def stft_sizes(rate: int, window_s: float, hop_s: float) -> tuple[int, int, int]:
    """(n_fft, window, hop) in samples: window and hop rounded from seconds, n_fft the next power of two of the
    window (L3's 480-sample window at 48 kHz gets 512 bins, as its kapre layer's ``n_dft``)."""
    win, hop = max(1, round(window_s * rate)), max(1, round(hop_s * rate))
    return 1 << (win - 1).bit_length(), win, hop


def power_spectrogram(wave: torch.Tensor, rate: int, window_s: float, hop_s: float) -> torch.Tensor:
    """|STFT|^2 of (..., samples) audio: (..., n_fft // 2 + 1, frames). A periodic Hann window of ``window_s``
    centred in n_fft samples; frame m covers samples [m hop, m hop + n_fft) (no padding; a clip shorter than
    n_fft is zero-padded to one frame)."""
    n_fft, win, hop = stft_sizes(rate, window_s, hop_s)
    x = wave.reshape(-1, wave.shape[-1]).float()
    if x.shape[-1] < n_fft:
        x = F.pad(x, (0, n_fft - x.shape[-1]))
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=win, window=torch.hann_window(win, device=x.device),
                      center=False, return_complex=True)
    return spec.abs().pow(2).reshape(*wave.shape[:-1], *spec.shape[-2:])


def to_decibels(power: torch.Tensor, amin: float = 1e-10, dynamic_range: float = 80.0) -> torch.Tensor:
    """10 log10(max(power, amin)) minus each spectrogram's maximum (the last two dims), floored at
    -``dynamic_range`` (kapre's ``amplitude_to_decibel``, which L3's Keras models apply, per example)."""
    db = 10 * torch.log10(power.clamp_min(amin))
    return (db - db.amax(dim=(-2, -1), keepdim=True)).clamp_min(-dynamic_range)


def log_spectrogram(wave: torch.Tensor, rate: int, window_s: float = 0.01, hop_s: float = 0.005) -> torch.Tensor:
    """L3-Net's audio input (marl/l3embedding l3embedding/audio_model.py: 480-sample windows, hop 240, 512-point
    DFT at 48 kHz, decibels): (..., samples) -> (..., n_fft // 2 + 1, frames) in [-80, 0] dB."""
    return to_decibels(power_spectrogram(wave, rate, window_s, hop_s))


def mel_filterbank(n_bands: int, n_fft: int, rate: int, fmin: float = 0.0, fmax: float | None = None
                   ) -> torch.Tensor:
    """(n_bands, n_fft // 2 + 1) triangular filters on the FFT bins, centres equally spaced on the HTK mel scale
    (2595 log10(1 + f / 700)) between ``fmin`` and ``fmax`` (default: rate / 2), each 1 at its centre and 0 at
    its neighbours' centres."""
    fmax = rate / 2 if fmax is None else fmax

    def mel(f: float) -> float:
        return 2595 * math.log10(1 + f / 700)

    points = torch.linspace(mel(fmin), mel(fmax), n_bands + 2, dtype=torch.float64)
    hz = 700 * (10 ** (points / 2595) - 1)
    freqs = torch.linspace(0, rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, centre, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rise, fall = (freqs - lo) / (centre - lo), (hi - freqs) / (hi - centre)
    return torch.minimum(rise, fall).clamp_min(0).float()


def band_envelopes(wave: torch.Tensor, rate: int, n_bands: int = 32, window_s: float = 0.032, hop_s: float = 0.01,
                   compression: float = 0.3) -> torch.Tensor:
    """Compressed sub-band envelopes of (..., samples) audio: (..., n_bands, frames), one frame every ``hop_s``.
    Each band's amplitude is the square root of its mel filter's share of the power spectrogram, raised to
    ``compression`` (McDermott & Simoncelli's 0.3, the cochlea's compressive response)."""
    n_fft, _, _ = stft_sizes(rate, window_s, hop_s)
    power = power_spectrogram(wave, rate, window_s, hop_s)
    bank = mel_filterbank(n_bands, n_fft, rate).to(power.device)
    return torch.matmul(bank, power).clamp_min(0).sqrt().pow(compression)


def statistics_dim(n_bands: int, n_mod: int, corr_offsets: Sequence[int]) -> int:
    """Length of :func:`sound_statistics`' vector."""
    return 2 * n_bands + sum(n_bands - o for o in corr_offsets if o < n_bands) + n_bands * n_mod


def sound_statistics(env: torch.Tensor, env_rate: float, n_mod: int = 5, mod_low_hz: float = 1.0,
                     corr_offsets: Sequence[int] = (1, 2, 4, 8)) -> torch.Tensor:
    """A texture summary of band envelopes ``env`` (bands, frames) sampled at ``env_rate`` Hz, concatenated:

    - each band's mean and standard deviation over time;
    - the Pearson correlation of band b with band b + o for each offset o in ``corr_offsets`` (0 where a band
      is constant);
    - each band's modulation spectrum: the share of its envelope's power (one-sided periodogram of the
      mean-removed envelope, DC left out) in ``n_mod`` octave bands [f 2^k, f 2^(k + 1)) from f = ``mod_low_hz``
      (0 for a constant band), band-major.

    Float32 (:func:`statistics_dim`,)."""
    env = env.double()
    n_bands, frames = env.shape
    mean = env.mean(1)
    centred = env - mean[:, None]
    std = centred.pow(2).mean(1).sqrt()
    parts = [mean, std]
    for o in corr_offsets:
        if o < n_bands:
            cov, den = (centred[:-o] * centred[o:]).mean(1), std[:-o] * std[o:]
            parts.append(torch.where(den > 0, cov / den.clamp_min(1e-300), torch.zeros_like(cov)))
    power = torch.fft.rfft(centred, dim=1).abs().pow(2)[:, 1:]
    freqs = torch.arange(1, power.shape[1] + 1, dtype=torch.float64) * env_rate / frames
    total = power.sum(1)
    mods = []
    for k in range(n_mod):
        inside = (freqs >= mod_low_hz * 2 ** k) & (freqs < mod_low_hz * 2 ** (k + 1))
        band = power[:, inside].sum(1)
        mods.append(torch.where(total > 0, band / total.clamp_min(1e-300), torch.zeros_like(band)))
    parts.append(torch.stack(mods, 1).flatten())
    return torch.cat(parts).float()


class AudioNet(nn.Module):
    """L3-Net's audio subnetwork (marl/l3embedding l3embedding/audio_model.py, Arandjelović & Zisserman 2017):
    four blocks of two 3x3 conv-BN-ReLU layers with ``width`` x (1, 2, 4, 8) channels, a 2x2 max pool after each
    of the first three, a max pool over the whole remaining map after the last. (B, 1, freq, time) log-spectrogram
    -> (B, 8 width)."""

    def __init__(self, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for block, mult in enumerate((1, 2, 4, 8)):
            for _ in range(2):
                layers += [nn.Conv2d(c_in, width * mult, 3, padding=1), nn.BatchNorm2d(width * mult),
                           nn.ReLU(inplace=True)]
                c_in = width * mult
            if block < 3:
                layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.out_dim = 8 * width

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.features(spec).amax(dim=(2, 3))


def require_audio(method: str, data) -> None:
    """Refuse, in one line, a video reader whose videos have no sound (every video of the split must have it)."""
    silent = [i for i in range(len(data)) if not data.info(i).has_audio]
    if silent:
        raise UserError(f"method {method!r} learns from sound, but {len(silent)} of {len(data)} videos in "
                        f"{data.folder} have no audio stream (first: {data.info(silent[0]).path})")
