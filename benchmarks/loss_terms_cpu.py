"""Forward + backward time of the per-token loss terms (`sdpo.losses.chunked_response_terms`) on the CPU.

The shapes of the default CPU run's update (SmolLM2-135M-Instruct's hidden size and vocabulary, one micro-batch of
rollouts of 48 tokens): GRPO (student log-probs and entropy only), the advantage-level hybrid (plus the teacher's
sampled-token log-prob) and pure SDPO (plus top-100 distillation with a tail bucket, JSD alpha 0.5). Each row runs
with the response in one chunk (no recomputation) and with `--chunk` positions per chunk (activation checkpointing:
every chunk is recomputed in backward), so the cost of the recomputation shows.

    python benchmarks/loss_terms_cpu.py --results benchmarks/results/loss_terms_cpu.md
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import platform
import statistics
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sdpo.losses import chunked_response_terms  # noqa: E402

CASES = {
    "grpo": None,
    "hybrid (teacher log-prob)": {},
    "sdpo (top-100, tail, alpha 0.5)": {"mode": "topk_logits", "alpha": 0.5, "topk": 100, "tail": True},
}


def time_case(distill: dict | None, rows: int, length: int, hidden: int, vocab: int, chunk: int, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    student = torch.randn(rows, length, hidden, generator=gen, requires_grad=True)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    teacher = dict(teacher_features=[torch.randn(rows, length, hidden, generator=gen)], teacher_heads=[head],
                   teacher_weights=[1.0]) if distill is not None else {}
    seconds = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        terms = chunked_response_terms(student, head, ids, 1.0, chunk, **teacher, distill_kwargs=distill or None)
        loss = terms["logp"].sum() + (terms["distill"].sum() if "distill" in terms else 0.0)
        loss.backward()
        seconds.append(time.perf_counter() - start)
        student.grad = None
        head.weight.grad = None
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="rollouts per micro-batch (trainer.micro_batch_size)")
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk", type=int, default=16, help="positions per chunk in the checkpointed rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    lines = [
        "# Loss terms on the CPU: one chunk vs checkpointed chunks",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- shape: {args.rows} rollouts x {args.length} tokens, hidden {args.hidden}, vocabulary {args.vocab}; "
        f"forward + backward, median of {args.repeats} after a warm-up",
        "",
        f"| terms | one chunk (s) | chunks of {args.chunk}, checkpointed (s) | saved |",
        "|---|---|---|---|",
    ]
    for name, distill in CASES.items():
        whole = time_case(distill, args.rows, args.length, args.hidden, args.vocab, max(args.length, 1), args.repeats)
        chunked = time_case(distill, args.rows, args.length, args.hidden, args.vocab, args.chunk, args.repeats)
        lines.append(f"| {name} | {whole:.3f} | {chunked:.3f} | {100 * (1 - whole / chunked):.0f}% |")
        print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.results:
        Path(args.results).write_text(report)


if __name__ == "__main__":
    main()
