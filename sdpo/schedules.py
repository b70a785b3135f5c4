"""Learning-rate schedules (`trainer.optim.schedule`): a registry of functions (optimizer, trainer config) -> a
torch scheduler, stepped once per applied optimizer step, each after `trainer.optim.warmup_steps` of linear warmup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from sdpo.registry import Registry

Schedule = Callable[[torch.optim.Optimizer, Any], torch.optim.lr_scheduler.LambdaLR]
SCHEDULES: Registry[Schedule] = Registry("learning-rate schedule")


def optimizer_steps(trainer: Any) -> int:
    """The optimizer steps of the whole run: mini-batches per generation batch, times epochs, times steps."""
    return trainer.total_steps * (trainer.questions_per_step // trainer.mini_batch_questions) * trainer.epochs_per_step


@SCHEDULES.register("constant")
def constant(optimizer: torch.optim.Optimizer, trainer: Any) -> torch.optim.lr_scheduler.LambdaLR:
    return get_constant_schedule_with_warmup(optimizer, trainer.optim.warmup_steps)


@SCHEDULES.register("cosine")
def cosine(optimizer: torch.optim.Optimizer, trainer: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay to `trainer.optim.min_lr_ratio` of the rate over the run's optimizer steps."""
    return get_cosine_schedule_with_warmup(optimizer, trainer.optim.warmup_steps, optimizer_steps(trainer),
                                           min_lr_rate=trainer.optim.min_lr_ratio)
