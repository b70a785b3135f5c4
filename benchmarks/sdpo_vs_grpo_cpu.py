"""GRPO vs pure SDPO vs the SDPO+GRPO hybrid on the CPU default task (SmolLM2-135M-Instruct, arithmetic).

Same seeds, same questions per step, same number of generations; held-out accuracy every few steps. Writes one run
directory per (method, seed) under --out, a markdown results file and a plot.

    python benchmarks/sdpo_vs_grpo_cpu.py --steps 12 --eval-every 3 --seeds 0 1 \
        --results benchmarks/results/sdpo_vs_grpo_cpu.md

A method is a name plus Hydra overrides (see METHODS); --extra adds overrides to every run, --only picks methods.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from sdpo.hydra_config import load_config  # noqa: E402
from sdpo.tracking import plot_curves, read_metrics  # noqa: E402

STAGES = ["generate", "score", "teacher_context", "teacher_forward", "update", "sync"]  # the trainer's stage timers (time/<stage>)
METHODS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo"],
    "sdpo": ["algorithm=sdpo"],
    "sdpo_grpo": ["algorithm=sdpo_grpo"],
}


def run_one(name: str, overrides: list[str], seed: int, args: argparse.Namespace) -> Path:
    from sdpo.trainer import SDPOTrainer

    out = Path(args.out) / f"{name}-seed{seed}"
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    config = load_config([
        *overrides,
        f"trainer.seed={seed}",
        f"trainer.total_steps={args.steps}",
        f"eval.every={args.eval_every}",
        f"eval.samples_per_question={args.eval_samples}",
        f"trainer.output_dir={out}",
        "trainer.keep_last=1",
        "logging.progress_bar=false",
        *args.extra,
    ])
    SDPOTrainer(config).train()
    return out


def summarize(runs: dict[str, list[Path]], args: argparse.Namespace) -> str:
    eval_key = f"eval/avg@{args.eval_samples}"
    first = load_config(args.extra)
    gens_per_step = first.trainer.questions_per_step * first.rollout.num_generations
    lines = [
        "# SDPO vs GRPO on the CPU default task",
        "",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, CPU only (torch {__import__('torch').__version__}).",
        f"Command: `python {' '.join(sys.argv)}`",
        f"Setup: SmolLM2-135M-Instruct, {first.env.name} ({', '.join(first.env.ops)}), "
        f"{first.trainer.questions_per_step} questions x {first.rollout.num_generations} rollouts per step "
        f"({gens_per_step} generations), max {first.rollout.max_new_tokens} new tokens, rollout engine "
        f"{first.rollout.engine}; held-out: "
        f"{eval_key} over the test split (temperature {first.eval.temperature}, top-p {first.eval.top_p}).",
        "",
        "## Held-out accuracy (mean over seeds) by step",
        "",
    ]
    curves: dict[str, dict[int, list[float]]] = {}
    step_times: dict[str, list[float]] = {}
    stage_times: dict[str, dict[str, list[float]]] = {}  # method -> stage -> seconds, without each run's first step
    for name, dirs in runs.items():
        curves[name] = {}
        step_times[name] = []
        stage_times[name] = {stage: [] for stage in STAGES}
        for d in dirs:
            rows = read_metrics(d)
            timed = [row for row in rows if row.get("time/generate") is not None]
            for row in rows:
                if row.get(eval_key) is not None:
                    curves[name].setdefault(row["step"], []).append(row[eval_key])
            for i, row in enumerate(timed):
                step_times[name].append(sum(v for k, v in row.items() if k.startswith("time/") and v))
                for stage in STAGES if i > 0 else ():  # the first step warms up allocators and caches
                    stage_times[name][stage].append(row.get(f"time/{stage}") or 0.0)
    steps = sorted({s for c in curves.values() for s in c})
    if not steps:
        lines.append("No evaluations in these runs (eval.every=0).")
    else:
        lines.append("| method | overrides | " + " | ".join(f"step {s}" for s in steps) + " | best (at generations) |")
        lines.append("|---|---|" + "---|" * len(steps) + "---|")
    for name, curve in curves.items():
        if not curve:
            continue
        means = {s: statistics.mean(v) for s, v in curve.items()}
        best_step = max(means, key=lambda s: (means[s], -s))
        cells = " | ".join(f"{means[s]:.3f}" if s in means else "" for s in steps)
        overrides = " ".join(METHODS.get(name, []))
        lines.append(f"| {name} | `{overrides}` | {cells} | {means[best_step]:.3f} ({best_step * gens_per_step}) |")
    lines += ["", "## Wall time per training step (seconds; median over steps and seeds, robust to a busy machine)", ""]
    lines.append("| method | median step time | mean | overhead of the median vs grpo |")
    lines.append("|---|---|---|---|")
    base = statistics.median(step_times["grpo"]) if step_times.get("grpo") else None
    for name, times in step_times.items():
        median = statistics.median(times)
        overhead = f"{100 * (median / base - 1):+.1f}%" if base else "n/a"
        lines.append(f"| {name} | {median:.2f} | {statistics.mean(times):.2f} | {overhead} |")
    lines += ["", "## Seconds per step by stage (medians, each run's first step left out)", ""]
    lines.append("| method | " + " | ".join(STAGES) + " | sum | vs grpo |")
    lines.append("|---|" + "---|" * (len(STAGES) + 2))
    sums = {name: sum(statistics.median(v) for v in stages.values() if v) for name, stages in stage_times.items()}
    for name, stages in stage_times.items():
        cells = " | ".join(f"{statistics.median(v):.2f}" if v else "" for v in stages.values())
        versus = f"{100 * (sums[name] / sums['grpo'] - 1):+.1f}%" if sums.get("grpo") else "n/a"
        lines.append(f"| {name} | {cells} | {sums[name]:.2f} | {versus} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", default=list(METHODS))
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides applied to every run")
    parser.add_argument("--method", action="append", default=[], help="name=override,override (adds a method)")
    parser.add_argument("--out", default="benchmarks/runs/sdpo_vs_grpo_cpu")
    parser.add_argument("--results", default=None, help="markdown file for the results table")
    parser.add_argument("--summarize-only", action="store_true", help="rebuild the report from existing run dirs")
    args = parser.parse_args()
    for spec in args.method:
        name, _, overrides = spec.partition("=")
        METHODS[name] = [o for o in overrides.split(",") if o]
        args.only.append(name) if name not in args.only else None
    runs: dict[str, list[Path]] = {}
    for seed in args.seeds:
        for name in args.only:
            if args.summarize_only:
                runs.setdefault(name, []).append(Path(args.out) / f"{name}-seed{seed}")
                continue
            start = time.time()
            runs.setdefault(name, []).append(run_one(name, METHODS[name], seed, args))
            print(f"{name} seed {seed}: {time.time() - start:.0f} s", flush=True)
    report = summarize(runs, args)
    print(report)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(report)
        png = Path(args.results).with_suffix(".png")
        dirs = [d for ds in runs.values() for d in ds]
        plot_curves(dirs, [f"eval/avg@{args.eval_samples}", "reward/mean"], png, labels=[d.name for d in dirs])
        print(f"wrote {args.results} and {png}")
    subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False)


if __name__ == "__main__":
    main()
