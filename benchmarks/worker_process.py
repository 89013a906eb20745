"""Benchmark workers in fresh processes: each variant timed alone, its result one JSON line on stdout."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path


def run_worker(cmd: list[str], cwd: Path, timeout_s: int) -> dict:
    """Run one worker command; the last JSON line it printed, or {"error": its last line}."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout_s} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        tail = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()] or [f"exit {res.returncode}"]
        return {"error": tail[-1][-300:]}
    return json.loads(lines[-1])
