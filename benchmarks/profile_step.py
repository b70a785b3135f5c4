"""Where one default training step's time goes: per stage, and inside the update per part, with the update's model
FLOPs utilisation against the matmul throughput this machine achieves in the model's shapes.

    python benchmarks/profile_step.py --steps 4 --results benchmarks/results/profile_step.md

Each precision (float32: `model.autocast_dtype=none`; bf16: `model.autocast_dtype=bfloat16`, measured only where the
CPU runs bf16 natively) runs in its own process, on the default run's workload (configs/experiment/cpu.yaml:
SmolLM2-135M-Instruct, 8 questions x 4 rollouts, 48 new tokens, lambda = 0.9 hybrid, the vLLM engine). The first step
warms up and is not counted; the table gives the median of the others.

Inside the update, the trainer's own stage timer (exclusive nesting, `sdpo.tracking.StageTimer`) is wrapped around
the calls `micro_batch_loss` and `optimizer_step` make, so every second of the step lands in exactly one row:
student forward (the transformer body up to the final hidden states), head and loss terms (`chunked_response_terms`:
the student's and the teacher's vocabulary projections, log-softmax, entropy, distillation), objective, backward,
optimizer (clip + AdamW), EMA (the teacher's lerp), and "update (rest)" (batch assembly, masks, metric sums).

`--colocation ROUNDS` answers a different question: the same update (same batch, same weights) replayed in processes
without a vLLM engine, with one built in-process (vLLM's CPU worker binds the whole process's memory to a NUMA
node), with that binding undone, and with the binding alone, in turn. `--shared-prompts`: the same update with
trainer.share_prompts off and with each thing it shares added in turn (`SHARING`), alternating. `--op-profile`: one
replayed update under torch.profiler, its top operators by input shape. `--cast-once`: the update with
trainer.learner.cast_weights_once off, on for the policy's casts, on for the teacher copy's too, in turn. `--attention`: the
update with attn_implementation sdpa and sdpa_cpu_float32, in turn. `--huge-pages ROUNDS`: the same update replayed
in processes with THP_MEM_ALLOC_ENABLE=0 and =1 (transparent huge pages for torch's large CPU tensors, which `import
sdpo` turns on), the two alternating for ROUNDS rounds. `--malloc ROUNDS`: the same in processes with glibc's malloc
defaults (SDPO_KEEP_FREED_MEMORY=0) and with the trainer keeping freed memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from benchmarks import machine  # first: it imports sdpo before torch

import torch

from benchmarks.profile_parts import (  # noqa: E402
    PRECISIONS,
    STAGES,
    UPDATE_PARTS,
    force_length,
    median_and_range,
    profile_one,
)
from benchmarks.profile_variants import (  # noqa: E402
    ATTENTION,
    CAST_ONCE,
    COLOCATION,
    HUGE_PAGES,
    MALLOC,
    PROCESS_SETUPS,
    ab_report,
    in_process_ab,
    op_profile,
    process_ab,
    replay_times,
    shared_prompts_ab,
    shared_prompts_report,
)


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def report(results: dict[str, dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# One default training step, profiled",
        "",
        f"Machine: {machine.describe()}",
        "",
        f"Command: `{command}`",
        "",
        "Workload: the default run (configs/experiment/cpu.yaml: SmolLM2-135M-Instruct, 8 questions x 4 rollouts, at most "
        "48 new tokens, lambda = 0.9 hybrid with the EMA teacher, vLLM engine in-process, one optimizer step of 4 "
        f"micro-batches of 8), no evaluation; median of {args.steps} steps after one warm-up step. Each precision "
        f"ran in its own process. Overrides on top: {' '.join(args.extra) or 'none'}"
        f"{'; every rollout forced to rollout.max_new_tokens' if args.force_length else ''}.",
        "",
        "## Per stage and inside the update (seconds per step, median)",
        "",
        "| | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    rows = {name: r["steps"] for name, r in results.items()}
    for stage in STAGES:
        lines.append(f"| {stage} | " + " | ".join(f"{median(rows[n], f'time/{stage}'):.3f}" for n in results) + " |")
    for part in UPDATE_PARTS:
        lines.append(f"| update: {part} | " + " | ".join(f"{median(rows[n], f'time/{part}'):.3f}" for n in results) + " |")
    lines.append("| **step (wall)** | " + " | ".join(f"**{median(rows[n], 'wall'):.2f}**" for n in results) + " |")
    lines.append("| response tokens / step | " + " | ".join(f"{median(rows[n], 'tokens/response'):.0f}" for n in results) + " |")
    lines.append("| rows with a teacher signal / 32 | " + " | ".join(f"{median(rows[n], 'distill_rows'):.0f}" for n in results) + " |")
    lines += ["", "## The update's model FLOPs utilisation", "",
              "Model FLOPs: the matmuls of the student forward (x3 with its backward) and of the teacher forward (x1), "
              "each with the output head on the response positions, counted on the real tokens (a prompt that its "
              "rows share, trainer.share_prompts, counts once: the work the forward needs); \"padded\" counts "
              "what the padded micro-batches compute. The compute time is student forward + teacher forward + head "
              "and terms + backward; MFU is achieved FLOP/s over the measured matmul rate in the model's shapes "
              "(FLOP-weighted over the layer shapes and the head, micro-batch of 8 x 96 rows), measured for 1.5 s per "
              "shape after the run and for 0.3 s right after each step (the per-step MFU); the last rows measure the "
              "same rates at M = the median number of token rows the update's forwards run (padded), the update's own "
              "shapes.", "",
              "| | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]

    def flops(rows_, kind):
        return [3 * r[f"flops/{kind}_student"] + r[f"flops/{kind}_teacher"] for r in rows_]

    def compute_s(r):
        return sum(r.get(f"time/{p}", 0.0) for p in ("student_forward", "teacher_forward", "head_and_terms", "backward"))

    def update_s(r):
        return sum(r.get(f"time/{p}", 0.0) for p in ("update", "teacher_forward", *UPDATE_PARTS))

    def achieved(n, seconds, per_step_peak=False):
        """Median over the steps of model GFLOP/s in `seconds(step)` (divided by the step's own matmul rate)."""
        return statistics.median(f / seconds(r) / 1e9 / (r["step_peak"] if per_step_peak else 1.0)
                                 for f, r in zip(flops(rows[n], "real"), rows[n]))

    peak = {n: results[n]["peak"]["weighted"] for n in results}
    table = {
        "model GFLOP / step (real tokens)": lambda n: statistics.median(flops(rows[n], "real")) / 1e9,
        "GFLOP / step as padded": lambda n: statistics.median(flops(rows[n], "padded")) / 1e9,
        "compute time (s)": lambda n: median_of(rows[n], compute_s),
        "whole update incl. teacher forward (s)": lambda n: median_of(rows[n], update_s),
        "achieved GFLOP/s (compute time)": lambda n: achieved(n, compute_s),
        "measured matmul peak, GFLOP/s": lambda n: peak[n],
        "**MFU, compute time**": lambda n: achieved(n, compute_s) / peak[n],
        "MFU, whole update": lambda n: achieved(n, update_s) / peak[n],
        "matmul rate right after each step, GFLOP/s (median)": lambda n: median(rows[n], "step_peak"),
        "MFU, each step against the rate right after it (median)": lambda n: achieved(n, compute_s, per_step_peak=True),
        "forward size M (median token rows per forward)": lambda n: results[n]["own_rows"],
        "measured matmul rate at that M, GFLOP/s": lambda n: results[n]["own_peak"]["weighted"],
        "MFU at the update's own M, compute time": lambda n: achieved(n, compute_s) / results[n]["own_peak"]["weighted"],
    }
    for label, fn in table.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(label, fn(n)) for n in results) + " |")
    lines += ["", "## The generate stage against its floor", "",
              "A decode step runs every sequence of the batch through every weight of the model: the floor is the "
              "model's matmuls alone with the batch's rows (each layer its own weight tensor, streamed from memory as "
              "in decoding), in the engine's dtype, times the decode steps of a step (its longest response). "
              "Attention, norms, sampling and the engine's own work come on top.", "",
              "| | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    generate = {
        "engine dtype": lambda n: results[n]["engine_dtype"].removeprefix("torch."),
        "decode steps per step (longest response)": lambda n: f"{median(rows[n], 'decode_steps'):.0f}",
        "generate, s per decode step": lambda n: f"{median_of(rows[n], _per_decode_step):.3f}",
        "one decode step's matmuls alone, s": lambda n: f"{results[n]['decode']['seconds']:.3f}",
        "  as weight GB/s read / GFLOP/s": lambda n: f"{results[n]['decode']['GB/s']:.1f} / {results[n]['decode']['GFLOP/s']:.0f}",
        "**generate / its matmul floor**": lambda n: f"**{median_of(rows[n], _per_decode_step) / results[n]['decode']['seconds']:.2f}**",
    }
    for label, fn in generate.items():
        lines.append(f"| {label} | " + " | ".join(fn(n) for n in results) + " |")
    lines += ["", "Matmul rates in the model's shapes (GFLOP/s, [768, K] @ [K, N], torch threads as in the run):", "",
              "| shape | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for shape in next(iter(results.values()))["peak"]:
        lines.append(f"| {shape} | " + " | ".join(f"{results[n]['peak'][shape]:.0f}" for n in results) + " |")
    lines.append("")
    lines.append("torch threads: " + ", ".join(f"{n} {r['threads']}" for n, r in results.items()))
    return "\n".join(lines) + "\n"


def _per_decode_step(r: dict) -> float:
    return r["time/generate"] / r["decode_steps"]


def median_of(rows, fn):
    return statistics.median(fn(r) for r in rows)


def _fmt(label: str, value: float) -> str:
    return f"{value:.0%}" if "MFU" in label else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16"], choices=list(PRECISIONS))
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    parser.add_argument("--results", default=None, help="markdown file to write")
    parser.add_argument("--colocation", type=int, default=0, metavar="ROUNDS",
                        help="time the update in processes without/with an in-process vLLM engine (and its memory "
                             "binding undone, or that binding alone), in turn, ROUNDS times")
    parser.add_argument("--shared-prompts", action="store_true", help="time the update with trainer.share_prompts off and each thing it shares added in turn")
    parser.add_argument("--huge-pages", type=int, default=0, metavar="ROUNDS",
                        help="time the update in processes without/with THP_MEM_ALLOC_ENABLE, alternating, ROUNDS times")
    parser.add_argument("--malloc", type=int, default=0, metavar="ROUNDS",
                        help="time the update in processes with glibc's malloc defaults and with the trainer keeping "
                             "freed memory (sdpo.precision.keep_freed_memory), alternating, ROUNDS times")
    parser.add_argument("--cast-once", action="store_true",
                        help="the update with trainer.learner.cast_weights_once off, on for the policy, on for the teacher "
                             "copy too, in turn --repeats rounds")
    parser.add_argument("--attention", action="store_true",
                        help="the update with attn_implementation sdpa and sdpa_cpu_float32, in turn --repeats rounds")
    parser.add_argument("--op-profile", action="store_true",
                        help="replay one update --repeats times, the last under torch.profiler: top operators")
    parser.add_argument("--replay", action="store_true", help=argparse.SUPPRESS)  # internal: replay_times
    parser.add_argument("--setup", default="none", choices=list(PROCESS_SETUPS), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--force-length", action="store_true", help="every rollout runs to rollout.max_new_tokens")
    parser.add_argument("--json", default=None, help="also write the raw per-step rows here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one precision, JSON to this path
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/profile_step.py", *sys.argv[1:]])
    if args.one:
        precision = args.one.split(":", 1)[0]
        overrides = [PRECISIONS[precision], *args.extra]
        if args.force_length:
            force_length()
        result = (replay_times(overrides, args.repeats, args.setup) if args.replay else
                  op_profile(overrides, args.repeats) if args.op_profile else
                  in_process_ab(overrides, args.repeats, CAST_ONCE) if args.cast_once else
                  in_process_ab(overrides, args.repeats, ATTENTION) if args.attention else
                  shared_prompts_ab(overrides, args.repeats) if args.shared_prompts else profile_one(overrides, args.steps))
        Path(args.one.split(":", 1)[1]).write_text(json.dumps(result))
        return
    results = {}
    for precision in args.precisions:
        if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            print("bf16 skipped: not native on this CPU")
            continue
        process_modes = [(HUGE_PAGES, args.huge_pages), (COLOCATION, args.colocation), (MALLOC, args.malloc)]
        variants, rounds = next(((v, r) for v, r in process_modes if r), (None, 0))
        if rounds:
            results[precision] = process_ab(precision, args, variants, rounds)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, "--one", f"{precision}:{f.name}", "--steps", str(args.steps),
                            "--repeats", str(args.repeats), *(["--shared-prompts"] if args.shared_prompts else []),
                            *(["--op-profile"] if args.op_profile else []),
                            *(["--cast-once"] if args.cast_once else []),
                            *(["--attention"] if args.attention else []),
                            *(["--force-length"] if args.force_length else []),
                            "--extra", *args.extra], check=True)
            results[precision] = json.loads(Path(f.name).read_text())
    def in_processes(rounds: int, what: str) -> str:
        return (f"One batch of the default workload per process, replayed {args.repeats} times (weights, optimizer and "
                f"EMA state restored before each update; the batch's first update is a warm-up); {rounds} rounds of one "
                f"process per variant, in turn: {what}.")

    def in_one_process(what: str) -> str:
        return (f"One batch of the default workload, one process: its update replayed with {what}, in turn, "
                f"{args.repeats} rounds (weights, optimizer and EMA state restored before each update; one warm-up "
                f"update first).")

    if args.huge_pages:
        text = ab_report("The update with and without huge pages for large CPU tensors (THP_MEM_ALLOC_ENABLE)",
                         in_processes(args.huge_pages, "THP_MEM_ALLOC_ENABLE=0, then =1"), results, command)
    elif args.colocation:
        text = ab_report("The update with and without an in-process vLLM engine", in_processes(
            args.colocation, "a transformers-engine trainer alone; with a vLLM engine built in the process; the same "
            "with the engine's strict NUMA memory binding undone (set_mempolicy(MPOL_DEFAULT)); that binding alone, "
            "no engine"), results, command)
    elif args.malloc:
        text = ab_report("The update with glibc's malloc returning freed memory, or keeping it", in_processes(
            args.malloc, "glibc's defaults (SDPO_KEEP_FREED_MEMORY=0); the trainer's mallopt (no heap trimming below "
            "2 GB of free top, no mmap)"), results, command)
    elif args.cast_once:
        text = ab_report("The update with autocast's weight casts once per forward and once per optimizer step",
                         in_one_process("one autocast region per forward, one per optimizer step caching the "
                                        "policy's casts (trainer.learner.cast_weights_once), and the same caching the "
                                        "teacher copy's too (Teacher.cacheable_casts)"), results, command)
    elif args.attention:
        text = ab_report("The update's attention: torch's bf16 CPU kernel, or the same SDPA in float32",
                         in_one_process("the policy's and the teacher's attn_implementation sdpa and sdpa_cpu_float32 "
                                        "(sdpo/attention.py)"), results, command)
    elif args.op_profile:
        text = "\n\n".join(f"## {n}: update {', '.join(f'{x:.2f}' for x in r['seconds'])} s (the last profiled)\n\n"
                           f"```\n{r['by_op']}\n{r['by_shape']}\n```" for n, r in results.items())
        text = f"# The update's operators (torch.profiler)\n\nMachine: {machine.describe()}\n\nCommand: `{command}`\n\n{text}\n"
    elif args.shared_prompts:
        text = "\n\n".join(shared_prompts_report(r, command) + f"\n(precision: {n})" for n, r in results.items())
    else:
        text = report(results, args, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
