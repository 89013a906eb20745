"""Audio front end and audio metrics shared by bench, check and compare.

The mel matches HiFi-GAN's V1 config (22050 Hz, n_fft 1024, hop 256, win 1024,
80 bands, fmin 0, fmax 8000, magnitude spectrogram, Slaney mel filters), so a
log-mel distance means the same thing for a Piper voice and a vocoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 22050
N_FFT = 1024
HOP = 256
N_MELS = 80
FMIN = 0.0
FMAX = 8000.0
LOG_EPS = 1e-5


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    # Slaney scale: linear below 1 kHz, logarithmic above (librosa's htk=False).
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    mel = hz / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@lru_cache(maxsize=4)
def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """Slaney-normalized triangular mel filters, shape [n_mels, n_fft // 2 + 1]."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_pts = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2:n_mels + 2] - mel_pts[:n_mels]))[:, None]
    return weights.astype(np.float32)


def mel_spectrogram(audio: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Magnitude mel spectrogram [80, frames] of a mono waveform in [-1, 1]."""
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    pad = (N_FFT - HOP) // 2
    x = np.pad(x, (pad, pad), mode="reflect" if x.size > pad else "constant")
    if x.size < N_FFT:
        x = np.pad(x, (0, N_FFT - x.size))
    n_frames = 1 + (x.size - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(
        x, shape=(n_frames, N_FFT), strides=(x.strides[0] * HOP, x.strides[0]), writeable=False)
    spec = np.abs(np.fft.rfft(frames * np.hanning(N_FFT + 1)[:-1].astype(np.float32), axis=1))
    return (mel_filterbank(sr) @ spec.T).astype(np.float32)


def log_mel(audio: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    return np.log(mel_spectrogram(audio, sr) + LOG_EPS)


def log_mel_distance(reference: np.ndarray, candidate: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """Mean |log(mel_ref + 1e-5) - log(mel_cand + 1e-5)| over 80 bands.

    When the lengths differ, only the common leading frames are compared; the
    caller reports the length difference next to it (see `compare_audio`).
    """
    a, b = log_mel(reference, sr), log_mel(candidate, sr)
    n = min(a.shape[1], b.shape[1])
    return float(np.mean(np.abs(a[:, :n] - b[:, :n])))


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """20*log10(||x|| / ||x - y||), inf when identical."""
    x = np.asarray(reference, dtype=np.float64).ravel()
    y = np.asarray(candidate, dtype=np.float64).ravel()
    noise = np.linalg.norm(x - y)
    if noise == 0:
        return float("inf")
    return float(20 * np.log10(np.linalg.norm(x) / noise))


@dataclass
class AudioComparison:
    ref_samples: int
    cand_samples: int
    log_mel_distance: float
    snr_db: float | None  # only when lengths match

    @property
    def length_diff(self) -> float:
        """Relative length difference (candidate - reference) / reference."""
        return (self.cand_samples - self.ref_samples) / max(self.ref_samples, 1)


def compare_audio(reference: np.ndarray, candidate: np.ndarray, sr: int = SAMPLE_RATE) -> AudioComparison:
    ref = np.asarray(reference, dtype=np.float32).reshape(-1)
    cand = np.asarray(candidate, dtype=np.float32).reshape(-1)
    snr = sqnr_db(ref, cand) if ref.size == cand.size else None
    return AudioComparison(ref.size, cand.size, log_mel_distance(ref, cand, sr), snr)
