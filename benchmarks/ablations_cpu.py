"""The paper's SDPO ablations at CPU scale, one table: teacher regularisation (Table 4), feedback type (Table 6), credit
granularity, the lambda hybrid; the paper's numbers beside them (docs/algorithm.md §4, §8).

Each row is a preset of the `ablation` config group (configs/ablation/) on the CPU preset with small sizes; one seed.
The environment is an option (--env), so that the table can be rerun on another task, and so are the base preset
and the sizes (paper scale: --base experiment=livecodebench with the sizes left to the preset, on a GPU machine).

    python benchmarks/ablations_cpu.py --results benchmarks/results/ablations_cpu.md
    python benchmarks/ablations_cpu.py --env env=<new task> --results ...      # another task

Rows that are the same run (teacher_ema = feedback_both = credit_logits: EMA teacher, solution + feedback, top-100
logits) are trained once. All runs of one invocation share one rollout engine (vLLM start-up is ~half a minute on
this CPU): before each run the engine is given that run's initial weights, which is all a fresh engine would hold.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import shlex
import shutil
import statistics
import sys
import time

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from machine import describe  # noqa: E402

from sdpo.hydra_config import load_config  # noqa: E402
from sdpo.tracking import read_metrics  # noqa: E402

# (table, setting, ablation preset, the paper's number: docs/algorithm.md §4, §8)
ROWS = [
    ("Table 4: teacher", "live", "teacher_live", "36.1 / 29.8 (best / avg, LCB)"),
    ("Table 4: teacher", "frozen (initial)", "teacher_frozen", "48.8 / 44.4"),
    ("Table 4: teacher", "EMA (0.05)", "teacher_ema", "49.3 / 45.3"),
    ("Table 4: teacher", "trust region (0.5)", "teacher_trust_region", "50.6 / 45.6 (best)"),
    ("Table 6: feedback", "solution only", "feedback_solution_only", "-"),
    ("Table 6: feedback", "feedback only", "feedback_only", "39.9 (LCB)"),
    ("Table 6: feedback", "solution + feedback", "feedback_both", "48.3 (best)"),
    ("Table 6: feedback", "own attempt + both", "feedback_own_attempt", "44.5"),
    ("credit", "top-k logits (k=100)", "credit_logits", "1st (order only)"),
    ("credit", "sampled token", "credit_token", "2nd"),
    ("credit", "sequence", "credit_sequence", "3rd"),
    ("credit", "GRPO", "credit_grpo", "4th"),
    ("lambda", "hybrid 0.9 (advantage level)", "lambda_hybrid", "helps 0.6B, slightly hurts 8B"),
]
SAME_RUN = {"feedback_both": "teacher_ema", "credit_logits": "teacher_ema"}  # identical configs


def train_run(overrides: list[str], engine=None):
    """One training run in this process; `engine`: a rollout engine to reuse (given this run's initial weights).
    Returns (run directory, the engine, seconds)."""
    from sdpo.trainer import SDPOTrainer

    start = time.time()
    config = load_config(overrides)
    trainer = SDPOTrainer(config, engine=engine)
    if engine is not None:
        engine.sync_weights(trainer.learner.unwrapped)
    try:
        trainer.train()
    finally:
        trainer.run.tracker.close()
    return trainer.run_dir, trainer.engine, time.time() - start


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def row_cells(run_dir: Path, eval_key: str) -> list[str]:
    rows = read_metrics(run_dir)
    evals = [(r["step"], r[eval_key]) for r in rows if r.get(eval_key) is not None]
    train = [r for r in rows if r.get("reward/mean") is not None]
    last = train[-3:]
    start, end = (evals[0][1], evals[-1][1]) if evals else (float("nan"), float("nan"))
    best = max(v for _, v in evals) if evals else float("nan")
    step_s = statistics.median([sum(v for k, v in r.items() if k.startswith("time/") and v) for r in train] or [0.0])
    at = f" at step {evals[-1][0]}" if evals else ""

    def last_mean(key: str) -> str:
        values = [r[key] for r in last if r.get(key) is not None]
        return f"{mean(values):.2f}" if values else "-"

    return [f"{start:.3f} -> {end:.3f}{at} ({best:.3f}); {len(train)} steps", last_mean("reward/mean"), last_mean("teacher/reprompt_fraction"),
            last_mean("diagnostics/echo_template_fraction"), last_mean("diagnostics/echo_feedback_fraction"),
            last_mean("diagnostics/demo_copy"), last_mean("diagnostics/entropy_drift"),
            last_mean("diagnostics/length_drift"), f"{step_s:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", nargs="*", default=["experiment=cpu"], help="the preset the ablations go on")
    parser.add_argument("--env", nargs="*", default=["env=arithmetic", "env.feedback=true"],
                        help="environment overrides (feedback on: Table 6 compares feedback types)")
    parser.add_argument("--sizes", nargs="*", default=[
        "trainer.total_steps=6", "trainer.questions_per_step=4", "trainer.mini_batch_questions=4",
        "rollout.num_generations=4", "eval.every=3", "eval.samples_per_question=2"])
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--only", nargs="*", default=None, help="ablation presets to run (default: all rows)")
    parser.add_argument("--out", default="benchmarks/runs/ablations_cpu")
    parser.add_argument("--results", default=None)
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args()
    common = [*args.base, *args.env, *args.sizes, "trainer.keep_last=1", "logging.progress_bar=false",
              "logging.samples_every=0", *args.extra]
    wanted = [name for _, _, name, _ in ROWS if args.only is None or name in args.only]
    runs = {name: Path(args.out) / name for name in dict.fromkeys(SAME_RUN.get(n, n) for n in wanted)}
    seconds: dict[str, float] = {}
    engine = None
    if not args.summarize_only:
        for run in runs.values():
            (run / "metrics.jsonl").unlink(missing_ok=True)
        for name, out in runs.items():
            _, engine, seconds[name] = train_run([f"ablation={name}", *common, f"trainer.output_dir={out}"], engine)
            # The table needs the metrics only; 13 runs' checkpoints (1.6 GB each) once filled this machine's disk.
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            print(f"{name}: {seconds[name]:.0f} s", flush=True)
            write_report(args, common, wanted, runs, seconds)  # after every run: a stopped benchmark keeps its rows
        if engine is not None:
            engine.close()
    write_report(args, common, wanted, runs, seconds)


def write_report(args: argparse.Namespace, common: list[str], wanted: list[str], runs: dict[str, Path],
                 seconds: dict[str, float]) -> None:
    config = load_config([*common, f"ablation={wanted[0]}"])
    eval_key = f"eval/avg@{config.eval.samples_per_question}"
    env_text = " ".join(args.env)
    lines = [
        "# SDPO ablations at CPU scale (paper Tables 4 and 6, credit granularity, lambda hybrid)",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {describe()}.",
        f"Precision: model.autocast_dtype={config.model.autocast_dtype} (resolved per machine: bf16 autocast on "
        f"AMX/AVX512-BF16 CPUs, else float32), float32 master weights; rollouts {config.rollout.engine}"
        + (f" (dtype {config.rollout.vllm.dtype})" if config.rollout.engine == "vllm" else "") + ".",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"Setup: {config.model.name_or_path} on `{env_text}`, base `{' '.join(args.base)}`, "
        f"{config.trainer.total_steps} steps of {config.trainer.questions_per_step} questions x "
        f"{config.rollout.num_generations} rollouts, max {config.rollout.max_new_tokens} new tokens, lr "
        f"{config.trainer.optim.lr}, one seed ({config.trainer.seed}); held-out {eval_key} on "
        f"{config.eval.num_questions or 'all'} test questions every {config.eval.every} steps (temperature "
        f"{config.eval.temperature}). Rows marked = are the same run as the EMA row.",
        "",
        "Columns: held-out start -> final (best) and the steps trained; the last 3 steps' means of the training reward, the fraction of rollouts "
        "with a teacher signal, and the failure-mode metrics (sdpo/diagnostics.py: template echo, feedback echo, "
        "demonstration copying, entropy change and length ratio against step 1); median seconds per step.",
        "",
        f"| ablation | setting | `ablation=` | {eval_key} | train reward | signal | echo tmpl | echo fb | copy | "
        "d entropy | length x | s/step | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for table, setting, name, paper in ROWS:
        if name not in wanted:
            continue
        run = SAME_RUN.get(name, name)
        if not (runs[run] / "metrics.jsonl").exists():
            lines.append(f"| {table} | {setting} | {name} | not run | | | | | | | | | {paper} |")
            continue
        mark = " (=)" if run != name else ""
        lines.append(f"| {table} | {setting} | {name}{mark} | " + " | ".join(row_cells(runs[run], eval_key))
                     + f" | {paper} |")
    if seconds:
        lines += ["", f"Wall time: {sum(seconds.values()) / 60:.1f} min for {len(seconds)} runs "
                      f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})."]
    if len(seconds) < len(runs) and not args.summarize_only:
        lines += ["", f"Incomplete: {len(seconds)} of {len(runs)} runs finished when this was written."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(report)


if __name__ == "__main__":
    main()
