"""Evaluate a checkpoint on any environment: avg@k, pass@k (unbiased estimator) and maj@k on its eval split.

    python scripts/eval.py env=arithmetic trainer.resume=runs/my-run/checkpoints/step-000100 eval.samples_per_question=8
    python scripts/eval.py env=arithmetic trainer.resume=runs/my-run      # the run's newest complete checkpoint
    python scripts/eval.py env=math500 model.name_or_path=<ckpt> rollout.engine=vllm rollout.max_new_tokens=4096
    python scripts/eval.py env=arithmetic model.name_or_path=smollm2-135m-instruct      # the base model

What is evaluated: model.name_or_path, or the checkpoint trainer.resume names (a checkpoint directory, or a run
directory: its newest complete checkpoint), which then takes model.name_or_path's place; the header says which.
A LoRA checkpoint (an adapter directory) is loaded onto its base model and merged.

Sampling defaults to the paper's validation settings (eval.temperature=0.6, eval.top_p=0.95); pass@k is reported
for eval.pass_k (default 1, 2, 4, ... up to eval.samples_per_question), avg@n and maj@n over all n samples (maj@n
for environments whose scores carry an extracted answer).

The terminal shows a short header, a progress bar over the questions (sampled, then scored), the table and where
the report and the log are; what libraries print (vLLM, transformers) goes to the log (logging.verbose=true: all
of it on the terminal). Everything lands in the run directory, trainer.output_dir, by default
runs/eval-<env>-<time>/: report.json (the JSON report with the per-question rewards; eval.output_file puts it
elsewhere), eval.log and Hydra's .hydra/. Never in the model's own directory.

The script reads model.*, env.*, rollout.*, eval.* (but eval.every / eval.at_start, which time the trainer's
evaluations), logging.verbose / progress_bar, trainer.seed / output_dir / resume and
algorithm.reprompt.success_reward_threshold; an override of any other key is an error (`--cfg job` prints the
composed config without running).
"""

from __future__ import annotations

import json
from pathlib import Path
import sys

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

from sdpo.cli import EVAL_IGNORES, EVAL_USES, TIMESTAMP, run
from sdpo.config import SDPOConfig


def header(config: SDPOConfig, name_or_path: str, out: Path, log_file: Path | None) -> str:
    """What is evaluated, on what and how; where the report and the log go."""
    ecfg, rcfg = config.eval, config.rollout
    what = (f"checkpoint {name_or_path} (trainer.resume)" if config.trainer.resume not in ("", "none")
            else f"model {name_or_path}")
    engine = rcfg.engine + (f" ({rcfg.vllm.dtype})" if rcfg.engine == "vllm" else "")
    questions = f"{ecfg.num_questions} questions" if ecfg.num_questions is not None else "every question"
    return "\n".join([
        f"eval: {what}",
        f"env {config.env.name}/{config.env.eval_split}: {questions} x {ecfg.samples_per_question} samples "
        f"(temperature {ecfg.temperature}, top-p {ecfg.top_p}) · rollouts {engine}",
        f"report {out}" + (f" (log: {log_file})" if log_file else ""),
    ])


def main(config: SDPOConfig) -> None:
    from tqdm import tqdm

    from sdpo import console
    from sdpo.cli import library_output_to_log
    from sdpo.evaluation import evaluate_checkpoint, evaluated_model, format_table

    try:
        model = evaluated_model(config)  # trainer.resume's checkpoint, when it names one
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    out = Path(config.eval.output_file or Path(config.trainer.output_dir) / "report.json").absolute()
    print(header(config, model.name_or_path, out, console.log_path()), flush=True)

    bars: dict[str, tqdm] = {}
    with library_output_to_log(config) as (log_file, terminal):

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                for bar in bars.values():
                    bar.close()
                bars[stage] = tqdm(total=total, desc=stage, unit="question", file=terminal, dynamic_ncols=True,
                                   disable=not config.logging.progress_bar)
            bars[stage].update(done - bars[stage].n)

        try:
            report = evaluate_checkpoint(config, progress=progress)
        finally:
            for bar in bars.values():
                bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    s = report["sampling"]
    print(format_table(report["metrics"], title=(
        f"{report['checkpoint']} on {report['env']}/{report['split']}: {report['num_questions']} questions x "
        f"{report['samples_per_question']} samples (temperature {s['temperature']}, top-p {s['top_p']}) "
        f"in {report['seconds']:.1f} s")))
    print(f"report {out}" + (f" · log {log_file}" if log_file else ""), flush=True)


if __name__ == "__main__":
    run(main, uses=EVAL_USES, ignores=EVAL_IGNORES, run_dir=f"runs/eval-${{env.name}}-{TIMESTAMP}")
