"""Teacher context from the data (issue #30): does SDPO learn where GRPO is blind when the teacher sees a reference?

The task is `experiment=convention_cpu` (sdpo/envs/convention.py): single-digit multiplication asked plainly and
graded under an answer convention the question does not state, so almost no rollout succeeds and GRPO's group
advantage is zero. Four methods, each `scripts/train.py` in its own process, over several seeds:

- grpo: the baseline;
- sdpo_rule: pure SDPO whose teacher reads the checker's rule only (the feedback; algorithm.reprompt.data_context=off);
- sdpo_reference: pure SDPO whose teacher also reads the environment's correct response for the training question
  (env.reference_as_teacher_context=true, data_context=prefer: in the solution slot) - what only the teacher sees;
- sdpo_grpo_reference: the lambda = 0.9 hybrid with the same context.

Held-out questions are other products than the training ones, and their references are never shown (evaluation never
reprompts). Each run also evaluates plain arithmetic (eval.other_envs=[arithmetic]: what training costs elsewhere)
and logs pass@1 and pass@n (diversity). Before the runs, scripts/probe.py reads what each context offers.

    python benchmarks/privileged_cpu.py --seeds 0 1 2 --results benchmarks/results/privileged_cpu.md

--summarize-only rebuilds the report from the run directories; --only picks methods; --no-probe skips the probes.
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

from benchmarks.feedback_learning_cpu import metric_mean, run_script, step_rows  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from sdpo.tracking import plot_curves, read_metrics  # noqa: E402

PRESET = "experiment=convention_cpu"
REFERENCE = ["env.reference_as_teacher_context=true", "algorithm.reprompt.data_context=prefer"]
METHODS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo"],
    "sdpo_rule": ["algorithm=sdpo", "algorithm.reprompt.data_context=off"],
    "sdpo_reference": ["algorithm=sdpo", *REFERENCE],
    "sdpo_grpo_reference": ["algorithm=sdpo_grpo", *REFERENCE],
}
PROBES: dict[str, list[str]] = {"rule only": ["algorithm.reprompt.data_context=off"], "reference": REFERENCE}
COMMON = [PRESET, "logging.progress_bar=false", "trainer.save_every=0", "trainer.keep_last=1",
          "eval.other_envs=[arithmetic]"]


def run_one(name: str, seed: int, args: argparse.Namespace) -> Path:
    out = Path(args.out) / f"{name}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    wall, cpu, code = run_script("train.py", [*COMMON, *METHODS[name], f"trainer.seed={seed}",
                                              f"trainer.output_dir={out}", *args.extra], out / "train.log")
    (out / "cost.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "exit_code": code}) + "\n")
    print(f"{out.name}: exit {code}, {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return out


def run_probe(label: str, overrides: list[str], args: argparse.Namespace) -> Path:
    out = Path(args.out) / f"probe-{label.replace(' ', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    wall, _, code = run_script("probe.py", [PRESET, *overrides, *args.probe_extra, f"trainer.output_dir={out}"],
                               out / "probe.log")
    print(f"probe ({label}): exit {code}, {wall:.0f} s wall", flush=True)
    return out


def probe_rows(args: argparse.Namespace) -> list[str]:
    keys = [("student success sampled", "student_success_sampled"), ("groups with a success", "success_group_fraction"),
            ("rollouts with data context", "data_context_fraction"),
            ("teacher success sampled / greedy", ("teacher_success_sampled", "teacher_success_greedy")),
            ("log p(correct): question -> reprompt", ("logp_correct_student", "logp_correct_teacher")),
            ("echo rate", "echo_fraction")]
    found = {label: json.loads((Path(args.out) / f"probe-{label.replace(' ', '_')}" / "probe.json").read_text())
             for label in PROBES if (Path(args.out) / f"probe-{label.replace(' ', '_')}" / "probe.json").exists()}
    if not found:
        return ["(no probe run)"]
    lines = ["| measure | " + " | ".join(found) + " |", "|---|" + "---|" * len(found)]
    for name, key in keys:
        cells = []
        for result in found.values():
            if isinstance(key, tuple):
                cells.append(" / ".join(f"{result[k]:.2f}" for k in key))
            else:
                cells.append(f"{result[key]:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def first_last(rows: list[dict], key: str) -> tuple[float, float] | None:
    points = [r[key] for r in rows if r.get(key) is not None]
    return (points[0], points[-1]) if points else None


def summarize(runs: dict[str, list[Path]], args: argparse.Namespace) -> str:
    n = args.eval_samples
    keys = {"held-out": f"eval/avg@{n}", "pass@1": "eval/pass@1", f"pass@{n}": f"eval/pass@{n}",
            "arithmetic (other env)": f"eval_arithmetic/avg@{n}"}
    lines = ["# Teacher context from the data on the CPU: GRPO vs SDPO (rule only, reference) on the convention task",
             "", f"Date: {time.strftime('%Y-%m-%d')}. Machine: {describe()}.", f"Command: `python {' '.join(sys.argv)}`",
             f"Every run: `scripts/train.py {' '.join(COMMON)} <method> trainer.seed=<seed>` (10 steps of 8 questions "
             "x 4 rollouts, held-out avg@4 on 20 unseen products every 2 steps; one run at a time).", "",
             "## The probe (scripts/probe.py, initial weights, before training)", "", *probe_rows(args), "",
             "## Start -> end, mean over seeds (per seed in brackets)", "",
             "| method | seeds | " + " | ".join(keys) + " | wall s (mean) |", "|---|---|" + "---|" * len(keys) + "---|"]
    for name, dirs in runs.items():
        done = [d for d in dirs if (d / "cost.json").exists() and (d / "metrics.jsonl").exists()]
        if not done:
            continue
        cells = []
        for key in keys.values():
            pairs = [first_last(read_metrics(d), key) for d in done]
            pairs = [p for p in pairs if p is not None]
            if not pairs:
                cells.append("n/a")
                continue
            start, end = statistics.mean(p[0] for p in pairs), statistics.mean(p[1] for p in pairs)
            cells.append(f"{start:.3f} -> {end:.3f} ({end - start:+.3f}) [" + ", ".join(f"{p[1]:.2f}" for p in pairs) + "]")
        wall = statistics.mean(json.loads((d / "cost.json").read_text())["wall_s"] for d in done)
        lines.append(f"| {name} (`{' '.join(METHODS[name])}`) | {len(done)} | " + " | ".join(cells) + f" | {wall:.0f} |")
    lines += ["", "## Training signal per run (means over its steps)", "",
              "| run | reward first -> last | groups with a success | rollouts with data context | student-teacher KL |",
              "|---|---|---|---|---|"]
    for dirs in runs.values():
        for d in dirs:
            rows = step_rows(d)
            if not rows:
                continue
            means = [metric_mean(rows, key) for key in ("teacher/success_group_fraction",
                                                         "teacher/data_context_fraction", "distill/student_teacher_kl")]
            lines.append(f"| {d.name} | {rows[0]['reward/mean']:.3f} -> {rows[-1]['reward/mean']:.3f} | "
                         + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every training run")
    parser.add_argument("--probe-extra", nargs="*", default=["trainer.questions_per_step=8",
                                                             "trainer.mini_batch_questions=8"])
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--out", default="benchmarks/runs/privileged_cpu")
    parser.add_argument("--results", default=None, help="markdown file for the report (a .png curve next to it)")
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args()
    if not (args.summarize_only or args.no_probe):
        for label, overrides in PROBES.items():
            run_probe(label, overrides, args)
    runs: dict[str, list[Path]] = {name: [] for name in args.only}
    for seed in args.seeds:  # seed-major: an interrupted benchmark still has every method at the first seeds
        for name in args.only:
            out = Path(args.out) / f"{name}-seed{seed}"
            runs[name].append(out if args.summarize_only else run_one(name, seed, args))
    report = summarize(runs, args)
    print(report)
    if args.results:
        Path(args.results).write_text(report)
        png = Path(args.results).with_suffix(".png")
        dirs = [d for ds in runs.values() for d in ds if (d / "metrics.jsonl").exists()]
        plot_curves(dirs, [f"eval/avg@{args.eval_samples}", f"eval_arithmetic/avg@{args.eval_samples}",
                           "reward/mean"], png, labels=[d.name for d in dirs])
        print(f"wrote {args.results} and {png}")


if __name__ == "__main__":
    main()
