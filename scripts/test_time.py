"""Test-time self-distillation on single hard questions: SDPO vs best-of-k vs multi-turn, reported as discovery@k.

    python scripts/test_time.py experiment=test_time model.name_or_path=/models/Qwen3-8B env=livecodebench rollout=vllm
    python scripts/test_time.py env=arithmetic env.feedback=true test_time.budget=64 test_time.num_questions=8

For each question of test_time.split, each method in test_time.methods starts from the checkpoint: "sdpo" samples
rollout.num_generations attempts, stops at the first success, and otherwise takes an SDPO step on them (the teacher
sees the environment's feedback) and samples again; "best_of_k" samples the same attempts without updates;
"multi_turn" (the paper's multi-turn baseline) feeds each failed attempt's feedback back into its conversation and
samples the next turn, no updates, each turn one attempt (test_time.methods=[sdpo,best_of_k,multi_turn]). Prints
discovery@k (the fraction of questions solved within k attempts) and writes a JSON report with every question's
first successful attempt (test_time.output_file). sdpo/test_time.py has the details.
"""

from __future__ import annotations

import json
from pathlib import Path

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

from sdpo.cli import run
from sdpo.config import SDPOConfig


def main(config: SDPOConfig) -> None:
    from sdpo.evaluation import format_table
    from sdpo.test_time import run_test_time

    report = run_test_time(config)
    out = Path(config.test_time.output_file or Path(config.trainer.output_dir) / "test_time.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for method, curve in report["discovery"].items():
        print(format_table({f"discovery@{k}": v for k, v in curve.items()}, title=(
            f"{method}: {report['num_questions']} questions of {report['env']}/{report['split']}, "
            f"{report['rollouts_per_step']} attempts per step, budget {report['budget']}")))
    print(f"report: {out}")


if __name__ == "__main__":
    run(main)
