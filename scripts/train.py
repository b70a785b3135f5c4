"""Train with SDPO (or GRPO, or a hybrid) from the Hydra config in configs/.

    python scripts/train.py                                   # SDPO on SmolLM2-135M-Instruct, arithmetic, CPU
    python scripts/train.py algorithm=grpo                    # the GRPO baseline on the same setup
    python scripts/train.py experiment=sciknoweval_chemistry  # a paper preset
    python scripts/train.py trainer.optim.lr=3e-6 rollout.num_generations=8   # any field

Every default lives in sdpo/config.py; `--cfg job` prints the composed config without running.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sdpo.hydra_config import CONFIG_DIR, register_configs, run_checked, to_config  # noqa: E402

register_configs()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from sdpo.trainer import SDPOTrainer

    config = to_config(cfg)
    if config.trainer.output_dir is None:
        config.trainer.output_dir = HydraConfig.get().runtime.output_dir
    trainer = SDPOTrainer(config)
    algo = config.algorithm
    print(
        f"{algo.name}: grpo_weight={algo.grpo_weight} ({algo.mix}-level mix), teacher={algo.teacher.kind}, "
        f"model={config.model.name_or_path}, env={config.env.name}, rollout engine={config.rollout.engine}, "
        f"{config.trainer.total_steps} steps; run directory: {trainer.run_dir}",
        flush=True,
    )
    metrics = trainer.train()
    print(f"done: {trainer.step} steps, run directory {trainer.run_dir}; last step: "
          + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(("reward", "eval"))))


if __name__ == "__main__":
    run_checked(main)
