"""sdpo: Self-Distillation Policy Optimization (arXiv 2601.20802) for LLM post-training.

    from sdpo import SDPOTrainer, load_config
    trainer = SDPOTrainer(load_config(["model=tiny", "trainer.total_steps=2"]))
    trainer.train()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sdpo.config import SDPOConfig
    from sdpo.hydra_config import load_config
    from sdpo.trainer import SDPOTrainer


def __getattr__(name: str) -> Any:
    # Lazy: `import sdpo.losses` should not pay for transformers / accelerate.
    if name == "SDPOTrainer":
        from sdpo.trainer import SDPOTrainer

        return SDPOTrainer
    if name == "load_config":
        from sdpo.hydra_config import load_config

        return load_config
    if name == "SDPOConfig":
        from sdpo.config import SDPOConfig

        return SDPOConfig
    raise AttributeError(f"module 'sdpo' has no attribute {name!r}")


__all__ = ["SDPOConfig", "SDPOTrainer", "__version__", "load_config"]
