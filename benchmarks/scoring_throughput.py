"""Scoring throughput: programs per second for a batch of 64 short programs, through the process pool.

    python benchmarks/scoring_throughput.py [--workers 1,2,4] [--repeats 3] [--out benchmarks/results/scoring_throughput.md]

The batch: the reference solutions of the first 64 MBPP test problems (a few lines each, 3 asserts, one sandbox run
per program), scored with `env.score_batch` as the trainer does. For each isolation level and worker count: one
warm-up batch (worker start-up; reported as "cold"), then `--repeats` timed batches (median reported).
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

from sdpo.envs.code.mbpp import MBPPConfig, MBPPEnv  # noqa: E402
from sdpo.envs.pool import _pools  # noqa: E402

BATCH = 64


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--isolations", default="bwrap,process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scoring_throughput.md"))
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
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
