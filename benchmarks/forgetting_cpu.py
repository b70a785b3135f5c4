"""What the default run costs elsewhere (issue #30): forgetting on other tasks and diversity (pass@1 / pass@n).

The default run (configs/experiment/cpu.yaml: SmolLM2-135M-Instruct on single-digit multiplication, the lambda = 0.9
hybrid) and, for comparison, GRPO (and with --only, pure SDPO) on the same task, each `scripts/train.py` in its own process, one
at a time, evaluated on the run's schedule on other tasks through `eval.other_envs` (`OTHER_ENVS`): two-digit
addition and subtraction at 48 new tokens, the only built-in tasks besides multiplication on which SmolLM2-135M
scores between 0 and 1 within the default run's budget (science and GSM8K need reasoning of hundreds of tokens and
a format it rarely writes; the convention task scores 0).

    python benchmarks/forgetting_cpu.py --results benchmarks/results/forgetting_cpu.md

--summarize-only rebuilds the report from the run directories; --only picks methods; --seeds several seeds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import statistics
import sys
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from benchmarks.machine import describe  # noqa: E402
from benchmarks.privileged_cpu import start_end_cell, train_run  # noqa: E402
from sdpo.tracking import plot_curves  # noqa: E402

OTHER_ENVS = {
    "addition": "{name:arithmetic,label:addition,ops:[+],min_operand:10,max_operand:99,max_eval_rows:20}",
    "subtraction": "{name:arithmetic,label:subtraction,ops:[-],min_operand:10,max_operand:99,max_eval_rows:20}",
}
METHODS = {"default (hybrid)": [], "grpo": ["algorithm=grpo"], "sdpo": ["algorithm=sdpo"]}
COMMON = ["logging.progress_bar=false", "trainer.save_every=0", "trainer.keep_last=1",
          f"eval.other_envs=[{','.join(OTHER_ENVS.values())}]"]


def run_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    return Path(args.out) / f"{name.split()[0]}-seed{seed}"


def run_one(name: str, seed: int, args: argparse.Namespace) -> Path:
    return train_run(run_dir(args, name, seed), [*COMMON, *METHODS[name], f"trainer.seed={seed}"])


def summarize(runs: dict[str, list[Path]], n: int) -> str:
    keys = {"held-out (multiplication)": f"eval/avg@{n}", "pass@1": "eval/pass@1", f"pass@{n}": f"eval/pass@{n}",
            **{f"{label} (other)": f"eval_{label}/avg@{n}" for label in OTHER_ENVS},
            **{f"{label} pass@{n}": f"eval_{label}/pass@{n}" for label in OTHER_ENVS}}
    lines = ["# Forgetting and diversity in the default run (CPU)", "",
             f"Date: {time.strftime('%Y-%m-%d')}. Machine: {describe()}.", f"Command: `python {' '.join(sys.argv)}`",
             f"Every run: `scripts/train.py {' '.join(COMMON)} <method> trainer.seed=<seed>` (the default run: 10 steps "
             "of 8 questions x 4 rollouts, 48 new tokens; every held-out set 20 questions x 4 samples every 2 steps).",
             "", "Start -> end (mean over seeds; per seed in brackets):", "",
             "| method | seeds | " + " | ".join(keys) + " | wall s |", "|---|---|" + "---|" * len(keys) + "---|"]
    for name, dirs in runs.items():
        done = [d for d in dirs if (d / "metrics.jsonl").exists()]
        if not done:
            continue
        cells = [start_end_cell(done, key) for key in keys.values()]
        walls = [json.loads((d / "cost.json").read_text())["wall_s"] for d in done if (d / "cost.json").exists()]
        wall = f"{statistics.mean(walls):.0f}" if walls else "n/a"
        lines.append(f"| {name} (`{' '.join(METHODS[name]) or 'no override'}`) | {len(done)} | " + " | ".join(cells)
                     + f" | {wall} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", default=["default (hybrid)", "grpo"], choices=list(METHODS))
    parser.add_argument("--eval-samples", type=int, default=4, help="the default run's eval.samples_per_question")
    parser.add_argument("--out", default="benchmarks/runs/forgetting_cpu")
    parser.add_argument("--results", default=None, help="markdown file for the report (a .png curve next to it)")
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args()
    runs: dict[str, list[Path]] = {name: [] for name in args.only}
    for seed in args.seeds:
        for name in args.only:
            runs[name].append(run_dir(args, name, seed) if args.summarize_only else run_one(name, seed, args))
    report = summarize(runs, args.eval_samples)
    print(report)
    if args.results:
        Path(args.results).write_text(report)
        png = Path(args.results).with_suffix(".png")
        dirs = [d for ds in runs.values() for d in ds if (d / "metrics.jsonl").exists()]
        n = args.eval_samples
        plot_curves(dirs, [f"eval/avg@{n}", *(f"eval_{label}/avg@{n}" for label in OTHER_ENVS)], png,
                    labels=[d.name for d in dirs])
        print(f"wrote {args.results} and {png}")


if __name__ == "__main__":
    main()
