"""calibration/kokoro_inputs.py: Kokoro-82M's real inputs as `.npz` feed folders, checked against kokoro-onnx.

The parity reference is kokoro-onnx 0.6.1 (dev extra): its Tokenizer for the token ids of every shipped sentence,
and its `Kokoro.create` for the whole feed (ids, the voice's style row, speed) through the real INT8 model.
"""
from __future__ import annotations

import json
import zipfile

import kokoro_onnx  # the parity reference (dev extra)
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibration import DATA_DIR, SourceContext, checked_feeds, read_sentences
from calibration.npz_folder import NpzFolder, NpzParams
from calibration.kokoro_inputs import (CALIB_FILE, EVAL_FILE, MODEL_FILE, VOICE, kokoro_data, load_vocab, load_voice,
                                       main, split_sentences, token_ids)
from pipeline.core.errors import PipelineError

SAMPLE_RATE = 24000  # kokoro-onnx's SAMPLE_RATE
N_CALIB, N_EVAL = 3, 2


@pytest.fixture(scope="module")
def tokenizer():
    from kokoro_onnx.tokenizer import Tokenizer

    return Tokenizer(vocab=load_vocab())


def reference_ids(tokenizer, text: str) -> list[int]:
    """kokoro-onnx's ids for a one-batch text: Tokenizer.phonemize, Kokoro.create's whitespace collapse, tokenize."""
    return tokenizer.tokenize(" ".join(tokenizer.phonemize(text, "en-us").split()))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One run of the script, as a user types it."""
    out = tmp_path_factory.mktemp("kokoro")
    assert main(["--out", str(out), "--calib", str(N_CALIB), "--eval", str(N_EVAL)]) == 0
    return out


def read_folder(folder) -> list[dict[str, np.ndarray]]:
    feeds = []
    for path in sorted(folder.glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            feeds.append({k: data[k] for k in data.files})
    return feeds


SHIPPED = read_sentences(DATA_DIR / CALIB_FILE) + read_sentences(DATA_DIR / EVAL_FILE)
# Beyond the shipped set: every clause mark, a mark opening the text, marks without a space, an apostrophe.
EXTRA = ["Wait; what? No: it's fine!", "...and then, silence.", "Yes,no?maybe", "Hello world"]


@pytest.mark.parametrize("text", SHIPPED + EXTRA)
def test_token_ids_equal_kokoro_onnx_tokenizer(tokenizer, text):
    assert token_ids(text, load_vocab()) == reference_ids(tokenizer, text)


def test_the_vocab_is_kokoro_onnx_own():
    from kokoro_onnx.config import DEFAULT_VOCAB

    assert load_vocab() == DEFAULT_VOCAB


@pytest.mark.parametrize("text", ['She said "hello".', "A dash \u2014 here.", "(aside) text"])
def test_marks_phonemizer_keeps_in_place_are_refused(text):
    with pytest.raises(PipelineError, match="marks"):
        token_ids(text, load_vocab())


def test_the_script_writes_named_npz_feeds_of_the_model_inputs(written):
    vocab_ids = set(json.loads(kokoro_data("vocab.json").read_text())["vocab"].values())
    voice = load_voice()
    assert (written / MODEL_FILE).is_file()
    for name, n in (("calib", N_CALIB), ("eval", N_EVAL)):
        folder = written / "feeds" / name
        assert sorted(p.name for p in folder.iterdir()) == [f"{i:04d}.npz" for i in range(n)]
        for feed in read_folder(folder):
            assert sorted(feed) == ["speed", "style", "tokens"]
            tokens, style, speed = feed["tokens"], feed["style"], feed["speed"]
            assert tokens.dtype == np.int64 and tokens.shape[0] == 1 and tokens.ndim == 2
            assert tokens[0, 0] == 0 and tokens[0, -1] == 0 and set(tokens[0, 1:-1].tolist()) <= vocab_ids
            assert style.dtype == np.float32 and style.shape == (1, 256)
            np.testing.assert_array_equal(style, voice[tokens.shape[1] - 2 - 1])  # n phonemes: row n - 1
            assert speed.dtype == np.float32 and speed.shape == (1,) and speed[0] == 1.0


def test_the_folders_hold_the_first_sentences_of_disjoint_files(written):
    calib, evals = split_sentences(N_CALIB, N_EVAL)
    assert not set(read_sentences(DATA_DIR / CALIB_FILE)) & set(read_sentences(DATA_DIR / EVAL_FILE))
    vocab = load_vocab()
    for name, texts in (("calib", calib), ("eval", evals)):
        got = [feed["tokens"][0, 1:-1].tolist() for feed in read_folder(written / "feeds" / name)]
        assert got == [token_ids(t, vocab) for t in texts]


def test_the_npz_source_reads_the_folders_as_the_model_inputs(written):
    model = onnx.load(str(written / MODEL_FILE))
    for name, n in (("calib", N_CALIB), ("eval", N_EVAL)):
        source = NpzFolder(NpzParams(folder=str(written / "feeds" / name)), SourceContext(written / MODEL_FILE))
        assert len(checked_feeds(source, model)) == n  # names, dtypes and ranks against the graph's inputs


def test_a_smaller_rerun_leaves_no_old_feeds(written, tmp_path):
    out = tmp_path / "k"
    (out / "feeds" / "calib").mkdir(parents=True)
    (out / MODEL_FILE).symlink_to(written / MODEL_FILE)  # no second 88 MiB join
    (out / "feeds" / "calib" / "0007.npz").write_bytes(b"old")
    assert main(["--out", str(out), "--calib", "2", "--eval", "1"]) == 0
    assert sorted(p.name for p in (out / "feeds" / "calib").iterdir()) == ["0000.npz", "0001.npz"]


def test_shared_sentences_are_refused(tmp_path):
    (tmp_path / CALIB_FILE).write_text("One sentence.\nTwo sentences.\n")
    (tmp_path / EVAL_FILE).write_text("Two sentences.\n")
    with pytest.raises(PipelineError, match="share 1 sentences"):
        split_sentences(1, 1, data_dir=tmp_path)


@pytest.mark.parametrize("args, message", [(["--calib", "0"], "give 1 to"), (["--eval", "999"], "give 1 to")])
def test_bad_counts_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main(["--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def session(written):
    return ort.InferenceSession(str(written / MODEL_FILE), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def eval_audio(written, session) -> np.ndarray:
    """The real INT8 model on the first written eval feed (about 5 s on 2 cores)."""
    (audio,) = session.run(["audio"], read_folder(written / "feeds" / "eval")[0])
    return audio


def test_the_int8_model_speaks_an_eval_feed(written, eval_audio):
    audio = eval_audio
    n = read_folder(written / "feeds" / "eval")[0]["tokens"].shape[1] - 2
    assert audio.ndim == 1 and audio.dtype == np.float32
    # English runs at about 10-20 phonemes a second: 0.02-0.2 s a phoneme is a loose bound (about 0.07 s here)
    assert 0.02 * SAMPLE_RATE * n < len(audio) < 0.2 * SAMPLE_RATE * n
    assert np.isfinite(audio).all() and np.sqrt(np.mean(audio**2)) > 0.01 and np.abs(audio).max() <= 1.5


def test_the_feed_is_what_kokoro_onnx_feeds_the_model(session, eval_audio):
    """kokoro-onnx's own pipeline on the same sentence, untrimmed, gives the same audio sample for sample: the same
    ids, style row and speed (the graph has no random op, so its output is a function of the feed)."""
    text = split_sentences(N_CALIB, N_EVAL)[1][0]
    kokoro = kokoro_onnx.Kokoro.from_session(session, str(kokoro_data("voices_ja.npz")))
    reference, rate = kokoro.create(text, VOICE, speed=1.0, lang="en-us", trim=False)
    assert rate == SAMPLE_RATE
    np.testing.assert_array_equal(eval_audio, reference)


def test_written_files_are_plain_npz(written):
    for path in (written / "feeds").rglob("*.npz"):
        assert zipfile.is_zipfile(path)
