"""Precision and threads chosen from the machine the run is on.

bfloat16 pays only where the hardware runs it natively. On a CPU without native bf16 (AVX2 only, no AVX512-BF16
or AMX) PyTorch falls back to a generic GEMM: on an AVX2-only AMD EPYC a bf16 matmul ran at 1.1 GFLOP/s against
57 GFLOP/s in float32, so there every forward, backward and vLLM step is about 50x slower in bf16.
`model.autocast_dtype=auto` and `rollout.vllm.dtype=auto` therefore resolve to bf16 only on CUDA devices with bf16
support and on CPUs with native bf16, and to float32 elsewhere; `resolve_precision` writes the concrete choice back
into the config, so the run's saved config.yaml records what actually ran.

Threads: vLLM's CPU worker replaces `torch.set_num_threads` with a no-op for the rest of the process once an
in-process engine is built (vllm/v1/worker/cpu_worker.py, 0.32), so `use_all_cores` calls torch's own function
(`torch._C.set_num_threads`), which the patch does not reach.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

from sdpo.hardware import BF16, FP32, Capabilities, auto_dtype, probe  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


def resolve_autocast(requested: str, caps: Capabilities | None = None) -> str:
    """A `model.autocast_dtype` with `auto` replaced: bfloat16 where native, else "none" (plain float32)."""
    if requested != "auto":
        return requested
    return BF16 if auto_dtype(caps or probe()) == BF16 else "none"


def slow_half_precision_warning(key: str, value: str, caps: Capabilities) -> str | None:
    """The warning for an explicit 16-bit dtype on a CPU that emulates it; None where it is fine."""
    if caps.device != "cpu" or caps.bf16 or value not in ("bfloat16", "float16"):
        return None
    return (f"{key}={value} on a CPU without native bf16 ({caps.isa}): PyTorch's fallback GEMM runs its matmuls "
            f"~50x slower than float32 on AVX2-only CPUs (1.1 vs 57 GFLOP/s measured on an AMD EPYC); use "
            f"{key}=auto (float32 here) unless you need {value}")


def resolve_precision(config, caps: Capabilities | None = None) -> list[str]:
    """Replace `auto` in `config.model.autocast_dtype` and `config.rollout.vllm.dtype` by concrete dtypes (in place).

    The engine's `auto` follows the trainer's compute dtype, so that sampler and trainer run the same precision
    (`model.autocast_dtype=none` alone forces float32 everywhere). Explicit values stay; an explicit 16-bit dtype on
    a CPU without native bf16 is kept with a warning. Returns the warnings (also logged). Idempotent.
    """
    caps = caps or probe()
    model, engine = config.model, config.rollout.vllm
    warnings = [slow_half_precision_warning("model.dtype", model.dtype, caps)]
    if model.autocast_dtype == "auto":
        model.autocast_dtype = resolve_autocast("auto", caps)
    else:
        warnings.append(slow_half_precision_warning("model.autocast_dtype", model.autocast_dtype, caps))
    if engine.dtype == "auto":
        engine.dtype = compute_dtype_name(config)
    elif runs_here_in_own_dtype(config.rollout):
        warnings.append(slow_half_precision_warning("rollout.vllm.dtype", engine.dtype, caps))
    warnings = [w for w in warnings if w]
    for warning in warnings:
        log.warning(warning)
    return warnings


def runs_here_in_own_dtype(rollout) -> bool:
    """Whether the rollout engine computes on this machine in its own precision (rollout.vllm.dtype)."""
    from sdpo.rollout import ENGINES

    engine = ENGINES.get(rollout.engine)
    return engine.own_dtype and not engine.out_of_process


def compute_dtype_name(config) -> str:
    """The dtype the trainer's matmuls run in (after `resolve_precision`), for the run header."""
    model = config.model
    return model.dtype if model.autocast_dtype == "none" else model.autocast_dtype


def allowed_cores() -> int:
    """The cores this process may run on, shared among the processes of this machine (torchrun's LOCAL_WORLD_SIZE)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def use_all_cores() -> int:
    """Set torch's intra-op threads to every allowed core, even after vLLM disabled `torch.set_num_threads`."""
    threads = allowed_cores()
    torch._C.set_num_threads(threads)
    return threads


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation instead of handing it back to the kernel.

    PyTorch's CPU allocator has no cache of its own, and glibc serves blocks above 128 KB-32 MB with a fresh mmap
    and trims the heap's free top: every large tensor of every step (logits chunks, the tied head's gradient and
    16-bit casts, activations) is mapped again and faulted in page by page, which the kernel zeroes first. With no
    trimming (up to 2 GB of free top kept) and no mmap, a step reuses the previous step's memory: in an A/B of the
    same bf16 update in fresh processes, 0.82x the wall time, 0.09x the kernel time, 0.01x the page faults
    (benchmarks/results/profile_step.md). The process keeps its peak heap (+6% peak RSS in the default run), as a
    training process mostly does anyway.
    Linux with glibc only (elsewhere, and with SDPO_KEEP_FREED_MEMORY=0, nothing changes); True if both were set."""
    if not sys.platform.startswith("linux") or os.environ.get("SDPO_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except AttributeError:  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_MAX, 0))
