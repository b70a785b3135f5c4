"""Evaluate a checkpoint on any environment: avg@k, pass@k (unbiased estimator) and maj@k on its eval split.

    python scripts/eval.py env=arithmetic model.name_or_path=runs/my-run/checkpoints/step-000100 eval.samples_per_question=16
    python scripts/eval.py env=math500 model.name_or_path=<ckpt> rollout.engine=vllm rollout.max_new_tokens=4096
    python scripts/eval.py env=arithmetic model.name_or_path=smollm2-135m-instruct      # the base model

Sampling defaults to the paper's validation settings (eval.temperature=0.6, eval.top_p=0.95); pass@k is reported
for eval.pass_k (default 1, 2, 4, ... up to eval.samples_per_question), avg@n and maj@n over all n samples (maj@n
for environments whose scores carry an extracted answer). A LoRA checkpoint (an adapter directory) is loaded onto
its base model and merged. Prints a table and writes a JSON report (eval.output_file, default
<checkpoint>/eval-<env>-n<samples>.json) with the per-question rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

from sdpo.cli import run
from sdpo.config import SDPOConfig


def main(config: SDPOConfig) -> None:
    from sdpo.evaluation import evaluate_checkpoint, format_table
    from sdpo.models import resolve_checkpoint

    report = evaluate_checkpoint(config)
    out = config.eval.output_file
    if out is None:
        base = resolve_checkpoint(config.model)
        out = base / f"eval-{config.env.name}-n{config.eval.samples_per_question}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    s = report["sampling"]
    print(format_table(report["metrics"], title=(
        f"{report['checkpoint']} on {report['env']}/{report['split']}: {report['num_questions']} questions x "
        f"{report['samples_per_question']} samples (temperature {s['temperature']}, top-p {s['top_p']})")))
    print(f"report: {out}")


if __name__ == "__main__":
    run(main)
