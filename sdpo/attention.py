"""The policy's attention: torch's scaled-dot-product attention, in float32 on a CPU under 16-bit autocast.

`model.attn_implementation=sdpa_cpu_float32` (the default) names `sdpa_cpu_float32`, registered here with
transformers' `AttentionInterface` (its public extension point: every model that dispatches through it picks it up),
with SDPA's masks. On a CPU with 16-bit query, key and value (bf16 autocast: the projections' outputs), it casts them
to float32 and runs SDPA there, outside autocast, then casts the output back. Why: torch's CPU flash-attention kernel
runs ~3x slower in bf16 than in float32 at the update's shapes, most of it in the backward
(benchmarks/results/attention_kernels_cpu.md: forward + backward of a [8, 9, 48 x 92, 64] call 10.9 ms in bf16, 3.8 ms
upcast; profile_step.md: 0.83x the time of a bf16 update), while the casts cost little (q, k, v are a small fraction
of the activations). Float32 attention is also the more exact of the two. Everywhere else (CUDA, float32 inputs) it is
plain SDPA: GPU bf16 kernels are the fast path there.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

CPU_FLOAT32_SDPA = "sdpa_cpu_float32"


def sdpa_cpu_float32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; 16-bit attention on a CPU computed in float32 (see the module docstring)."""
    # The dtype plain SDPA would compute in: autocast's, else the inputs' (a model loaded in bf16).
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    if query.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    # Autocast would cast the float32 inputs straight back (SDPA is on its lower-precision list). A nested disabled
    # region keeps the enclosing region's cache of weight casts (autocast clears it at the outermost exit only).
    with torch.autocast("cpu", enabled=False):
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                 **kwargs)
    return output.to(dtype), weights


AttentionInterface.register(CPU_FLOAT32_SDPA, sdpa_cpu_float32)
# SDPA's masks too: transformers builds no attention mask at all for an implementation its mask registry does not
# know (padding and a prompt cache's offset would go unmasked).
ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_FLOAT32_SDPA, sdpa_mask)
