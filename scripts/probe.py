"""Pre-flight probe: before training, measure what SDPO's self-teacher can offer on a task (docs/probe.md).

    python scripts/probe.py experiment=convention_cpu                    # the learning-from-feedback task
    python scripts/probe.py                                              # the default CPU task (arithmetic)
    python scripts/probe.py experiment=convention_cpu trainer.questions_per_step=32 rollout=hf

Takes one step's worth of training questions (trainer.questions_per_step x rollout.num_generations rollouts at the
rollout temperature, drawn like the trainer's first step), builds the teacher's reprompts as the trainer would and
prints a verdict table: success without and with the reprompt (sampled and greedy), the fraction of groups with a
success, of rollouts with a teacher signal and with feedback, the log-prob uplift of a correct response, the
student-teacher gap on the student's own failed tokens, and the echo risk. Writes probe.json to the run directory.
"""

from __future__ import annotations

import json

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

from sdpo.cli import run
from sdpo.config import SDPOConfig


def main(config: SDPOConfig) -> None:
    from sdpo import console
    from sdpo.probe import format_verdict, probe
    from sdpo.rollout import SamplingSettings
    from sdpo.trainer import SDPOTrainer

    log_file = console.log_path()
    with console.native_output_to(log_file, enabled=not config.logging.verbose and log_file is not None):
        trainer = SDPOTrainer(config)  # the env, the tokenizer, the policy and the rollout engine of a real run
    problems = trainer.next_questions()
    sampling = SamplingSettings.from_config(config.rollout, seed=config.trainer.seed)
    result = probe(trainer.env, problems, lambda p: trainer._prompt_ids[id(p)], trainer.engine, trainer.unwrapped,
                   trainer.tokenizer, sampling, config.algorithm.reprompt, seed_key=f"{config.trainer.seed}:probe",
                   chat_template_kwargs=config.model.chat_template_kwargs)
    print(format_verdict(result))
    out = trainer.run_dir / "probe.json"
    out.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    print(f"probe.json: {out}")
    trainer.engine.close()


if __name__ == "__main__":
    run(main)
