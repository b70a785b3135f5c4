"""Advantages: GRPO's group baseline, SDPO's per-token teacher-minus-student signal, and their mix (docs/algorithm.md §3, §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from sdpo.registry import Registry

ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")

# algorithm.episode_return: (an episode's per-turn rewards, algorithm.episode_discount) -> its one return, which
# GRPO baselines over the question's episodes and gives to every turn. "final": the last turn's reward;
# "any_success": the best turn's; "discounted": sum over turns t (from 0) of discount^t * reward_t.
EPISODE_RETURNS: Registry = Registry("episode return")
EPISODE_RETURNS.register("final")(lambda rewards, discount: float(rewards[-1]))
EPISODE_RETURNS.register("any_success")(lambda rewards, discount: float(max(rewards)))
EPISODE_RETURNS.register("discounted")(lambda rewards, discount: float(sum(discount**t * r for t, r in enumerate(rewards))))


@ADVANTAGE_ESTIMATORS.register("grpo")
def group_advantages(
    rewards_B: Tensor, group_ids_B: Tensor, norm_by_std: bool = False, eps: float = 1e-6
) -> Tensor:
    """r_i minus the mean reward of its group, optionally divided by (group std + eps).

    Groups are identified by arbitrary integer ids and need not be contiguous. The std is the sample std
    (unbiased, as GRPO uses). A group of size 1 has no baseline to compare against, so its advantage is 0.
    """
    if rewards_B.ndim != 1 or rewards_B.shape != group_ids_B.shape:
        raise ValueError(f"rewards_B and group_ids_B must be 1-D of equal length, got {rewards_B.shape}, "
                         f"{group_ids_B.shape}")
    rewards_B = rewards_B.to(torch.promote_types(rewards_B.dtype, torch.float32))
    # Map arbitrary ids to 0..G-1 so that per-group sums are one index_add each (no Python loop over groups).
    unique_G, group_B = torch.unique(group_ids_B, return_inverse=True)
    zeros_G = rewards_B.new_zeros(unique_G.numel())
    count_G = zeros_G.index_add(0, group_B, torch.ones_like(rewards_B))
    mean_G = zeros_G.index_add(0, group_B, rewards_B) / count_G
    centered_B = rewards_B - mean_G[group_B]  # exactly 0 for a group of size 1
    if not norm_by_std:
        return centered_B
    # Sample variance; clamp the denominator so that a size-1 group gives 0 / (0 + eps) = 0, not NaN.
    var_G = zeros_G.index_add(0, group_B, centered_B.square()) / (count_G - 1).clamp(min=1)
    return centered_B / (var_G.sqrt()[group_B] + eps)


def sdpo_token_advantages(teacher_logp_BR: Tensor, student_logp_BR: Tensor, clip: float | None = None) -> Tensor:
    """A_SDPO_t = q_t(y_t) - s_t(y_t) at the sampled token, detached (docs/algorithm.md §3).

    `clip` bounds it to [-clip, clip]; the paper's test-time runs use 5.0, because a teacher that has seen the
    answer can give the sampled token far lower log-prob than the student and one token would dominate the step.
    """
    adv_BR = (teacher_logp_BR - student_logp_BR).detach()
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"advantage clip must be positive or None, got {clip}")
        adv_BR = adv_BR.clamp(-clip, clip)
    return adv_BR


def mix_advantages(grpo_adv_B: Tensor, sdpo_adv_BR: Tensor, grpo_weight: float) -> Tensor:
    """Advantage-level hybrid, paper Eq. 3: A = lambda * A_GRPO + (1 - lambda) * A_SDPO, lambda = `grpo_weight`.

    The sequence-level GRPO advantage is broadcast over the response positions. The result goes into the clipped
    policy-gradient objective (contrast the loss-level mix of TRL's port, which adds a separate distillation loss).
    """
    if not 0.0 <= grpo_weight <= 1.0:
        raise ValueError(f"grpo_weight must be in [0, 1], got {grpo_weight}")
    if grpo_adv_B.shape != sdpo_adv_BR.shape[:1]:
        raise ValueError(f"grpo_adv_B {tuple(grpo_adv_B.shape)} does not match sdpo_adv_BR {tuple(sdpo_adv_BR.shape)}")
    return grpo_weight * grpo_adv_B.unsqueeze(-1) + (1.0 - grpo_weight) * sdpo_adv_BR
