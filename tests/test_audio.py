from __future__ import annotations

import numpy as np
from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

import pytest

from pipeline.core.audio import (
    MEL_CLAMP,
    N_MELS,
    SAMPLE_RATE,
    _hz_to_mel,
    _mel_to_hz,
    check_mel_bands,
    compare_audio,
    vocoder_log_mel,
    length_difference,
    log_mel,
    log_mel_distance,
    mel_cepstra,
    mel_cepstral_distortion,
    mel_filterbank,
    mel_spectrogram,
    sqnr_db,
)
from pipeline.core.errors import PipelineError


def tone(hz: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_tone_lands_in_the_band_centred_on_it():
    centres = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), N_MELS + 2))[1:-1]
    for hz in (300.0, 1000.0, 4000.0):
        mel = mel_spectrogram(tone(hz))
        # HiFi-GAN framing: pad (n_fft - hop) / 2 each side, no centring.
        assert mel.shape == (N_MELS, 1 + (SAMPLE_RATE + 768 - 1024) // 256)
        assert abs(int(np.argmax(mel.mean(axis=1))) - int(np.argmin(abs(centres - hz)))) <= 1


def test_filterbank_is_slaney_shaped():
    fb = mel_filterbank()
    assert fb.shape == (80, 513)
    assert (fb >= 0).all() and (fb.sum(axis=1) > 0).all()
    assert fb[:, 513 * 8000 // 11025 + 2:].max() == 0  # nothing above fmax = 8 kHz


def test_log_mel_distance_zero_for_identical_and_grows_with_noise():
    x = tone(440.0)
    rng = np.random.default_rng(0)
    assert log_mel_distance(x, x) == 0.0
    small = log_mel_distance(x, x + 1e-3 * rng.standard_normal(x.size).astype(np.float32))
    large = log_mel_distance(x, x + 1e-1 * rng.standard_normal(x.size).astype(np.float32))
    assert 0 < small < large


def test_sqnr_matches_onnxruntime_and_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(10_000).astype(np.float32)
    y = x + 0.01 * rng.standard_normal(10_000).astype(np.float32)
    ours = sqnr_db(x, y)
    ort = compute_signal_to_quantization_noice_ratio(x, y)
    by_hand = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x.astype(np.float64) - y) ** 2))
    assert abs(ours - ort) < 1e-3 and abs(ours - by_hand) < 1e-6
    assert 39 < ours < 41  # noise at 1% of the signal's RMS


def test_compare_audio_reports_length_difference():
    x = tone(440.0)
    same = compare_audio(x, x.copy())
    assert same.snr_db == float("inf") and same.length_diff == 0
    longer = compare_audio(x, np.concatenate([x, x[:2205]]))
    assert longer.snr_db is None
    assert abs(longer.length_diff - 0.1) < 1e-6
    # Same signal over the common part: only the edge frames differ.
    assert longer.log_mel_distance < 0.2 * log_mel_distance(x, tone(880.0))


def test_mcd_zero_for_identical_and_grows_with_noise():
    x = tone(440.0) + tone(1800.0)
    rng = np.random.default_rng(2)
    noise = rng.standard_normal(x.size).astype(np.float32)
    assert mel_cepstral_distortion(x, x) == 0.0
    steps = [mel_cepstral_distortion(x, x + level * noise) for level in (1e-4, 1e-3, 1e-2, 1e-1)]
    assert 0 < steps[0] and all(a < b for a, b in zip(steps, steps[1:]))
    assert compare_audio(x, x + 1e-2 * noise).mcd_db == steps[2]


def test_mcd_is_the_textbook_formula_on_dct_cepstra():
    x, y = tone(440.0), tone(660.0)
    a, b = log_mel(x), log_mel(y)
    dct = np.cos(np.pi * np.arange(25)[:, None] * (2 * np.arange(80)[None, :] + 1) / 160) * np.sqrt(2 / 80)
    np.testing.assert_allclose(mel_cepstra(a), (dct @ a)[1:], rtol=1e-6, atol=1e-6)
    by_hand = np.mean(10 / np.log(10) * np.sqrt(2 * np.sum(((dct @ a)[1:] - (dct @ b)[1:]) ** 2, axis=0)))
    assert abs(mel_cepstral_distortion(x, y) - by_hand) < 1e-6
    # A gain shifts every band's log equally, which is c0 alone: MCD leaves it out (broadband signal,
    # so the 1e-5 floor does not bend the shift).
    broadband = 0.1 * np.random.default_rng(4).standard_normal(SAMPLE_RATE).astype(np.float32)
    assert mel_cepstral_distortion(broadband, 2 * broadband) < 0.01 < mel_cepstral_distortion(x, y)


def test_length_difference_and_comparison_agree():
    x = tone(440.0)
    assert length_difference(x, x[: x.size // 2]) == -0.5
    assert compare_audio(x, x[: x.size // 2]).length_diff == -0.5


def test_vocoder_log_mel_is_the_clamped_log_magnitude_mel():
    x = np.concatenate([np.zeros(4096, np.float32), tone(440.0)])
    mel = vocoder_log_mel(x)
    assert mel.dtype == np.float32 and mel.shape == (N_MELS, x.size // 256)
    assert mel.min() == np.float32(np.log(MEL_CLAMP))  # digital silence hits the clamp, as in training
    np.testing.assert_allclose(np.exp(mel), np.maximum(mel_spectrogram(x), MEL_CLAMP), rtol=1e-5)
    with pytest.raises(PipelineError, match="22050 Hz"):
        vocoder_log_mel(x, sr=16000)


def test_check_mel_bands_names_the_expected_count():
    check_mel_bands(np.zeros((1, 80, 7)))
    with pytest.raises(PipelineError, match="has 100 bands; HiFi-GAN wants 80"):
        check_mel_bands(np.zeros((1, 100, 7)), "calibration sample 0")
