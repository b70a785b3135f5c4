"""How a step's cost grows with the response length and the batch, GRPO against the SDPO+GRPO hybrid.

    python benchmarks/cost_growth_cpu.py --results benchmarks/results/cost_growth_cpu.md

Every rollout is forced to `rollout.max_new_tokens` (vLLM's min_tokens = max_tokens), so that the cost is measured
at that length; the default run's workload otherwise (benchmarks/profile_step.py, whose per-step profile this
reuses: one process per variant, one warm-up step, then the median of --steps). Variants run GRPO then hybrid at
each size, so that drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import machine
from benchmarks.profile_parts import UPDATE_PARTS

ALGORITHMS = {"grpo": ["algorithm=grpo"], "hybrid": ["algorithm=sdpo_grpo"]}
SIZES = {  # name -> overrides
    "48 tokens, 8x4": ["rollout.max_new_tokens=48"],
    "256 tokens, 8x4": ["rollout.max_new_tokens=256"],
    "48 tokens, 16x4 (2x batch)": ["rollout.max_new_tokens=48", "trainer.questions_per_step=16",
                                   "trainer.mini_batch_questions=16"],
    "1024 tokens, 2x4 (1/4 batch)": ["rollout.max_new_tokens=1024", "trainer.questions_per_step=2",
                                     "trainer.mini_batch_questions=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=["float32", "bf16"])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--json", default=None, help="write the raw rows here (and read earlier ones with --merge)")
    parser.add_argument("--merge", nargs="*", default=[], help="raw JSON files of earlier runs to add to the table")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/cost_growth_cpu.py", *sys.argv[1:]])
    rows: dict[str, dict] = {}
    for path in args.merge:
        rows.update(json.loads(Path(path).read_text()))
    for size in args.sizes:
        for algorithm, overrides in ALGORITHMS.items():
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run([sys.executable, str(Path(__file__).parent / "profile_step.py"), "--one",
                                f"{args.precision}:{f.name}", "--steps", str(args.steps), "--force-length",
                                "--extra", *overrides, *SIZES[size]], check=True)
                rows[f"{size} | {algorithm}"] = json.loads(Path(f.name).read_text())
            if args.json:  # after every variant: a long sweep cut short keeps what it measured
                Path(args.json).write_text(json.dumps(rows))
    text = report(rows, args, command)
    print(text)
    if args.results:
        Path(args.results).write_text(text)


def med(steps: list[dict], key: str) -> float:
    return statistics.median(s.get(key, 0.0) for s in steps)


def report(rows: dict[str, dict], args: argparse.Namespace, command: str) -> str:
    parts = ["generate", "teacher_context", "teacher_forward", "update"]
    lines = [
        "# How a step's cost grows: response length and batch, GRPO vs the SDPO+GRPO hybrid", "",
        f"Machine: {machine.describe()}", "", f"Precision: {args.precision} (autocast; float32 master weights)", "",
        f"Command: `{command}` (rows of earlier runs merged from their raw JSON where named)", "",
        "Every rollout forced to the token limit (vLLM min_tokens = max_tokens); the default workload otherwise "
        "(SmolLM2-135M-Instruct, arithmetic, lambda = 0.9 hybrid with the EMA teacher, vLLM in-process, micro-batches "
        f"of 8, one optimizer step per generation batch). Median of {args.steps} steps after a warm-up step, seconds "
        "per step; \"update\" is the whole update (student forward, head and loss terms, backward, optimizer, EMA) "
        "without the teacher forward, which has its own column.", "",
        "| size | algorithm | step | " + " | ".join(parts) + " | rows with a teacher signal | hybrid / GRPO |",
        "|---|---|---|" + "---|" * len(parts) + "---|---|",
    ]
    for key, result in rows.items():
        size, algorithm = key.split(" | ")
        steps = result["steps"]
        step = med(steps, "wall")
        update = statistics.median(sum(s.get(f"time/{p}", 0.0) for p in ("update", *UPDATE_PARTS)) for s in steps)
        values = [med(steps, "time/generate"), med(steps, "time/teacher_context"), med(steps, "time/teacher_forward"), update]
        ratio = ""
        if algorithm == "hybrid" and f"{size} | grpo" in rows:
            ratio = f"{step / med(rows[f'{size} | grpo']['steps'], 'wall'):.2f}"
        lines.append(f"| {size} | {algorithm} | {step:.1f} | " + " | ".join(f"{v:.2f}" for v in values)
                     + f" | {med(steps, 'distill_rows'):.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
