"""Multi-turn episodes on the CPU (SmolLM2-135M-Instruct, arithmetic with feedback): training and test-time.

1. Training: multi-turn GRPO vs multi-turn SDPO (the CPU preset's lambda = 0.9 hybrid, and pure SDPO with --with-sdpo)
   on single-digit multiplication with feedback ("X is not the correct answer. Try again."), episodes of up to
   --turns turns; held-out success within the turn budget (eval/episode_success) and on the first turn (avg@k).
2. Test-time (scripts/test_time.py's run_test_time): SDPO vs best-of-k vs the multi-turn baseline, discovery@k, on
   the first --tt-questions held-out questions of two-digit multiplication (11-25), the harder task where the base
   model rarely answers right first.

3. Cost (--parts cost): the update's seconds per model token (the tokens the model wrote, the only ones with a
   loss) of 1-turn and 3-turn episodes on the default run's task with feedback, the 3-turn step with one row per turn
   (trainer.pack_episodes=false, the path before issue #31) and with each episode one sequence (the default).

    python benchmarks/multi_turn_cpu.py --steps 6 --eval-every 3 --results benchmarks/results/multi_turn_cpu.md
    python benchmarks/multi_turn_cpu.py --parts cost --cost-steps 4 --results benchmarks/results/multi_turn_cost_cpu.md
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


COST_RUNS = {"1 turn": ["rollout.max_turns=1"],
             "3 turns, one row per turn (before)": ["rollout.max_turns=3", "trainer.pack_episodes=false"],
             "3 turns, one sequence per episode": ["rollout.max_turns=3", "trainer.pack_episodes=true"],
             # Micro-batches of up to 24 turns: about 8 episodes of 3 turns, as micro-batches were cut before they
             # counted turns (up to 8 sequences, i.e. episodes).
             "3 turns, one sequence per episode, 24 turns per micro-batch": [
                 "rollout.max_turns=3", "trainer.pack_episodes=true", "trainer.micro_batch_size=24"]}


def cost_run(name: str, args: argparse.Namespace) -> list[dict[str, float]]:
    """`--cost-steps` training steps of the default run with feedback; per step its stage times and token counts."""
    from sdpo.trainer import SDPOTrainer

    overrides = ["env.feedback=true", "eval.every=0", "trainer.keep_last=1", "logging.progress_bar=false",
                 f"trainer.seed={args.seed}", f"trainer.total_steps={args.cost_steps}", *COST_RUNS[name], *args.extra,
                 f"trainer.output_dir={Path(args.out) / 'cost' / name.split(',')[0].replace(' ', '_')}"]
    trainer = SDPOTrainer(load_config(overrides))
    steps = []
    for _ in range(args.cost_steps):
        start = time.perf_counter()
        result = trainer.training_step()
        batch, metrics = result.batch, result.metrics
        steps.append({
            "seconds": time.perf_counter() - start,
            "update": metrics.get("time/update", 0.0), "teacher": metrics.get("time/teacher_forward", 0.0),
            "generate": metrics.get("time/generate", 0.0),
            "rows": len(batch), "model_tokens": sum(len(r) for r in batch.response_ids),
            "row_positions": sum(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)),
            "sequence_positions": sum(len(batch.prompt_ids[c[-1]]) + len(batch.response_ids[c[-1]])
                                      for c in batch.chains()),
            "load": os.getloadavg()[0], "peak_rss_mib": peak_rss_mib()})
    trainer.engine.close()
    return steps


def cost_table(runs: dict[str, list[dict[str, float]]]) -> list[str]:
    """Means over the steps after the first (its update also pays one-time start-up costs)."""
    lines = ["| run | steps | rows / step | model tokens / step | positions: rows / episode sequences | update s / step "
             "| teacher fwd s / step | (update + teacher) ms per model token | step s per model token x 1000 "
             "| peak RSS of the run (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    per_token = {}
    for name, steps in runs.items():
        kept = steps[1:] or steps
        mean = {k: sum(s[k] for s in kept) / len(kept) for k in kept[0]}
        per_token[name] = 1000 * (mean["update"] + mean["teacher"]) / mean["model_tokens"]
        lines.append(f"| {name} | {len(kept)} | {mean['rows']:.1f} | {mean['model_tokens']:.0f} | "
                     f"{mean['row_positions']:.0f} / {mean['sequence_positions']:.0f} | {mean['update']:.2f} | "
                     f"{mean['teacher']:.2f} | {per_token[name]:.2f} | {1000 * mean['seconds'] / mean['model_tokens']:.2f} | "
                     f"{max(s['peak_rss_mib'] for s in steps):.0f} |")
    base = per_token.get("1 turn")
    if base:
        lines += ["", "Update + teacher forward per model token, relative to 1 turn: " + ", ".join(
            f"{name} {value / base:.2f}x" for name, value in per_token.items() if name != "1 turn") + "."]
    lines += ["", "Per step (all steps, in order): " + "; ".join(
        f"{name}: " + ", ".join(f"{s['update'] + s['teacher']:.1f} s/{s['model_tokens']} tok (load {s['load']:.1f})"
                                for s in steps) for name, steps in runs.items())]
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
    parser.add_argument("--cost-steps", type=int, default=4, help="training steps per cost run")
    parser.add_argument("--cost-runs", nargs="+", default=list(COST_RUNS), help="which cost runs (names as listed)")
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
    if "cost" in args.parts:
        # Each run in a fresh process: three trainers with their vLLM engines in one would hold ~18 GiB.
        import multiprocessing

        runs = {}
        for name in args.cost_runs:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                runs[name] = pool.apply(cost_run, (name, args))
        lines += ["", "## Cost per model token: 1 turn against 3 turns", "",
                  "Overrides (on the CPU preset): `env.feedback=true eval.every=0` and, per run, "
                  + "; ".join(f"{name}: `{' '.join(o)}`" for name, o in COST_RUNS.items()), "", *cost_table(runs)]
    if "test_time" in args.parts:
        table, report = run_test_time_table(args)
        lines += ["", "## Test-time: SDPO vs best-of-k vs multi-turn", "",
                  f"Overrides: `{' '.join(test_time_overrides(args))}`; {report['num_questions']} questions, "
                  f"{report['seconds']:.0f} s", "", *table]
    lines += ["", f"Peak RSS of this process (the cost runs run in processes of their own) {peak_rss_mib():.0f} MiB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
