"""Teacher context from the data (issue #30): does SDPO learn where GRPO is blind when the teacher sees a reference?

Two tasks (--task, `TASKS`), where almost no rollout succeeds so that GRPO's group advantage is (nearly) zero:
`convention` (experiment=convention_cpu, sdpo/envs/convention.py: single-digit multiplication asked plainly and graded
under an answer convention the question does not state) and `answer_first` (the default task with 4 new tokens: only a
response that starts with the number can succeed). Four methods, each `scripts/train.py` in its own process, over
several seeds:

- grpo: the baseline;
- sdpo_rule: pure SDPO whose teacher reads the checker's feedback only (algorithm.reprompt.data_context=off);
- sdpo_reference: pure SDPO whose teacher reads the environment's correct response for the training question
  (env.reference_as_teacher_context=true, data_context=prefer: in the solution slot) - what only the teacher sees;
- sdpo_grpo_reference: the lambda = 0.9 hybrid with the same context.

Held-out questions are other products than the training ones, and their references are never shown (evaluation never
reprompts). Each run also evaluates other environments (eval.other_envs: what training costs elsewhere) and logs
pass@1 and pass@n (diversity). Before the runs, scripts/probe.py reads what each context offers.

    python benchmarks/privileged_cpu.py --seeds 0 1 2 --results benchmarks/results/privileged_cpu.md
    python benchmarks/privileged_cpu.py --task answer_first --out benchmarks/runs/privileged_answer_first \\
        --results benchmarks/results/privileged_answer_first_cpu.md

--summarize-only rebuilds the report from the run directories; --only picks methods; --no-probe skips the probes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
import os
from pathlib import Path
import shutil
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

REFERENCE = ["env.reference_as_teacher_context=true", "algorithm.reprompt.data_context=prefer"]
COMMON = ["logging.progress_bar=false", "trainer.save_every=0", "trainer.keep_last=1"]


@dataclass(frozen=True)
class Task:
    title: str
    preset: list[str]  # overrides of every run and probe
    methods: dict[str, list[str]]
    probes: dict[str, list[str]]
    other_envs: dict[str, str]  # metric label (eval_<label>/...) -> eval.other_envs entry
    about: str  # what a run is, for the report


TASKS = {
    # The convention task (sdpo/envs/convention.py): plain questions graded under an unstated answer convention
    # whose rule the checker's feedback states. No rollout meets it: GRPO is blind.
    "convention": Task(
        "the convention task", ["experiment=convention_cpu"],
        {"grpo": ["algorithm=grpo"],
         "sdpo_rule": ["algorithm=sdpo", "algorithm.reprompt.data_context=off"],
         "sdpo_reference": ["algorithm=sdpo", *REFERENCE],
         "sdpo_grpo_reference": ["algorithm=sdpo_grpo", *REFERENCE]},
        {"rule only": ["algorithm.reprompt.data_context=off"], "reference": REFERENCE},
        {"arithmetic": "arithmetic"},
        "10 steps of 8 questions x 4 rollouts, 16 new tokens, held-out avg@4 on 20 unseen products every 2 steps"),
    # Answer first (calibrated with scripts/probe.py in benchmarks/results/privileged_answer_first_cpu.md): the
    # default task with 4 new tokens, so only a response that starts with the number can succeed; SmolLM2 writes
    # "7 * 8 = " first by habit. Rule only: the checker's feedback ("no number" / "X is not correct"); reference: the
    # bare answer in the solution slot, without the feedback (the calibration's best teacher).
    "answer_first": Task(
        "answer first under a 4-token budget (arithmetic, rollout.max_new_tokens=4)", ["rollout.max_new_tokens=4"],
        {"grpo": ["algorithm=grpo"],
         "sdpo_rule": ["algorithm=sdpo", "env.feedback=true", "algorithm.reprompt.data_context=off"],
         "sdpo_reference": ["algorithm=sdpo", "env.feedback=false", *REFERENCE],
         "sdpo_grpo_reference": ["algorithm=sdpo_grpo", "env.feedback=false", *REFERENCE]},
        {"rule only": ["algorithm=sdpo", "env.feedback=true", "algorithm.reprompt.data_context=off"],
         "reference": ["algorithm=sdpo", "env.feedback=false", *REFERENCE]},
        {"arithmetic_48": "{name:arithmetic,label:arithmetic_48,max_new_tokens:48}",
         "addition": "{name:arithmetic,label:addition,ops:[+],min_operand:10,max_operand:99,max_eval_rows:20,"
                             "max_new_tokens:48}"},
        "10 steps of 8 questions x 4 rollouts, 4 new tokens, held-out avg@4 on 20 unseen products every 2 steps"),
}


def common(args: argparse.Namespace) -> list[str]:
    task = TASKS[args.task]
    return [*task.preset, *COMMON, f"eval.other_envs=[{','.join(task.other_envs.values())}]"]


def train_run(out: Path, overrides: list[str]) -> Path:
    """scripts/train.py with `overrides` into `out` (fresh metrics), its cost in cost.json; its checkpoint (about
    1 GiB) is deleted: the reports read metrics.jsonl only."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    wall, cpu, code = run_script("train.py", [*overrides, f"trainer.output_dir={out}"], out / "train.log")
    (out / "cost.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "exit_code": code}) + "\n")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    print(f"{out.name}: exit {code}, {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return out


def run_one(name: str, seed: int, args: argparse.Namespace) -> Path:
    return train_run(Path(args.out) / f"{name}-seed{seed}",
                     [*common(args), *TASKS[args.task].methods[name], f"trainer.seed={seed}", *args.extra])


def run_probe(label: str, overrides: list[str], args: argparse.Namespace) -> Path:
    out = Path(args.out) / f"probe-{label.replace(' ', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    wall, _, code = run_script("probe.py", [*TASKS[args.task].preset, *overrides, *args.probe_extra,
                                            f"trainer.output_dir={out}"],
                               out / "probe.log")
    print(f"probe ({label}): exit {code}, {wall:.0f} s wall", flush=True)
    return out


def probe_rows(args: argparse.Namespace) -> list[str]:
    keys = [("student success sampled", "student_success_sampled"), ("groups with a success", "success_group_fraction"),
            ("rollouts with data context", "data_context_fraction"),
            ("teacher success sampled / greedy", ("teacher_success_sampled", "teacher_success_greedy")),
            ("log p(correct): question -> reprompt", ("logp_correct_student", "logp_correct_teacher")),
            ("echo rate", "echo_fraction")]
    files = {label: Path(args.out) / f"probe-{label.replace(' ', '_')}" / "probe.json" for label in TASKS[args.task].probes}
    found = {label: json.loads(path.read_text()) for label, path in files.items() if path.exists()}
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
    for label, result in found.items():
        examples = result.get("examples", [])[:3]
        if examples:
            lines += ["", f"What the student and the reprompted teacher wrote ({label}; probe.json's first failed rollouts):"]
            lines += [f"- student {e['response']!r} -> teacher {e['teacher']!r} (teacher reward {e['teacher_reward']:g})"
                      for e in examples]
    return lines


def first_last(rows: list[dict], key: str) -> tuple[float, float] | None:
    points = [r[key] for r in rows if r.get(key) is not None]
    return (points[0], points[-1]) if points else None


def start_end_cell(runs: list[Path], key: str) -> str:
    """`key`'s first and last logged values, means over `runs`, and each run's last in brackets (several runs)."""
    pairs = [p for p in (first_last(read_metrics(d), key) for d in runs) if p is not None]
    if not pairs:
        return "n/a"
    start, end = statistics.mean(p[0] for p in pairs), statistics.mean(p[1] for p in pairs)
    seeds = " [" + ", ".join(f"{p[1]:.2f}" for p in pairs) + "]" if len(pairs) > 1 else ""
    return f"{start:.3f} -> {end:.3f} ({end - start:+.3f}){seeds}"


def summarize(runs: dict[str, list[Path]], args: argparse.Namespace) -> str:
    n = args.eval_samples
    task = TASKS[args.task]
    keys = {"held-out": f"eval/avg@{n}", "pass@1": "eval/pass@1", f"pass@{n}": f"eval/pass@{n}",
            **{f"{label} (other env)": f"eval_{label}/avg@{n}" for label in task.other_envs}}
    lines = [f"# Teacher context from the data on the CPU: GRPO vs SDPO (rule only, reference) on {task.title}",
             "", f"Date: {time.strftime('%Y-%m-%d')}. Machine: {describe()}.", f"Command: `python {' '.join(sys.argv)}`",
             f"Every run: `scripts/train.py {' '.join(common(args))} <method> trainer.seed=<seed>` ({task.about}; one "
             "run at a time).", "",
             "## The probe (scripts/probe.py, initial weights, before training)", "", *probe_rows(args), "",
             "## Start -> end, mean over seeds (per seed in brackets)", "",
             "| method | seeds | " + " | ".join(keys) + " | wall s (mean) |", "|---|---|" + "---|" * len(keys) + "---|"]
    for name, dirs in runs.items():
        done = [d for d in dirs if (d / "cost.json").exists() and (d / "metrics.jsonl").exists()]
        if not done:
            continue
        cells = [start_end_cell(done, key) for key in keys.values()]
        wall = statistics.mean(json.loads((d / "cost.json").read_text())["wall_s"] for d in done)
        lines.append(f"| {name} (`{' '.join(task.methods[name])}`) | {len(done)} | " + " | ".join(cells) + f" | {wall:.0f} |")
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
    parser.add_argument("--task", default="convention", choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=None, choices=list(TASKS["convention"].methods),
                        help="methods (default: all of the task's)")
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every training run")
    parser.add_argument("--probe-extra", nargs="*", default=["trainer.questions_per_step=8",
                                                             "trainer.mini_batch_questions=8"])
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--out", default="benchmarks/runs/privileged_cpu")
    parser.add_argument("--results", default=None, help="markdown file for the report (a .png curve next to it)")
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args()
    args.only = args.only or list(TASKS[args.task].methods)
    if not (args.summarize_only or args.no_probe):
        for label, overrides in TASKS[args.task].probes.items():
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
        others = [f"eval_{label}/avg@{args.eval_samples}" for label in TASKS[args.task].other_envs]
        plot_curves(dirs, [f"eval/avg@{args.eval_samples}", *others, "reward/mean"], png, labels=[d.name for d in dirs])
        print(f"wrote {args.results} and {png}")


if __name__ == "__main__":
    main()
