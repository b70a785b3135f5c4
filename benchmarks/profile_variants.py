"""The A/B variants of benchmarks/profile_step.py: the same update replayed under process-wide settings (huge pages,
malloc, an in-process vLLM engine) or in-process switches (shared prompts, weight casts, attention kernels), and the
operator profile.
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
    FlopCounter,
    UPDATE_PARTS,
    bind_memory_alone,
    colocate_engine,
    instrumented,
    make_trainer,
    matmul_peak,
    median_and_range,
    update_replay,
)

PROCESS_SETUPS = {
    "none": lambda trainer: None,
    "engine": colocate_engine,
    "engine, memory policy undone": functools.partial(colocate_engine, memory_policy=False),
    "memory binding alone": bind_memory_alone,
}


# What trainer.share_prompts shares, step by step: (the student's prompts once per block, the teacher's reprompts
# once per block, the prompts' common prefix once per pass). "off" is one forward per row; "prompts" the student's
# prompt passes alone, the teacher sharing a reprompt only within a micro-batch; the last is the default.
SHARING = {"off": (False, False, False), "prompts": (True, False, False), "+ reprompts": (True, True, False),
           "+ common prefix": (True, True, True)}


def shared_prompts_ab(overrides: list[str], repeats: int) -> dict:
    """The same update (same rollouts, weights, optimizer and EMA state) under each step of SHARING, alternating, so
    that machine drift hits all alike; the parts of each update by the stage timer."""
    import sdpo.batch

    trainer = make_trainer(overrides)
    flops = FlopCounter(trainer.learner.unwrapped.config)
    replay = update_replay(trainer)
    out: dict[str, list] = {label: [] for label in SHARING}
    min_prefix_saving = sdpo.batch.MIN_PREFIX_SAVING
    with instrumented(trainer, flops):
        teacher_passes = trainer.learner.teacher._prompt_passes
        for _ in range(repeats):
            for label, (share, teacher, prefix) in SHARING.items():
                trainer.learner.planner.share_prompts = share
                trainer.learner.teacher._prompt_passes = teacher_passes if teacher else (lambda *args, **kwargs: None)
                sdpo.batch.MIN_PREFIX_SAVING = min_prefix_saving if prefix else 1 << 62  # no prefix pays
                seconds, parts = replay()
                out[label].append({"update": seconds, **parts, **flops.pop()})
    sdpo.batch.MIN_PREFIX_SAVING = min_prefix_saving
    out["peak"] = matmul_peak(trainer.learner.unwrapped.config, trainer.config.trainer.micro_batch_size * 96, torch.float32)
    out["tokens/response"] = float(replay.batch.response_lengths_B.sum())
    return out


def shared_prompts_report(result: dict, command: str) -> str:
    def med(label, key):
        return statistics.median(r.get(key, 0.0) for r in result[label])

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "-"

    keys = [("update (whole)", "update"), *((f"update: {p}", f"time/{p}") for p in UPDATE_PARTS),
            ("teacher forward", "time/teacher_forward")]
    lines = ["# The update with and without shared prompts (trainer.share_prompts)", "",
             f"Machine: {machine.describe()}", "", f"Command: `{command}`", "",
             f"One process, one batch of the default workload ({result['tokens/response']:.0f} response tokens), the "
             "weights, optimizer and EMA state restored before each update; the settings alternate "
             f"({len(result['off'])} each): share_prompts=false (one forward per row); the student's prompts once per "
             "block (the teacher sharing a reprompt only within a micro-batch); + the teacher's reprompts once per "
             "block; + the prompts' common prefix once per pass (the default). Seconds per update, median (range):",
             "", f"| | {' | '.join(SHARING)} | default / off | default / prompts |", "|---|---|---|---|---|---|---|"]
    default = list(SHARING)[-1]
    for label, key in keys:
        runs = {side: [r.get(key, 0.0) for r in result[side]] for side in SHARING}
        m = {side: statistics.median(v) for side, v in runs.items()}
        lines.append(f"| {label} | {' | '.join(median_and_range(runs[side]) for side in SHARING)} | "
                     f"{ratio(m[default], m['off'])} | {ratio(m[default], m['prompts'])} |")
    for who in ("student", "teacher"):
        for kind in ("padded", "real"):
            m = {side: med(side, f"flops/{kind}_{who}") for side in SHARING}
            lines.append(f"| {who} forward GFLOP ({kind}) | {' | '.join(f'{m[side] / 1e9:.0f}' for side in SHARING)} "
                         f"| {ratio(m[default], m['off'])} | {ratio(m[default], m['prompts'])} |")
    lines += ["", f"Matmul rate in the model's shapes after the runs (float32, weighted): {result['peak']['weighted']:.0f} GFLOP/s", ""]
    return "\n".join(lines)


REPLAY_MEASURES = {"update": "wall s", "teacher_forward": "of which the teacher's forward, s", "user": "CPU s, user",
                   "system": "CPU s, kernel", "faults": "minor page faults, thousands"}


def replay_times(overrides: list[str], repeats: int, setup: str = "none") -> dict[str, list[float]]:
    """`repeats` updates of one batch (the weights, optimizer and EMA state restored before each): wall seconds and
    the process's CPU seconds (user, kernel) and minor page faults over each (all threads). `setup`: what the
    process does to itself after the warm-up update (`PROCESS_SETUPS`)."""
    trainer = make_trainer(overrides)
    replay = update_replay(trainer)
    PROCESS_SETUPS[setup](trainer)
    out: dict[str, list[float]] = {key: [] for key in REPLAY_MEASURES}
    for _ in range(repeats):
        measure_update(replay, out)
    return out


def measure_update(replay, out: dict[str, list[float]]) -> None:
    """One replayed update: its wall seconds, the teacher forward's (the stage timer's, inside the update), the
    process's CPU seconds (user, kernel) and minor page faults."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds, parts = replay()
    after = resource.getrusage(resource.RUSAGE_SELF)
    out["update"].append(seconds)
    out["teacher_forward"].append(parts.get("time/teacher_forward", 0.0))
    out["user"].append(after.ru_utime - before.ru_utime)
    out["system"].append(after.ru_stime - before.ru_stime)
    out["faults"].append((after.ru_minflt - before.ru_minflt) / 1000)


def cast_weights(once: bool, teacher_cached: bool = True):
    """Learner.cast_weights_once, and whether the teacher's own copy is cached with the policy
    (`Teacher.cacheable_casts`)."""
    def apply(trainer) -> None:
        trainer.learner.cast_weights_once = once
        vars(trainer.learner.teacher).pop("cacheable_casts", None)  # the method, unless shadowed here:
        if not teacher_cached:
            trainer.learner.teacher.cacheable_casts = contextlib.nullcontext
    return apply


def attention(name: str):
    """model.attn_implementation of the policy and the teacher's own copy."""
    def apply(trainer) -> None:
        for model in (trainer.learner.unwrapped, trainer.learner.teacher.model):
            if model is not None:
                model.set_attn_implementation(name)
    return apply


# In-process A/B modes: label -> what each variant sets on the trainer before its update.
CAST_ONCE = {"a region per forward": cast_weights(False),
             "one region per step, the policy's casts cached": cast_weights(True, teacher_cached=False),
             "one region per step, the teacher copy's too": cast_weights(True)}
ATTENTION = {"sdpa (bf16 kernel under bf16 autocast)": attention("sdpa"),
             "sdpa_cpu_float32 (the default)": attention("sdpa_cpu_float32")}


def in_process_ab(overrides: list[str], repeats: int, variants: dict) -> dict[str, dict[str, list[float]]]:
    """The same update (same batch, weights, optimizer and EMA state) with each variant's setting, in turn in one
    process for `repeats` rounds."""
    trainer = make_trainer(overrides)
    replay = update_replay(trainer)
    out = {label: {key: [] for key in REPLAY_MEASURES} for label in variants}
    for _ in range(repeats):
        for label, apply in variants.items():
            apply(trainer)
            measure_update(replay, out[label])
    return out


def op_profile(overrides: list[str], repeats: int) -> dict:
    """The update replayed `repeats` times, the last under torch.profiler: its most expensive operators by self CPU
    time, per input shape (which casts, which matmuls, which element-wise passes)."""
    from torch.profiler import ProfilerActivity, profile

    replay = update_replay(make_trainer(overrides))
    seconds = [replay()[0] for _ in range(repeats - 1)]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        seconds.append(replay()[0])
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30,
                                                                max_name_column_width=50, max_shapes_column_width=60)
    by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50)
    return {"seconds": seconds, "by_op": by_op, "by_shape": table}


# Process variants compared by `process_ab`: label -> (environment variables, PROCESS_SETUPS entry, overrides).
HUGE_PAGES = {"off (=0)": ({"THP_MEM_ALLOC_ENABLE": "0"}, "none", []),
              "on (=1)": ({"THP_MEM_ALLOC_ENABLE": "1"}, "none", [])}
# glibc's malloc returns freed memory above 128 KB-32 MB to the kernel (munmap, heap trimming), so every step's large
# tensors fault their pages in again, unless the trainer keeps it (`sdpo.precision.keep_freed_memory`).
MALLOC = {"glibc defaults (SDPO_KEEP_FREED_MEMORY=0)": ({"SDPO_KEEP_FREED_MEMORY": "0"}, "none", []),
          "freed memory kept (the trainer's default)": ({}, "none", [])}
# The trainer itself on transformers generate, so that the only engine in a process is the one its setup builds.
COLOCATION = {"no engine": ({}, "none", ["rollout=hf"]), "vLLM engine in-process": ({}, "engine", ["rollout=hf"]),
              "engine, memory policy undone": ({}, "engine, memory policy undone", ["rollout=hf"]),
              "memory binding alone": ({}, "memory binding alone", ["rollout=hf"])}


def process_ab(precision: str, args: argparse.Namespace, variants: dict, rounds: int) -> dict[str, dict[str, list[float]]]:
    """`replay_times` in a fresh process per variant, the variants in turn for `rounds` rounds (a process-wide
    setting such as THP_MEM_ALLOC_ENABLE, read once by torch, or an engine's binding, can only be compared across
    processes); the updates pooled by variant."""
    out = {label: {key: [] for key in REPLAY_MEASURES} for label in variants}
    for _ in range(rounds):
        for label, (env, setup, overrides) in variants.items():
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run([sys.executable, str(Path(__file__).with_name("profile_step.py")), "--one", f"{precision}:{f.name}", "--replay", "--setup", setup,
                                "--repeats", str(args.repeats), "--extra", *args.extra, *overrides],
                               env={**os.environ, **env}, check=True)
                for key, values in json.loads(Path(f.name).read_text()).items():
                    out[label][key] += values
    return out


def ab_report(title: str, layout: str, results: dict[str, dict[str, dict[str, list[float]]]], command: str) -> str:
    labels = list(next(iter(results.values())))
    lines = [f"# {title}", "", f"Machine: {machine.describe()}", "", f"Command: `{command}`", "",
             f"{layout} Per update, median (range) of the pooled updates, and each variant over the first:", "",
             "| precision | per update | " + " | ".join(labels) + " | " + " | ".join(f"{l} / {labels[0]}" for l in labels[1:]) + " |",
             "|---|---|" + "---|" * (2 * len(labels) - 1)]
    for precision, runs in results.items():
        for key, label in REPLAY_MEASURES.items():
            base = statistics.median(runs[labels[0]][key])
            ratios = [statistics.median(runs[l][key]) / base if base else float("nan") for l in labels[1:]]
            lines.append(f"| {precision} | {label} | " + " | ".join(median_and_range(runs[l][key]) for l in labels)
                         + " | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join([*lines, ""])
