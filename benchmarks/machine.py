"""What the CPU benchmarks report about the machine and the process (imported by the scripts in this folder).

Machines here differ from one session to the next (Intel Xeons with AMX and native bf16, AMD EPYCs with AVX2 only,
where a bf16 matmul runs ~50x slower than float32), so every results file names the CPU and the flags that decide
which precision is fast.
"""

from __future__ import annotations

import os
from pathlib import Path
import platform
import resource

import sdpo  # noqa: F401 - before torch loads: sdpo's process settings (huge pages for large CPU tensors) apply here too

# The /proc/cpuinfo flags that decide the fast matmul paths: float32 vector width and native bf16 (AVX512-BF16, AMX).
PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> str:
    """The precision-relevant CPU flags present, and what torch makes of them (its kernel level, oneDNN bf16)."""
    import torch

    present = set((_cpuinfo_field("flags") or "").split())
    flags = " ".join(f for f in PRECISION_FLAGS if f in present) or "none of " + "/".join(PRECISION_FLAGS)
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return f"flags: {flags}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 {bf16}"


def describe() -> str:
    import torch

    cores = len(os.sched_getaffinity(0))
    return (f"{cpu_name()}, {cores} cores usable ({os.cpu_count()} logical), {cpu_flags()}, {huge_pages()}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def huge_pages() -> str:
    """Whether torch backs large CPU tensors with transparent huge pages (THP_MEM_ALLOC_ENABLE, set by `import sdpo`
    before torch) and what the kernel allows (madvise: on request; never: not at all)."""
    try:
        kernel = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        kernel = "unknown"
    return f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} (kernel THP: {kernel})"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
