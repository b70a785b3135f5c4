"""Policy-gradient pieces: the PPO/DAPO clipped surrogate, KL-to-reference estimators, truncated IS (docs/algorithm.md §3, §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from sdpo.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")


def clipped_policy_loss(
    logp_BR: Tensor, old_logp_BR: Tensor, adv_BR: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss with DAPO's asymmetric "clip-higher" range [1 - eps_low, 1 + eps_high] (docs/algorithm.md §5).

    Returns (loss_BR, clipped_BR): loss = -min(ratio * A, clip(ratio) * A); `clipped_BR` is True where the clipped
    branch is strictly smaller, i.e. where the token gets no gradient (the clip-fraction metric).
    """
    ratio_BR = torch.exp(logp_BR - old_logp_BR.detach())
    adv_BR = adv_BR.detach()
    unclipped_BR = ratio_BR * adv_BR
    clipped_obj_BR = ratio_BR.clamp(1.0 - eps_low, 1.0 + eps_high) * adv_BR
    return -torch.minimum(unclipped_BR, clipped_obj_BR), clipped_obj_BR < unclipped_BR


# Schulman's estimators of KL(pi || ref) from a sample of pi (http://joschu.net/blog/kl-approx.html).
@KL_ESTIMATORS.register("k1")
def kl_k1(logp_BR: Tensor, ref_logp_BR: Tensor) -> Tensor:
    """log pi - log ref: unbiased, high variance, can be negative."""
    return logp_BR - ref_logp_BR


@KL_ESTIMATORS.register("k2")
def kl_k2(logp_BR: Tensor, ref_logp_BR: Tensor) -> Tensor:
    """0.5 (log pi - log ref)^2: biased, low variance, non-negative."""
    return 0.5 * (logp_BR - ref_logp_BR).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logp_BR: Tensor, ref_logp_BR: Tensor) -> Tensor:
    """ref/pi - log(ref/pi) - 1: unbiased and non-negative."""
    log_ratio_BR = ref_logp_BR - logp_BR
    return torch.exp(log_ratio_BR) - log_ratio_BR - 1.0


def kl_penalty(logp_BR: Tensor, ref_logp_BR: Tensor, estimator: str) -> Tensor:
    """Per-token KL(pi || ref) estimate by name ("k1", "k2", "k3"); the reference is treated as a constant."""
    return KL_ESTIMATORS.get(estimator)(logp_BR, ref_logp_BR.detach())


def truncated_is_weights(trainer_logp_BR: Tensor, sampler_logp_BR: Tensor, threshold: float) -> Tensor:
    """Token-level truncated importance weights pi_trainer / pi_sampler, capped at `threshold` (docs/algorithm.md §3, §9).

    Corrects the mismatch between the inference engine's sampling distribution and the trainer's numerics; the
    cap bounds the variance. A weight, not a gradient path, hence detached.
    """
    return torch.exp(trainer_logp_BR - sampler_logp_BR).detach().clamp(max=threshold)
