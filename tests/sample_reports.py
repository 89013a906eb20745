"""Check reports as report.json holds them, written out here (tests/test_results.py, test_report_audio.py,
test_report_html.py)."""
from __future__ import annotations

# A report as the tool wrote it before families and typed results (trimmed to one block and one output):
# no "family", no audio "sample_rate". It must still load, and write back unchanged.
BEFORE_FAMILIES = {
    "schema": "tts-onnx-pipeline/check/1", "samples": 8, "reference": "en_US-joe-medium.onnx",
    "candidate": "piper_int8/final/en_US-joe-medium.onnx", "notes": [], "peak_rss_mb": 1184.3, "wall_s": 9.1,
    "blocks": [{
        "block": "/flow/flows.0", "params": 1182216, "bytes_reference": 4730000, "bytes_candidate": 1190000,
        "precision": {"fp32": 40, "int8": 16}, "weights": {"int8": 1180000}, "matched": True,
        "unmatched_tensors": [], "outputs": ["/flow/flows.0/Concat_output_0"],
        "isolated": {"sqnr_db": 33.4, "cosine": 0.9998, "max_abs": 0.31, "rel_l2": 0.021, "samples": 8,
                     "shape_mismatches": 0},
        "accumulated": {"sqnr_db": "inf", "cosine": 1.0, "max_abs": 0.0, "rel_l2": 0.0, "samples": 8,
                        "shape_mismatches": 0},
        "amplification": None}],
    "outputs": [{"name": "output", "sqnr_db": None, "cosine": 1.0, "max_abs": 0.0, "rel_l2": 0.0, "samples": 0,
                 "shape_mismatches": 8,
                 "audio": {"log_mel_mean": 0.081, "log_mel_max": 0.095, "mcd_db_mean": 4.36,
                           "length_diff_max_abs": 0.0, "samples_with_length_change": 0,
                           "note": "log-mel over the common length where lengths differ"}}],
    "key": "2e6f", "failures": [],
}


def blocks_report(count: int) -> dict:
    """A report of `count` blocks whose isolated SQNR is 100 - 3 * index: block 67 is the worst."""
    def block(i: int) -> dict:
        stats = {"sqnr_db": 100 - 3 * i, "cosine": 1.0, "max_abs": 0.1, "rel_l2": 0.01, "samples": 1,
                 "shape_mismatches": 0}
        return {"block": f"/b.{i}", "params": 10, "bytes_reference": 4096, "bytes_candidate": 1024,
                "precision": {"int8": 1}, "weights": {}, "matched": i != 3, "unmatched_tensors": [],
                "outputs": [], "isolated": stats, "accumulated": stats, "amplification": 1.0}
    return {"samples": 2, "reference": "r", "candidate": "c", "notes": [], "peak_rss_mb": 1.0, "wall_s": 1.0,
            "blocks": [block(i) for i in range(count)], "outputs": []}
