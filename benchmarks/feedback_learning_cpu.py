"""Learning from feedback (issue #16): GRPO vs pure SDPO vs the hybrid on a task where GRPO has no signal.

The task is `experiment=convention_cpu` (sdpo/envs/convention.py): single-digit multiplication graded under an answer
convention the question does not state; the checker's feedback states it. Each run is `scripts/train.py` in its own
process (so its CPU time is measured: user + system of the process and its children); before the runs,
`scripts/probe.py` measures what the self-teacher can offer, and its verdict goes next to the outcome.

    python benchmarks/feedback_learning_cpu.py --steps 12 --eval-every 2 --seeds 0 1 \
        --results benchmarks/results/feedback_learning_cpu.md

A method is a name plus Hydra overrides (METHODS; --method name=a,b adds one); --extra adds overrides to every run
and to the probe. --summarize-only rebuilds the report from the run directories.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import resource
import statistics
import subprocess
import sys
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from benchmarks.machine import describe  # noqa: E402
from sdpo.tracking import plot_curves, read_metrics  # noqa: E402

PRESET = "experiment=convention_cpu"
METHODS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo"],
    "sdpo": ["algorithm=sdpo"],  # the preset's: top-100 logits with a tail bucket, JSD, EMA teacher 0.05
    "sdpo_grpo": ["algorithm=sdpo_grpo"],  # lambda = 0.9 advantage-level hybrid, sampled-token SDPO term
}


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_script(script: str, overrides: list[str], log: Path) -> tuple[float, float, int]:
    """Run scripts/<script> with Hydra overrides; (wall seconds, CPU seconds, exit code)."""
    wall, cpu = time.time(), children_cpu_seconds()
    with log.open("w") as out:
        code = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *overrides], cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT, check=False).returncode
    return time.time() - wall, children_cpu_seconds() - cpu, code


def common(args: argparse.Namespace) -> list[str]:
    return [PRESET, "logging.progress_bar=false", "trainer.save_every=0", "trainer.keep_last=1", *args.extra]


def run_one(name: str, seed: int, args: argparse.Namespace) -> Path:
    out = Path(args.out) / f"{name}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    wall, cpu, code = run_script("train.py", [
        *common(args), *METHODS[name], f"trainer.seed={seed}", f"trainer.total_steps={args.steps}",
        f"eval.every={args.eval_every}", f"eval.samples_per_question={args.eval_samples}", f"trainer.output_dir={out}",
    ], out / "train.log")
    (out / "cost.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "exit_code": code}) + "\n")
    print(f"{name} seed {seed}: exit {code}, {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return out


def run_probe(args: argparse.Namespace) -> Path:
    out = Path(args.out) / "probe"
    out.mkdir(parents=True, exist_ok=True)
    # The probe reads no training settings (scripts/probe.py refuses an override it does not use): the preset only.
    wall, cpu, code = run_script("probe.py", [PRESET, *args.extra, *args.probe_extra, f"trainer.output_dir={out}"],
                                 out / "probe.log")
    print(f"probe: exit {code}, {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return out


def step_rows(run: Path) -> list[dict]:
    """A run's logged training steps (the rows with a reward), or none when it has no metrics yet."""
    if not (run / "metrics.jsonl").exists():
        return []
    return [r for r in read_metrics(run) if r.get("reward/mean") is not None]


def metric_mean(rows: list[dict], key: str) -> float:
    """The mean of `key` over the rows that logged it (nan when none did)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else float("nan")


def probe_section(out: Path) -> list[str]:
    log = out / "probe.log"
    if not log.exists():
        return ["(no probe run)"]
    text = log.read_text()
    start = text.find("probe: ")
    table = text[start:text.find("probe.json:", start)].rstrip() if start >= 0 else "(the probe failed: see its log)"
    return ["```", table, "```"]


def summarize(runs: dict[str, list[Path]], args: argparse.Namespace) -> str:
    eval_key = f"eval/avg@{args.eval_samples}"
    lines = [
        "# Learning from feedback on the CPU: GRPO vs SDPO on the convention task",
        "",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {describe()}.",
        f"Command: `python {' '.join(sys.argv)}`",
        f"Every run: `scripts/train.py {' '.join(common(args))} <method> trainer.seed=<seed> "
        f"trainer.total_steps=<steps> eval.every={args.eval_every} eval.samples_per_question={args.eval_samples}`.",
        "",
        "## The probe (scripts/probe.py, before training, initial weights)",
        "",
        *probe_section(Path(args.out) / "probe"),
        "",
        f"## Held-out {eval_key} (mean over seeds; per seed in brackets) by step",
        "",
    ]
    curves: dict[str, dict[int, list[float]]] = {}
    for name, dirs in runs.items():
        curves[name] = {}
        for d in dirs:
            for row in read_metrics(d) if (d / "metrics.jsonl").exists() else []:
                if row.get(eval_key) is not None:
                    curves[name].setdefault(row["step"], []).append(row[eval_key])
    steps = sorted({s for c in curves.values() for s in c})
    lines.append("| method | overrides | " + " | ".join(f"step {s}" for s in steps) + " | gain (its last eval - its first) |")
    lines.append("|---|---|" + "---|" * len(steps) + "---|")
    for name, curve in curves.items():
        cells = " | ".join(
            f"{statistics.mean(curve[s]):.3f} ({', '.join(f'{v:.2f}' for v in curve[s])})" if s in curve else ""
            for s in steps)
        own = sorted(curve)
        gain = statistics.mean(curve[own[-1]]) - statistics.mean(curve[own[0]]) if own else float("nan")
        lines.append(f"| {name} | `{' '.join(METHODS.get(name, []))}` | {cells} | {gain:+.3f} |")
    lines += ["", "## Training signal and cost per run", "",
              "| run | steps | reward/mean first -> last step | groups with a success (mean) | rollouts with feedback "
              "(mean) | wall s | CPU s |", "|---|---|---|---|---|---|---|"]
    for name, dirs in runs.items():
        for d in dirs:
            rows = step_rows(d)
            cost = json.loads((d / "cost.json").read_text()) if (d / "cost.json").exists() else {}
            reward = f"{rows[0]['reward/mean']:.3f} -> {rows[-1]['reward/mean']:.3f}" if rows else "n/a"
            # A run stopped before its end has no cost.json: its training steps' stage timers stand in for the wall
            # time (marked *; without start-up and evaluations).
            wall = (f"{cost['wall_s']:.0f}" if "wall_s" in cost else
                    f"{sum(v for r in rows for k, v in r.items() if k.startswith('time/') and v):.0f}*")
            lines.append(f"| {d.name} | {rows[-1]['step'] if rows else 0} | {reward} | "
                         f"{metric_mean(rows, 'teacher/success_group_fraction'):.3f} | "
                         f"{metric_mean(rows, 'teacher/feedback_fraction'):.3f} | {wall} | {cost.get('cpu_s', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", default=list(METHODS))
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides applied to every run and the probe")
    parser.add_argument("--probe-extra", nargs="*", default=["trainer.questions_per_step=16",
                                                             "trainer.mini_batch_questions=16"],
                        help="Hydra overrides for the probe only")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--method", action="append", default=[], help="name=override,override (adds a method)")
    parser.add_argument("--out", default="benchmarks/runs/feedback_learning_cpu")
    parser.add_argument("--results", default=None, help="markdown file for the report (a .png curve next to it)")
    parser.add_argument("--summarize-only", action="store_true", help="rebuild the report from existing run dirs")
    args = parser.parse_args()
    for spec in args.method:
        name, _, overrides = spec.partition("=")
        METHODS[name] = [o for o in overrides.split(",") if o]
        if name not in args.only:
            args.only.append(name)
    if not (args.summarize_only or args.no_probe):
        run_probe(args)
    runs: dict[str, list[Path]] = {}
    for seed in args.seeds:
        for name in args.only:
            out = Path(args.out) / f"{name}-seed{seed}"
            runs.setdefault(name, []).append(out if args.summarize_only else run_one(name, seed, args))
    report = summarize(runs, args)
    print(report)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(report)
        png = Path(args.results).with_suffix(".png")
        dirs = [d for ds in runs.values() for d in ds if (d / "metrics.jsonl").exists()]
        plot_curves(dirs, [f"eval/avg@{args.eval_samples}", "reward/mean"], png, labels=[d.name for d in dirs])
        print(f"wrote {args.results} and {png}")


if __name__ == "__main__":
    main()
