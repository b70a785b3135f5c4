"""The objective (sdpo/losses/objective.py) against a brute-force float64 reference, token by token, without a model:
GRPO, pure SDPO (sampled-token and logit-level), the advantage-level and the loss-level hybrid, the PPO and the SDPO
advantage clip, truncated IS, off-policy ratios, the KL penalty; the loss and its gradients."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo.config import AlgorithmConfig, DistillConfig, PolicyLossConfig
from sdpo.losses.objective import StepCounts, TokenInputs, objective

B, R = 5, 7


def random_inputs(seed: int, *, teacher: bool, off_policy: bool, sampler: bool, reference: bool, logit_level: bool):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    logp = (-randn(B, R).abs() - 0.1).requires_grad_(True)
    mask = torch.rand(B, R, generator=gen) < 0.8
    mask[0] = True
    x = dict(logp_BR=logp, mask_BR=mask, advantages_B=randn(B), entropy_BR=randn(B, R).abs())
    if off_policy:  # ratios far enough from 1 that the PPO clip and the IS cap act
        x["old_logp_BR"] = logp.detach() + randn(B, R, scale=0.5)
    if sampler:
        x["sampler_logp_BR"] = logp.detach() + randn(B, R, scale=0.8)
    if reference:
        x["ref_logp_BR"] = logp.detach() + randn(B, R, scale=0.3)
    if teacher:
        distill_mask = mask & (torch.rand(B, 1, generator=gen) < 0.7)
        distill_mask[1] = mask[1]
        x["distill_mask_BR"] = distill_mask
        # Gaps up to ~9 nats: the SDPO advantage clip at 5 acts on some tokens.
        x["teacher_logp_BR"] = logp.detach() + randn(B, R, scale=4.0)
        if logit_level:
            x["distill_BR"] = randn(B, R).abs().requires_grad_(True)
    return x


def brute_force(x: dict, algo: AlgorithmConfig) -> torch.Tensor:
    """The loss summed token by token in float64, as docs/algorithm.md §3 and §5 write it."""
    pol, dis, lam = algo.policy, algo.distill, algo.grpo_weight
    teacher = "distill_mask_BR" in x
    policy_sum, distill_sum = 0.0, 0.0
    tokens = int(x["mask_BR"].sum())
    distill_tokens = int(x["distill_mask_BR"].sum()) if teacher else 0
    for b in range(B):
        for t in range(R):
            if not x["mask_BR"][b, t]:
                continue
            s = x["logp_BR"][b, t]
            s0 = float(s.detach())
            old = float(x["old_logp_BR"][b, t]) if "old_logp_BR" in x else s0
            tis = min(math.exp(old - float(x["sampler_logp_BR"][b, t])), algo.tis_threshold) if "sampler_logp_BR" in x else 1.0
            distilled = teacher and bool(x["distill_mask_BR"][b, t])
            gap = float(x["teacher_logp_BR"][b, t]) - s0 if distilled else 0.0  # A_SDPO = q - s
            if dis.advantage_clip is not None:
                gap = max(-dis.advantage_clip, min(dis.advantage_clip, gap))
            if algo.uses_policy_loss:
                adv = float(x["advantages_B"][b])
                if algo.mix == "advantage" and teacher:
                    adv = lam * adv + (1 - lam) * gap
                ratio = torch.exp(s - old)
                clipped = torch.clamp(ratio, 1 - pol.clip_eps_low, 1 + pol.clip_eps_high)
                term = -torch.minimum(ratio * adv, clipped * adv) * tis
                if "ref_logp_BR" in x:  # k3
                    d = float(x["ref_logp_BR"][b, t]) - s
                    term = term + pol.kl_coef * (torch.exp(d) - d - 1)
                policy_sum = policy_sum + term
            if algo.mix == "loss" and distilled:
                is_weight = min(math.exp(max(-20.0, min(20.0, s0 - old))), dis.is_clip)
                per_token = x["distill_BR"][b, t] if "distill_BR" in x else -gap * s
                distill_sum = distill_sum + per_token * is_weight * tis
    loss = 0.0 * x["logp_BR"].sum()
    if algo.uses_policy_loss:
        loss = loss + (1.0 if algo.mix == "advantage" else lam) * policy_sum / tokens
    if teacher and algo.mix == "loss":
        loss = loss + (1.0 - lam) * distill_sum / max(distill_tokens, 1)
    return loss


def counts_of(x: dict) -> StepCounts:
    distill = x.get("distill_mask_BR", torch.zeros(B, R, dtype=torch.bool))
    return StepCounts(tokens=float(x["mask_BR"].sum()), seqs=float(B), distill_tokens=float(distill.sum()),
                      distill_seqs=float(distill.any(-1).sum()))


SAMPLED = DistillConfig(mode="sampled_token", alpha=1.0)
CASES = {
    "grpo": (AlgorithmConfig(grpo_weight=1.0), dict(teacher=False)),
    "grpo_kl_off_policy": (AlgorithmConfig(grpo_weight=1.0, policy=PolicyLossConfig(kl_coef=0.1)),
                           dict(teacher=False, reference=True, off_policy=True, sampler=True)),
    "sdpo_sampled_token": (AlgorithmConfig(grpo_weight=0.0, distill=SAMPLED), dict(teacher=True)),
    "sdpo_sampled_token_clip": (AlgorithmConfig(grpo_weight=0.0, distill=DistillConfig(mode="sampled_token", alpha=1.0,
                                                                                        advantage_clip=5.0)),
                                dict(teacher=True, off_policy=True)),
    "sdpo_topk": (AlgorithmConfig(grpo_weight=0.0), dict(teacher=True, logit_level=True, off_policy=True, sampler=True)),
    "hybrid_advantage": (AlgorithmConfig(grpo_weight=0.9, mix="advantage", distill=SAMPLED),
                         dict(teacher=True, off_policy=True, sampler=True)),
    "hybrid_advantage_clip_kl": (AlgorithmConfig(grpo_weight=0.9, mix="advantage", policy=PolicyLossConfig(kl_coef=0.05),
                                                 distill=DistillConfig(mode="sampled_token", alpha=1.0, advantage_clip=5.0)),
                                 dict(teacher=True, off_policy=True, reference=True)),
    "hybrid_loss_topk": (AlgorithmConfig(grpo_weight=0.5, mix="loss"),
                         dict(teacher=True, logit_level=True, off_policy=True, sampler=True)),
    "hybrid_loss_sampled": (AlgorithmConfig(grpo_weight=0.3, mix="loss", distill=SAMPLED), dict(teacher=True, off_policy=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_objective_matches_brute_force_loss_and_gradients(case, seed):
    algo, flags = CASES[case]
    flags = {"off_policy": False, "sampler": False, "reference": False, "logit_level": False, **flags}
    x = random_inputs(seed, **flags)
    result = objective(TokenInputs(**x), counts_of(x), algo, max_response_len=R)
    expected = brute_force(x, algo)
    torch.testing.assert_close(result.loss, expected, rtol=1e-10, atol=1e-12)
    leaves = [x["logp_BR"]] + ([x["distill_BR"]] if "distill_BR" in x else [])
    got = torch.autograd.grad(result.loss, leaves, retain_graph=True)
    want = torch.autograd.grad(expected, leaves)
    assert any(g.abs().sum() > 0 for g in want), "the case must carry a gradient"
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert ("distill/loss" in result.sums) == (flags["teacher"] and algo.mix == "loss")
    assert ("policy/loss" in result.sums) == algo.uses_policy_loss


def test_clips_act():
    """The cases above exercise the clips: without them the loss differs (so the comparison could fail)."""
    x = random_inputs(0, teacher=True, off_policy=True, sampler=False, reference=False, logit_level=False)
    clipped = AlgorithmConfig(grpo_weight=0.9, mix="advantage",
                              distill=DistillConfig(mode="sampled_token", alpha=1.0, advantage_clip=5.0))
    unclipped = AlgorithmConfig(grpo_weight=0.9, mix="advantage", distill=SAMPLED)
    a = objective(TokenInputs(**x), counts_of(x), clipped, R)
    b = objective(TokenInputs(**x), counts_of(x), unclipped, R)
    assert not torch.allclose(a.loss, b.loss)
    assert a.sums["policy/clip_fraction"][0] > 0  # the PPO clip is active on some tokens
    sd_clipped = AlgorithmConfig(grpo_weight=0.0, distill=DistillConfig(mode="sampled_token", alpha=1.0, advantage_clip=5.0))
    sd = AlgorithmConfig(grpo_weight=0.0, distill=SAMPLED)
    assert not torch.allclose(objective(TokenInputs(**x), counts_of(x), sd_clipped, R).loss,
                              objective(TokenInputs(**x), counts_of(x), sd, R).loss)


def test_a_micro_batch_without_teacher_scores_has_no_distillation_loss_but_a_graph():
    x = random_inputs(3, teacher=True, off_policy=False, sampler=False, reference=False, logit_level=False)
    del x["teacher_logp_BR"]  # nothing was scored for this micro-batch (no rollout with a signal on any rank)
    result = objective(TokenInputs(**x), counts_of(x), AlgorithmConfig(grpo_weight=0.0), R)
    assert float(result.loss.detach()) == 0.0 and result.loss.requires_grad
    assert result.sums["distill/loss"] == (0.0, 0.0)
