"""Facts about this process that reports record."""
from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss
    across fork+exec, so a spawned child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_memory() -> None:
    """Collect cyclic garbage, then hand the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere
    nothing).

    Graph-surgeon graphs are cycles (a tensor knows its producers and consumers, they know it) that hold copies
    of the weights: Kokoro's compress_weights left 1.2 GB that only the cycle collector frees, and it may not run
    before the next peak. After a one-off build of many large protobufs and file buffers, glibc keeps the freed
    pages (its mmap threshold has grown past their size), so they would count against every later peak."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


# The extensions ONNX Runtime's and PyTorch's CPU kernels choose between (int8 GEMMs: VNNI, AMX; ARM: dot, i8mm).
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
                     "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")


def cpu_description() -> dict[str, object]:
    """The CPU model, its core count and the vector extensions it has, read from /proc/cpuinfo.

    Benchmarks print this: a speed-up measured on a CPU with AMX or VNNI does not hold on one without."""
    import os
    import platform

    first: dict[str, str] = {}  # the first processor's entries; the others repeat them
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            first.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = first.get("model name") or first.get("Hardware") or platform.processor() or platform.machine()
    if "cpu family" in first:  # a virtual machine may name only the brand ("AMD EPYC"): family/model tell the core
        model += f" (family {first['cpu family']}, model {first.get('model', '?')})"
    flags = set((first.get("flags") or first.get("Features") or "").split())
    return {"model": model, "arch": platform.machine(),
            "cpus": os.cpu_count() or 1, "extensions": [x for x in VECTOR_EXTENSIONS if x in flags]}


def machine_line() -> str:
    """One line naming this machine for a benchmark's output: CPU model, cores, vector extensions, runtimes."""
    import onnxruntime

    cpu = cpu_description()
    return (f"machine: {cpu['model']} ({cpu['arch']}, {cpu['cpus']} CPUs); vector extensions: "
            f"{', '.join(cpu['extensions']) or 'none found'}; onnxruntime {onnxruntime.__version__}")
