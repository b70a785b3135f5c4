"""Two runs of the same config, side by side: is the behaviour the same, and what did a step cost?

    python scripts/train.py trainer.output_dir=runs/before      # in a worktree of the old commit
    python scripts/train.py trainer.output_dir=runs/after       # in this checkout
    python benchmarks/compare_runs.py runs/before runs/after --labels a351b0d refactor \
        --results benchmarks/results/redesign_default_run.md

Reads each run's metrics.jsonl and writes: the held-out curve of both, every logged metric that differs at a common
step (timings excluded: they are the other half), and the step time per stage (mean over the steps, and the mean
of the whole step). Run them one after the other on a quiet machine: two runs at once on 2 cores time each other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import statistics
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

STAGES = ("generate", "score", "teacher_context", "update", "teacher_forward", "sync")


def read(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_seconds(rows: list[dict]) -> list[float]:
    return [sum(v for k, v in r.items() if k.startswith("time/")) for r in rows if any(k.startswith("time/") for k in r)]


def differences(a: list[dict], b: list[dict]) -> list[tuple[int, str, float, float | None]]:
    """(step, metric, a, b) for every number logged by both at the same step that differs (timings excluded)."""
    out = []
    by_step = {r["step"]: r for r in b}
    for row in a:
        other = by_step.get(row["step"], {})
        for key, value in row.items():
            if key.startswith(("time/", "sync/")) or not isinstance(value, (int, float)):
                continue
            if other.get(key) != value:
                out.append((row["step"], key, value, other.get(key)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs=2, type=Path)
    parser.add_argument("--labels", nargs=2, default=["before", "after"])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--note", default="", help="a paragraph for the results file (what else ran, commits)")
    args = parser.parse_args()
    rows = [read(r) for r in args.runs]
    metric = "eval/avg@4"
    lines = [f"# Same config, two runs: {args.labels[0]} against {args.labels[1]}", "",
             f"Machine: {describe()}.", f"Command: `python {' '.join(sys.argv)}`", ""]
    if args.note:
        lines += [args.note, ""]
    steps = sorted({r["step"] for r in rows[0] if metric in r} | {r["step"] for r in rows[1] if metric in r})
    lines += [f"## Held-out {metric}", "", "| run | " + " | ".join(f"step {s}" for s in steps) + " |",
              "|---|" + "---|" * len(steps)]
    for label, rs in zip(args.labels, rows):
        values = {r["step"]: r[metric] for r in rs if metric in r}
        lines.append(f"| {label} | " + " | ".join(f"{values[s]:.3f}" if s in values else "-" for s in steps) + " |")
    diff = differences(*rows)
    common = sum(1 for r in rows[0] for k, v in r.items() if isinstance(v, (int, float)) and not k.startswith(("time/", "sync/")))
    lines += ["", "## Every other logged number", "",
              f"{len(diff)} of {common} numbers logged by {args.labels[0]} differ in {args.labels[1]} at the same step"
              + (":" if diff else " (bit for bit the same).")]
    lines += [f"- step {s} `{k}`: {x} vs {y}" for s, k, x, y in diff[:30]]
    lines += ["", "## Step time (seconds, mean over the steps)", "",
              "| run | step (median) | step (mean) | " + " | ".join(STAGES) + " |", "|---|---|---|" + "---|" * len(STAGES)]
    means = []
    for label, rs in zip(args.labels, rows):
        timed = [r for r in rs if any(k.startswith("time/") for k in r)]
        seconds = step_seconds(rs)
        means.append(statistics.mean(seconds))
        stages = [statistics.mean(r.get(f"time/{s}", 0.0) for r in timed) for s in STAGES]
        lines.append(f"| {label} | {statistics.median(seconds):.2f} | {means[-1]:.2f} | "
                     + " | ".join(f"{v:.2f}" for v in stages) + " |")
    lines += ["", f"{args.labels[1]} / {args.labels[0]}, mean step time: {means[1] / means[0]:.3f}."]
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
