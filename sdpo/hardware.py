"""The device the trainer runs on and what it computes natively (`probe`), for the choice of precision
(`sdpo.precision`) and the rollout engines' `auto` dtype. Imports nothing of the library."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# What `auto` resolves to, as config strings: the trainer's autocast dtype ("none": plain float32) and the engine's.
BF16, FP32 = "bfloat16", "float32"


@dataclass(frozen=True)
class Capabilities:
    """What the device that runs the model can do; `probe()` fills it in, tests build it by hand."""

    device: str  # "cuda" or "cpu"
    bf16: bool  # bf16 matmuls run natively (CUDA bf16 support; CPU: oneDNN bf16, AVX512-BF16 or AMX)
    isa: str  # CPU: torch's dispatch level ("AVX2", "AVX512", ...); CUDA: the device name

    @property
    def describe(self) -> str:
        native = "native bf16" if self.bf16 else "no native bf16"
        return f"{self.device} ({self.isa}, {native})"


def probe() -> Capabilities:
    """The capabilities of the device the trainer uses (the first CUDA device when there is one, else the CPU)."""
    if torch.cuda.is_available():
        return Capabilities("cuda", torch.cuda.is_bf16_supported(), torch.cuda.get_device_name())
    native = (
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
        or torch.cpu._is_avx512_bf16_supported()
        or torch.cpu._is_amx_tile_supported()
    )
    return Capabilities("cpu", bool(native), torch.backends.cpu.get_cpu_capability())


def auto_dtype(caps: Capabilities) -> str:
    """bf16 where the device runs it natively, float32 elsewhere."""
    return BF16 if caps.bf16 else FP32
