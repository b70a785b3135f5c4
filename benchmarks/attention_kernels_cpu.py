"""One attention call's forward + backward on this CPU at the update's shapes, per way of computing it.

Why `model.attn_implementation=sdpa_cpu_float32` is the default (sdpo/attention.py): under bf16 autocast, torch's
SDPA runs its bf16 CPU flash kernel, whose backward is several times slower than the float32 kernel's. Shapes are
those of the default CPU workload's update (SmolLM2-135M: 9 query heads, 3 key/value heads, head dim 64; a
micro-batch of 8 responses of 48 tokens continuing a 44-token prompt cache, and whole 92-token sequences).

    python benchmarks/attention_kernels_cpu.py --results benchmarks/results/attention_kernels_cpu.md
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
import shlex
import statistics
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import machine  # first: it imports sdpo before torch

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BATCH, HEADS, HEAD_DIM = 8, 9, 64
SHAPES = {"48 response tokens on a 92-token cache": (48, 92), "92-token sequences": (92, 92)}


def attention_fns(mask: torch.Tensor) -> dict[str, tuple[torch.dtype, Callable]]:
    """label -> (input dtype, q, k, v -> output in the input dtype)."""
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q, k, v)

    def upcast(q, k, v):  # what sdpa_cpu_float32 does
        return sdpa(q.float(), k.float(), v.float()).to(q.dtype)

    def eager(q, k, v):  # scores materialised: [B, H, Lq, Lk]
        scores = (q @ k.transpose(-1, -2)) * HEAD_DIM**-0.5
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), -1).to(q.dtype)
        return weights @ v

    return {"float32 SDPA (flash kernel)": (torch.float32, sdpa), "bf16 SDPA (flash kernel)": (torch.bfloat16, sdpa),
            "bf16 SDPA, math backend": (torch.bfloat16, math),
            "bf16 inputs, SDPA in float32 (sdpa_cpu_float32)": (torch.bfloat16, upcast),
            "bf16 eager (matmul, float32 softmax)": (torch.bfloat16, eager)}


def forward_backward_ms(fn: Callable, dtype: torch.dtype, lq: int, lk: int, repeats: int) -> float:
    q = torch.randn(BATCH, HEADS, lq, HEAD_DIM, dtype=dtype, requires_grad=True)
    k = torch.randn(BATCH, HEADS, lk, HEAD_DIM, dtype=dtype, requires_grad=True)
    v = torch.randn(BATCH, HEADS, lk, HEAD_DIM, dtype=dtype, requires_grad=True)
    grad = torch.randn(BATCH, HEADS, lq, HEAD_DIM, dtype=dtype)
    times = []
    for i in range(repeats + 3):  # 3 warm-up calls
        start = time.perf_counter()
        fn(q, k, v).backward(grad)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--results", default=None, help="markdown file to write")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = {}
    for shape, (lq, lk) in SHAPES.items():
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)  # causal, offset by the cache
        for label, (dtype, fn) in attention_fns(mask).items():
            if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                continue
            rows.setdefault(label, {})[shape] = forward_backward_ms(fn, dtype, lq, lk, args.repeats)
    command = shlex.join(["python", "benchmarks/attention_kernels_cpu.py", *sys.argv[1:]])
    lines = ["# One attention call, forward + backward, on the CPU", "", f"Machine: {machine.describe()}", "",
             f"Command: `{command}`", "",
             (f"[{BATCH}, {HEADS} heads, Lq x Lk, {HEAD_DIM}], causal mask; median of {args.repeats} calls after 3 "
              "warm-up calls, milliseconds:"), "",
             "| attention | " + " | ".join(SHAPES) + " |", "|---|" + "---|" * len(SHAPES)]
    lines += [f"| {label} | " + " | ".join(f"{ms:.2f}" for ms in by_shape.values()) + " |" for label, by_shape in rows.items()]
    text = "\n".join([*lines, ""])
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
