"""The failure-mode metrics (sdpo/diagnostics.py) on a CPU task, and the collapse guard acting (sdpo/guards.py).

Three runs on the CPU preset, each keeping its best checkpoint by held-out avg@k (trainer.keep_best):
- `hybrid`: the default run (lambda = 0.9 SDPO+GRPO);
- `sdpo`: pure SDPO (EMA teacher);
- `collapse`: pure SDPO with the live teacher at a higher learning rate, a setting that collapsed in issue #2's
  calibration, with trainer.collapse_drop set: the run stops once held-out accuracy falls that far below its best.
The environment is an option (--env), so the same report can be made on another task:

    python benchmarks/failure_modes_cpu.py --results benchmarks/results/failure_modes_cpu.md
    python benchmarks/failure_modes_cpu.py --env env=<task> --results ...

All runs of one invocation share one rollout engine, given each run's initial weights before it starts
(benchmarks/ablations_cpu.py does the same).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import shlex
import shutil
import sys
import time

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from ablations_cpu import train_run  # noqa: E402
from machine import describe  # noqa: E402

from sdpo.console import summary  # noqa: E402
from sdpo.hydra_config import load_config  # noqa: E402
from sdpo.tracking import read_metrics  # noqa: E402

RUNS = {
    "hybrid": [],
    "sdpo": ["algorithm=sdpo"],
    "collapse": ["algorithm=sdpo", "algorithm.teacher.kind=live", "trainer.optim.lr=1e-4"],
}
DIAGNOSTICS = ["echo_template_fraction", "echo_feedback_fraction", "demo_copy", "length_drift", "entropy_drift",
               "small_grad_fraction"]


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def report_run(name: str, overrides: list[str], run_dir: Path, eval_key: str) -> list[str]:
    rows = read_metrics(run_dir)
    lines = [f"## {name}: `{' '.join(overrides) or '(the default run)'}`", "",
             "```", summary(run_dir).replace(str(run_dir), f"<run>/{name}"), "```", "",
             f"| step | reward | signal | {eval_key} | " + " | ".join(DIAGNOSTICS) + " |",
             "|---" * (4 + len(DIAGNOSTICS)) + "|"]
    for r in rows:
        if r.get("reward/mean") is None and r.get(eval_key) is None:
            continue
        cells = [r["step"], r.get("reward/mean"), r.get("teacher/reprompt_fraction"), r.get(eval_key),
                 *(r.get("diagnostics/" + d) for d in DIAGNOSTICS)]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    samples = run_dir / "samples.jsonl"
    if samples.exists():
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        last = [r for r in rows if r["step"] == rows[-1]["step"]]
        lines += ["", f"Sample responses at step {last[0]['step']} (reward):", ""]
        lines += [f"- `{r['response'][:160]!r}` ({r['reward']:.0f})" for r in last]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", nargs="*", default=["env=arithmetic"])
    parser.add_argument("--steps", type=int, default=8, help="steps of the hybrid and sdpo runs")
    parser.add_argument("--collapse-steps", type=int, default=14, help="most steps of the collapse run")
    parser.add_argument("--collapse-drop", type=float, default=0.25)
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--only", nargs="*", default=list(RUNS))
    parser.add_argument("--out", default="benchmarks/runs/failure_modes_cpu")
    parser.add_argument("--results", default=None)
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args()
    base = load_config([*args.env, *args.extra])
    eval_key = f"eval/avg@{base.eval.samples_per_question}"
    common = [*args.env, f"trainer.keep_best.metric={eval_key}", "trainer.keep_last=1", "logging.progress_bar=false",
              "logging.samples_every=2", "logging.num_samples=4", *args.extra]
    sizes = {"collapse": [f"trainer.total_steps={args.collapse_steps}", f"trainer.collapse_drop={args.collapse_drop}"]}
    engine, seconds = None, {}
    used = {name: [*RUNS[name], *sizes.get(name, [f"trainer.total_steps={args.steps}"])] for name in args.only}
    for name in args.only if not args.summarize_only else []:
        out = Path(args.out) / name
        for stale in ("metrics.jsonl", "samples.jsonl"):
            (out / stale).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a stale best/ would be reported
        _, engine, seconds[name] = train_run([*common, *used[name], f"trainer.output_dir={out}"], engine)
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
        write_report(args, base, eval_key, used, seconds)  # after every run: a stopped benchmark keeps its runs
    if engine is not None:
        engine.close()
    write_report(args, base, eval_key, used, seconds)


def write_report(args: argparse.Namespace, base, eval_key: str, used: dict[str, list[str]],
                 seconds: dict[str, float]) -> None:
    lines = [
        "# Failure-mode metrics and the collapse guard on a CPU task",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {describe()}.",
        f"Precision: model.autocast_dtype={base.model.autocast_dtype} (bf16 autocast where the CPU runs it natively, "
        f"else float32), float32 master weights; rollouts {base.rollout.engine}.",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"Setup: the CPU preset ({base.model.name_or_path}, `{' '.join(args.env)}`, {base.trainer.questions_per_step} "
        f"questions x {base.rollout.num_generations} rollouts per step, {base.rollout.max_new_tokens} new tokens, "
        f"held-out {eval_key} on the {base.eval.num_questions or 'whole'} test split every {base.eval.every} steps), "
        f"trainer.keep_best.metric={eval_key}; one seed.",
        "",
        "Metrics (sdpo/diagnostics.py): echo_template_fraction, responses holding a reprompt template phrase; "
        "echo_feedback_fraction, responses sharing 5 words with another question's feedback; demo_copy, trigram "
        "overlap with the own demonstration minus that with another question's success (numbers masked); "
        "length_drift, mean length / step 1's; entropy_drift, mean token entropy - step 1's; small_grad_fraction, "
        "optimizer steps whose gradient is too small for AdamW to move the weights. signal: "
        "teacher/reprompt_fraction.",
        "",
    ]
    for name in args.only:
        run_dir = Path(args.out) / name
        if (run_dir / "metrics.jsonl").exists() and read_metrics(run_dir):
            lines += report_run(name, used[name], run_dir, eval_key)
    if seconds:
        lines.append(f"Wall time: {', '.join(f'{k} {v / 60:.1f} min' for k, v in seconds.items())}.")
    if len(seconds) < len(used) and not args.summarize_only:
        lines.append(f"Incomplete: {len(seconds)} of {len(used)} runs finished when this was written.")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.results:
        Path(args.results).write_text(report)


if __name__ == "__main__":
    main()
