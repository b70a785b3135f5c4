"""Train with SDPO (or GRPO, or a hybrid) from the Hydra config in configs/.

    python scripts/train.py                                   # SDPO on SmolLM2-135M-Instruct, arithmetic, CPU
    python scripts/train.py algorithm=grpo                    # the GRPO baseline on the same setup
    python scripts/train.py experiment=sciknoweval            # a paper preset (env.domains=[physics] ...)
    python scripts/train.py trainer.optim.lr=3e-6 rollout.num_generations=8   # any field

Every default lives in sdpo/config/; `--cfg job` prints the composed config without running.
"""

from __future__ import annotations

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

from sdpo.cli import run
from sdpo.config import SDPOConfig


def main(config: SDPOConfig) -> None:
    from sdpo import console
    from sdpo.resume import finished_message

    tcfg = config.trainer
    finished = finished_message(tcfg.output_dir, tcfg.resume, tcfg.total_steps)
    if finished is not None:  # nothing to train: no weights to load, no engine to start
        print(finished, flush=True)
        return

    from sdpo.trainer import SDPOTrainer

    log_file = console.log_path()
    with console.native_output_to(log_file, enabled=not config.logging.verbose and log_file is not None):
        trainer = SDPOTrainer(config)  # vLLM start-up, weight loading: what they print goes to the log
    print(console.header(trainer.config, trainer.run_dir, log_file), flush=True)
    try:
        trainer.train()  # a signal: stops after the step and its checkpoint (sdpo/interrupt.py), then one line
    finally:
        trainer.engine.close()  # a server this run started stops with it
    print(console.summary(trainer.run_dir, log_file), flush=True)


if __name__ == "__main__":
    run(main)
