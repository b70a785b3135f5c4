"""The update's cost per model token (the tokens the model wrote, the only ones with a loss) of 1-turn and 3-turn
episodes on the default run's task with feedback: the 3-turn step with one row per turn (trainer.pack_episodes=false)
and with each episode one sequence (the default). Each run in a process of its own.

    python benchmarks/multi_turn_cost_cpu.py --cost-steps 4 --results benchmarks/results/multi_turn_cost_cpu.md

The learning comparison of multi-turn GRPO and SDPO is a sweep: `scripts/sweep.py sweep=multi_turn_cpu`.
"""

from __future__ import annotations

import argparse
import multiprocessing
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost-steps", type=int, default=4, help="training steps per cost run")
    parser.add_argument("--cost-runs", nargs="+", default=list(COST_RUNS), help="which cost runs (names as listed)")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides applied to every run")
    parser.add_argument("--out", default="benchmarks/runs/multi_turn_cost_cpu")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    runs = {}
    for name in args.cost_runs:  # three trainers with their vLLM engines in one process would hold ~18 GiB
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            runs[name] = pool.apply(cost_run, (name, args))
    lines = ["# Multi-turn episodes on the CPU: the update's cost per model token", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {describe()}",
             f"- command: `python {' '.join(sys.argv)}`",
             "- overrides (on the CPU preset): `env.feedback=true eval.every=0` and, per run, "
             + "; ".join(f"{name}: `{' '.join(o)}`" for name, o in COST_RUNS.items()), "", *cost_table(runs)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
