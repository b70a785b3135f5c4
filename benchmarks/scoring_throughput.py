"""Scoring throughput through the process pool: a batch of 64 short programs, and the worst case, a looping batch.

    python benchmarks/scoring_throughput.py [--workers 1,2,4] [--repeats 3] [--loop-workers 2,8]
        [--skip-throughput] [--out benchmarks/results/scoring_throughput.md]

Throughput: the reference solutions of the first 64 MBPP test problems (a few lines each, 3 asserts, one sandbox
run per program), scored with `env.score_batch` as the trainer does. For each isolation level and worker count: one
warm-up batch (worker start-up; reported as "cold"), then `--repeats` timed batches (median reported).

Worst case: a training step whose 32 rollouts all loop forever (`while True: pass`) on the 32 CodeContests problems
with the most tests, at the default limits (6 s per test, 60 s per response, stop on the first error). Each
program costs one time limit plus sandbox start-up, whatever its number of tests, so the step costs about
ceil(32 / workers) time limits. Written to `--loop-out`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import datetime as dt
from pathlib import Path
import platform
import statistics
import sys
import time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402
from sdpo.envs.code.codecontests import CodeContestsConfig, CodeContestsEnv  # noqa: E402
from sdpo.envs.code.mbpp import MBPPConfig, MBPPEnv  # noqa: E402
from sdpo.envs.pool import _pools  # noqa: E402

BATCH = 64
LOOP_BATCH = 32


def measure(isolation: str, workers: int, repeats: int) -> dict:
    env = MBPPEnv(MBPPConfig(sandbox=isolation, score_workers=workers))
    problems = env.load("test")[:BATCH]
    responses = [f"```python\n{p.data['reference']}\n```" for p in problems]
    truncated = [False] * BATCH

    def batch() -> float:
        start = time.monotonic()
        scores = env.score_batch(problems, responses, truncated)
        assert all(s.reward == 1.0 for s in scores), [s for s in scores if s.reward != 1.0][:2]
        return time.monotonic() - start

    cold = batch()
    warm = statistics.median(batch() for _ in range(repeats))
    _pools.pop(env).close()
    return {"isolation": isolation, "workers": workers, "cold_s": cold, "warm_s": warm}


def measure_loops(isolation: str, workers: int) -> dict:
    """One step of LOOP_BATCH looping programs (after a warm-up of the workers), as the trainer scores it."""
    env = CodeContestsEnv(CodeContestsConfig(sandbox=isolation, score_workers=workers))
    problems = sorted(env.load("test"), key=lambda p: -len(p.data["tests"]))[:LOOP_BATCH]
    env.score_batch(problems[:workers], ["```python\nprint(1)\n```"] * workers, [False] * workers)  # spawn workers
    start = time.monotonic()
    scores = env.score_batch(problems, ["```python\nwhile True:\n    pass\n```"] * LOOP_BATCH, [False] * LOOP_BATCH)
    wall = time.monotonic() - start
    assert all(s.reward == 0.0 and s.info["status"] == "time_limit" for s in scores), [s.info for s in scores][:3]
    _pools.pop(env).close()
    per_program = [s.info["score_s"] for s in scores]
    tests = [len(p.data["tests"]) for p in problems]
    return {
        "isolation": isolation, "workers": workers, "wall_s": wall, "limit_s": env.config.time_limit_s,
        "bound_s": -(-LOOP_BATCH // workers) * env.config.time_limit_s, "max_program_s": max(per_program),
        "mean_program_s": statistics.mean(per_program), "tests": (min(tests), max(tests)),
    }


def loop_report(rows: list[dict], started: dt.datetime) -> str:
    lines = [
        f"# Worst-case scoring step: {LOOP_BATCH} rollouts that all loop forever",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {cpu_name()}, {os.cpu_count()} logical cores, {platform.platform()}, Python {platform.python_version()}",
        f"- Command: `python benchmarks/scoring_throughput.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Batch: `while True: pass` as the answer to each of the {LOOP_BATCH} CodeContests problems with the most tests "
        f"({rows[0]['tests'][0]}-{rows[0]['tests'][1]} tests each), scored with `env.score_batch` (process pool) at the "
        "default limits: 6 s per test, 60 s per response, `stop_on_error` (a time limit ends the program's run). "
        "Every program gets reward 0 and Time Limit Exceeded. Workers are spawned before the timed step.",
        f"- Bound: ceil({LOOP_BATCH} / workers) x the 6 s limit; a program's cost does not grow with its number of tests.",
        "",
        "| isolation | pool workers | step wall s | bound s (limits only) | s per program: mean (max) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['isolation']} | {r['workers']} | {r['wall_s']:.1f} | {r['bound_s']:.0f} | "
                     f"{r['mean_program_s']:.2f} ({r['max_program_s']:.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--isolations", default="bwrap,process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scoring_throughput.md"))
    parser.add_argument("--loop-workers", default="2,8", help="worker counts for the looping batch ('' to skip)")
    parser.add_argument("--loop-isolation", default="bwrap")
    parser.add_argument("--loop-out", default=str(REPO / "benchmarks" / "results" / "scoring_worst_case.md"))
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    if args.loop_workers:
        loops = []
        for workers in map(int, args.loop_workers.split(",")):
            loops.append(measure_loops(args.loop_isolation, workers))
            print(f"looping batch, {workers} workers: {loops[-1]['wall_s']:.1f} s", flush=True)
        text = loop_report(loops, started)
        Path(args.loop_out).write_text(text)
        print(text)
    if args.skip_throughput:
        return
    rows = []
    for isolation in args.isolations.split(","):
        for workers in map(int, args.workers.split(",")):
            row = measure(isolation, workers, args.repeats)
            rows.append(row)
            print(f"{isolation} workers={workers}: {BATCH / row['warm_s']:.1f} programs/s warm, cold batch {row['cold_s']:.2f} s", flush=True)
    lines = [
        "# Scoring throughput: a batch of 64 short programs",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {platform.node()}, {os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}",
        f"- Command: `python benchmarks/scoring_throughput.py {' '.join(sys.argv[1:])}`".rstrip(),
        "- Batch: reference solutions of the first 64 MBPP test problems (3 asserts each, one sandbox run per program), "
        "scored with `env.score_batch` (process pool); every program gets reward 1.",
        f"- Warm: median of {args.repeats} batches after a warm-up batch; cold: the warm-up batch (spawning the workers).",
        "",
        "| isolation | pool workers | programs/s (warm) | batch s (warm) | batch s (cold) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['isolation']} | {row['workers']} | {BATCH / row['warm_s']:.1f} | {row['warm_s']:.2f} | {row['cold_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
