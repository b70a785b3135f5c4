"""Test-time self-distillation on single hard questions: SDPO vs best-of-k vs multi-turn, reported as discovery@k.

    python scripts/test_time.py experiment=test_time model.name_or_path=/models/Qwen3-8B env=livecodebench rollout=vllm
    python scripts/test_time.py env=arithmetic env.feedback=true test_time.budget=64 test_time.num_questions=8

For each question of test_time.split, each method in test_time.methods starts from the checkpoint: "sdpo" samples
rollout.num_generations attempts, stops at the first success, and otherwise takes an SDPO step on them (the teacher
sees the environment's feedback) and samples again; "best_of_k" samples the same attempts without updates;
"multi_turn" (the paper's multi-turn baseline) feeds each failed attempt's feedback back into its conversation and
samples the next turn, no updates, each turn one attempt (test_time.methods=[sdpo,best_of_k,multi_turn]).
sdpo/test_time.py has the details.

The terminal shows a short header, a progress bar over the (question, method) runs with the questions each method
has solved so far, a discovery@k table per method (the fraction of questions solved within k attempts) and where
the report and the log are; what libraries print (vLLM's loading bars, NUMA warnings, transformers) goes to the log
(logging.verbose=true: all of it on the terminal). Everything lands in the run directory, trainer.output_dir, by
default runs/test_time-<env>-<time>/: test_time.json (every question's first successful attempt;
test_time.output_file puts it elsewhere), test_time.log and Hydra's .hydra/.

Each question runs in a fresh trainer that saves, resumes, evaluates and logs to wandb nothing: an override of
eval.*, trainer.total_steps (test_time.budget counts the attempts), trainer.save_every / keep_last / resume /
keep_best / collapse_drop or logging.wandb / project / run_name / tensorboard / samples_every / num_samples is an
error (`--cfg job` prints the composed config without running).
"""

from __future__ import annotations

import json
from pathlib import Path

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

from sdpo.cli import TEST_TIME_IGNORES, TIMESTAMP, run
from sdpo.config import SDPOConfig


def header(config: SDPOConfig, out: Path, log_file: Path | None) -> str:
    """What runs, on what, with which budget; where the report and the log go."""
    ttc, rcfg = config.test_time, config.rollout
    questions = f"{ttc.num_questions} questions" if ttc.num_questions is not None else "every question"
    engine = rcfg.engine + (f" ({rcfg.vllm.dtype})" if rcfg.engine == "vllm" else "")
    teacher = f"{config.algorithm.teacher.kind} teacher" if config.algorithm.uses_teacher else "no teacher"
    return "\n".join([
        f"test-time: {', '.join(ttc.methods)} on {questions} of {config.env.name}/{ttc.split}, budget {ttc.budget} "
        f"attempts, {rcfg.num_generations} per step",
        f"model {config.model.name_or_path} · {config.algorithm.name} ({teacher}) · rollouts {engine}",
        f"report {out}" + (f" (log: {log_file})" if log_file else ""),
    ])


def main(config: SDPOConfig) -> None:
    from tqdm import tqdm

    from sdpo import console
    from sdpo.cli import library_output_to_log
    from sdpo.evaluation import format_table
    from sdpo.test_time import Discovery, run_test_time

    out = Path(config.test_time.output_file or Path(config.trainer.output_dir) / "test_time.json").absolute()
    print(header(config, out, console.log_path()), flush=True)
    solved = {method: [0, 0] for method in config.test_time.methods}  # questions solved, questions run
    bar: tqdm | None = None
    with library_output_to_log(config) as (log_file, terminal):

        def progress(done: int, total: int, found: Discovery | None) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc="test-time", unit="run", file=terminal, dynamic_ncols=True,
                           disable=not config.logging.progress_bar)
            if found is not None:
                solved[found.method][0] += found.solved_at is not None
                solved[found.method][1] += 1
                bar.set_postfix_str(" · ".join(f"{m} solved {n}/{k}" for m, (n, k) in solved.items()), refresh=False)
                bar.update(done - bar.n)

        try:
            report = run_test_time(config, progress=progress)
        finally:
            if bar is not None:
                bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for method, curve in report["discovery"].items():
        print(format_table({f"discovery@{k}": v for k, v in curve.items()}, title=(
            f"{method}: {report['num_questions']} questions of {report['env']}/{report['split']}, "
            f"{report['rollouts_per_step']} attempts per step, budget {report['budget']}")))
    print(f"report {out}" + (f" · log {log_file}" if log_file else ""), flush=True)


if __name__ == "__main__":
    run(main, ignores=TEST_TIME_IGNORES, run_dir=f"runs/test_time-${{env.name}}-{TIMESTAMP}")
