"""Pre-flight probe: before training, measure what SDPO's self-teacher can offer on a task (docs/probe.md).

    python scripts/probe.py experiment=convention_cpu                    # the learning-from-feedback task
    python scripts/probe.py                                              # the default CPU task (arithmetic)
    python scripts/probe.py experiment=convention_cpu trainer.questions_per_step=32 rollout=hf

Takes one step's worth of training questions (trainer.questions_per_step x rollout.num_generations rollouts at the
rollout temperature, drawn like the trainer's first step), builds the teacher's reprompts as the trainer would and
prints a verdict table: success without and with the reprompt (sampled and greedy), the fraction of groups with a
success, of rollouts with a teacher signal and with feedback, the log-prob uplift of a correct response, the
student-teacher gap on the student's own failed tokens, and the echo risk.

The terminal shows a short header, the verdict table and where the report and the log are; what libraries print
(vLLM, transformers) goes to the log (logging.verbose=true: all of it on the terminal). Everything lands in the run
directory, trainer.output_dir, by default runs/probe-<env>-<time>/: probe.json, probe.log and Hydra's .hydra/.
The probe reads model.*, env.*, rollout.*, algorithm.reprompt.*, logging.verbose and trainer.seed /
questions_per_step / mini_batch_questions / output_dir / resume (a checkpoint's weights are probed); an override of
any other key is an error (`--cfg job` prints the composed config without running).
"""

from __future__ import annotations

from dataclasses import replace
import json

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

from sdpo.cli import PROBE_USES, TIMESTAMP, run
from sdpo.config import SDPOConfig


def main(config: SDPOConfig) -> None:
    from sdpo import console
    from sdpo.cli import library_output_to_log
    from tqdm.auto import tqdm

    from sdpo.probe import PROBE_STAGES, format_verdict, probe
    from sdpo.rollout import SamplingSettings
    from sdpo.trainer import SDPOTrainer

    # The probe logs no metrics: no wandb run, no tensorboard.
    config = replace(config, logging=replace(config.logging, wandb="disabled", tensorboard=False))
    tcfg, rcfg = config.trainer, config.rollout
    engine = rcfg.engine + (f" ({rcfg.vllm.dtype})" if rcfg.engine == "vllm" else "")
    log_file = console.log_path()
    print("\n".join([  # not "probe: ...": the verdict table's first line, which reports quote from
        f"pre-flight probe of {config.model.name_or_path}" + (f" at {tcfg.resume}" if tcfg.resume != "none" else "")
        + f" on {config.env.name}/{config.env.train_split}: {tcfg.questions_per_step} questions x "
        f"{rcfg.num_generations} rollouts (temperature {rcfg.temperature}) · rollouts {engine}",
        f"run directory {tcfg.output_dir}" + (f" (log: {log_file})" if log_file else ""),
    ]), flush=True)
    with library_output_to_log(config) as (log_file, terminal):
        bar = tqdm(total=1 + len(PROBE_STAGES), desc="loading the model and the engine", file=terminal,
                   disable=not config.logging.progress_bar, bar_format="{desc}: {n}/{total} stages [{elapsed}]")
        trainer = SDPOTrainer(config)  # the env, the tokenizer, the policy and the rollout engine of a real run

        def progress(stage: str) -> None:
            bar.update(1)
            bar.set_description_str(stage)

        try:
            problems = trainer.next_questions()
            sampling = SamplingSettings.from_config(rcfg, seed=tcfg.seed)
            result = probe(trainer.env, problems, trainer.collector.prompt_ids, trainer.engine,
                           trainer.learner.unwrapped, trainer.tokenizer, sampling, config.algorithm.reprompt,
                           seed_key=f"{tcfg.seed}:probe", chat_template_kwargs=config.model.chat_template_kwargs,
                           progress=progress)
            bar.update(1)
        finally:
            bar.close()
            trainer.engine.close()
    print(format_verdict(result))
    out = trainer.run_dir / "probe.json"
    out.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    print(f"probe.json: {out}" + (f" · log {log_file}" if log_file else ""), flush=True)


if __name__ == "__main__":
    run(main, uses=PROBE_USES, run_dir=f"runs/probe-${{env.name}}-{TIMESTAMP}")
