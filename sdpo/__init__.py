"""sdpo: Self-Distillation Policy Optimization (arXiv 2601.20802) for LLM post-training.

    from sdpo import SDPOTrainer, load_config
    trainer = SDPOTrainer(load_config(["model=tiny", "trainer.total_steps=2"]))
    trainer.train()

    # or a model, data and reward of one's own (docs/own_data.md)
    trainer = SDPOTrainer(model="tiny", train_dataset=Dataset.from_list(rows), reward_funcs=[my_reward])
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# PyTorch's CPU allocator has no cache: every large tensor of a step (the [tokens, vocabulary] logits, the tied
# embedding's [vocabulary, hidden] gradients, ~36-113 MB each) is mapped fresh and faulted in 4 KB page by page.
# THP_MEM_ALLOC_ENABLE asks it to back tensors of 2 MB and more with transparent huge pages: per CPU update 25x
# fewer page faults and half the kernel time (benchmarks/results/profile_step.md). torch reads the variable once, at
# its first allocation, so it is set only while torch is not yet imported; THP_MEM_ALLOC_ENABLE=0 opts out.
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

if TYPE_CHECKING:
    from sdpo.config import SDPOConfig
    from sdpo.envs.base import Score
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
    if name == "Score":  # what a reward function may return per completion: reward, feedback, info
        from sdpo.envs.base import Score

        return Score
    raise AttributeError(f"module 'sdpo' has no attribute {name!r}")


__all__ = ["SDPOConfig", "SDPOTrainer", "Score", "__version__", "load_config"]
