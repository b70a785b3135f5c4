"""Multi-turn episodes on the CPU (SmolLM2-135M-Instruct, arithmetic with feedback): training and test-time.

1. Training: multi-turn GRPO vs multi-turn SDPO (the CPU preset's lambda = 0.9 hybrid, and pure SDPO with --with-sdpo)
   on single-digit multiplication with feedback ("X is not the correct answer. Try again."), episodes of up to
   --turns turns; held-out success within the turn budget (eval/episode_success) and on the first turn (avg@k).
2. Test-time (scripts/test_time.py's run_test_time): SDPO vs best-of-k vs the multi-turn baseline, discovery@k, on
   the first --tt-questions held-out questions of two-digit multiplication (11-25), the harder task where the base
   model rarely answers right first.

    python benchmarks/multi_turn_cpu.py --steps 6 --eval-every 3 --results benchmarks/results/multi_turn_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from benchmarks.machine import describe, peak_rss_mib  # noqa: E402
from sdpo.hydra_config import load_config  # noqa: E402
from sdpo.tracking import read_metrics  # noqa: E402

METHODS = {"grpo": ["algorithm=grpo"], "sdpo_grpo": ["algorithm=sdpo_grpo"], "sdpo": ["algorithm=sdpo"]}


def train_overrides(args: argparse.Namespace) -> list[str]:
    return ["env=arithmetic", "env.feedback=true", f"rollout.max_turns={args.turns}", f"trainer.total_steps={args.steps}",
            f"eval.every={args.eval_every}", f"trainer.seed={args.seed}", "trainer.keep_last=1",
            "logging.progress_bar=false", *args.extra]


def test_time_overrides(args: argparse.Namespace) -> list[str]:
    return ["env=arithmetic", "env.feedback=true", "env.min_operand=11", "env.max_operand=25", "algorithm=sdpo",
            "trainer.questions_per_step=1", "trainer.mini_batch_questions=1", f"rollout.num_generations={args.tt_k}",
            "eval.every=0", f"test_time.budget={args.tt_budget}", f"test_time.num_questions={args.tt_questions}",
            "test_time.methods=[sdpo,best_of_k,multi_turn]", "logging.progress_bar=false", *args.extra]


def run_training(name: str, args: argparse.Namespace) -> tuple[Path, float]:
    from sdpo.trainer import SDPOTrainer

    out = Path(args.out) / name
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    start = time.perf_counter()
    SDPOTrainer(load_config([*METHODS[name], *train_overrides(args), f"trainer.output_dir={out}"])).train()
    return out, time.perf_counter() - start


def training_table(runs: dict[str, tuple[Path, float]], args: argparse.Namespace) -> list[str]:
    config = load_config(train_overrides(args))
    k = config.eval.samples_per_question
    lines = ["| method | step | held-out success within "
             f"{args.turns} turns | held-out first-turn avg@{k} | turns per held-out episode |", "|---|---|---|---|---|"]
    for name, (out, _) in runs.items():
        for row in read_metrics(out):
            if row.get("eval/episode_success") is not None:
                lines.append(f"| {name} | {row['step']} | {row['eval/episode_success']:.3f} | {row[f'eval/avg@{k}']:.3f} "
                             f"| {row['eval/episode_turns']:.2f} |")
    lines += ["", "| method | train episode success (mean over steps) | train first-turn reward | turns per episode "
              "| wall time (s) |", "|---|---|---|---|---|"]
    for name, (out, seconds) in runs.items():
        rows = [r for r in read_metrics(out) if r.get("episode/success") is not None]
        means = {key: sum(r[key] for r in rows) / max(len(rows), 1)
                 for key in ("episode/success", "episode/first_turn_reward", "episode/turns_mean")}
        lines.append(f"| {name} | {means['episode/success']:.3f} | {means['episode/first_turn_reward']:.3f} | "
                     f"{means['episode/turns_mean']:.2f} | {seconds:.0f} |")
    return lines


def run_test_time_table(args: argparse.Namespace) -> tuple[list[str], dict]:
    from sdpo.test_time import run_test_time

    out = Path(args.out) / "test_time"
    config = load_config([*test_time_overrides(args), f"trainer.output_dir={out}"])
    start = time.perf_counter()
    report = run_test_time(config)
    report["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "test_time.json").write_text(json.dumps(report, indent=2) + "\n")
    ks = sorted(next(iter(report["discovery"].values())))
    lines = ["| method | " + " | ".join(f"discovery@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for method, curve in report["discovery"].items():
        lines.append(f"| {method} | " + " | ".join(f"{curve[k]:.3f}" for k in ks) + " |")
    ids = [q["question_id"] for q in report["questions"]["sdpo"]]
    firsts = {m: [q["solved_at"] for q in qs] for m, qs in report["questions"].items()}
    lines += ["", "First successful attempt per question (" + " / ".join(firsts) + "): " + ", ".join(
        f"{qid} " + "/".join(str(firsts[m][i] or "-") for m in firsts) for i, qid in enumerate(ids)) + "."]
    return lines, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-sdpo", action="store_true", help="also pure SDPO (algorithm=sdpo)")
    parser.add_argument("--parts", nargs="+", default=["train", "test_time"])
    parser.add_argument("--tt-questions", type=int, default=8)
    parser.add_argument("--tt-budget", type=int, default=32)
    parser.add_argument("--tt-k", type=int, default=8, help="attempts per step (rollout.num_generations)")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides applied to every run")
    parser.add_argument("--out", default="benchmarks/runs/multi_turn_cpu")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    from sdpo.precision import resolve_precision

    resolved = load_config(train_overrides(args))
    resolve_precision(resolved)  # `auto` -> what this machine runs natively
    lines = ["# Multi-turn episodes on the CPU", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {describe()}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- precision: {resolved.model.dtype} weights, autocast {resolved.model.autocast_dtype}; rollout engine "
             f"{resolved.rollout.engine}"]
    if "train" in args.parts:
        names = ["grpo", "sdpo_grpo"] + (["sdpo"] if args.with_sdpo else [])
        runs = {name: run_training(name, args) for name in names}
        lines += ["", "## Training: multi-turn GRPO vs multi-turn SDPO", "",
                  f"Overrides (on the CPU preset): `{' '.join(train_overrides(args))}`", "", *training_table(runs, args)]
    if "test_time" in args.parts:
        table, report = run_test_time_table(args)
        lines += ["", "## Test-time: SDPO vs best-of-k vs multi-turn", "",
                  f"Overrides: `{' '.join(test_time_overrides(args))}`; {report['num_questions']} questions, "
                  f"{report['seconds']:.0f} s", "", *table]
    lines += ["", f"Peak RSS {peak_rss_mib():.0f} MiB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
