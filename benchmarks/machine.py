"""What the CPU benchmarks report about the machine and the process (imported by the scripts in this folder)."""

from __future__ import annotations

import os
from pathlib import Path
import platform
import resource


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe() -> str:
    import torch

    return f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}, Python {platform.python_version()}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
