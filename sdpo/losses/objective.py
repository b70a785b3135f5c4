"""The training objective of one micro-batch as one pure function: GRPO, pure SDPO and both hybrids (docs/algorithm.md §3, §5).

    loss = w_pg * aggregate(PPO-clip(A) * TIS + kl_coef * KL_ref)          (when the policy loss is used)
         + w_sd * aggregate(min(distill, token_clip) * IS * TIS, distill mask)   (mix=loss with a teacher)

- GRPO (grpo_weight = 1): A = A_GRPO, w_pg = 1, no teacher.
- pure SDPO (grpo_weight = 0, mix=loss): the distillation term only.
- mix=advantage (paper Eq. 3): A = lambda A_GRPO + (1 - lambda) A_SDPO with the sampled-token A_SDPO = q - s
  (optionally clipped), w_pg = 1, no separate distillation term.
- mix=loss (TRL's port): w_pg = lambda, w_sd = 1 - lambda; each term normalised on its own.
- mix=route (SRPO, §12): w_pg = w_sd = 1; the distilled rows (failed, with a signal) have no policy loss, and both
  terms divide by the step's token (sequence) counts, so the two sums share one normaliser. With
  distill.entropy_beta the distilled tokens are weighted by exp(-beta H_teacher), normalised to mean 1.

Inputs are per-token tensors only (`TokenInputs`), so the function is tested without any model
(tests/test_objective.py); the trainer computes them with its forwards and calls `objective` once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
import math

import torch
from torch import Tensor

from sdpo.config import AlgorithmConfig
from sdpo.losses.advantages import mix_advantages, sdpo_token_advantages
from sdpo.losses.aggregate import aggregate
from sdpo.losses.distill import DISTILL_MODES, is_ratio
from sdpo.losses.mix import MIXES
from sdpo.losses.policy import clipped_policy_loss, kl_penalty, truncated_is_weights


@dataclass
class TokenInputs:
    """Per-token inputs of one micro-batch's loss, response-aligned and right-padded ([B, R]; advantages [B])."""

    logp_BR: Tensor  # log pi_theta(y_t) at the sampling temperature, with gradient (float32 or float64)
    mask_BR: Tensor  # bool; real response tokens
    advantages_B: Tensor  # GRPO group advantages
    entropy_BR: Tensor  # the student's entropy (a metric only)
    old_logp_BR: Tensor | None = None  # the policy before this generation batch's updates; None: on-policy
    sampler_logp_BR: Tensor | None = None  # the inference engine's log-probs (truncated IS), or None
    ref_logp_BR: Tensor | None = None  # the reference (initial) weights' log-probs: the KL penalty, or None
    # With a teacher (grpo_weight < 1): which tokens are distilled (the rollout's reprompt has a signal).
    distill_mask_BR: Tensor | None = None  # None: the algorithm has no teacher
    teacher_logp_BR: Tensor | None = None  # log q(y_t) under the reprompt; None: nothing was scored for this batch
    distill_BR: Tensor | None = None  # logit-level (full / top-k) per-token distillation loss, with gradient
    teacher_entropy_BR: Tensor | None = None  # the teacher's entropy (distill.entropy_beta), 0 off its rows


@dataclass
class StepCounts:
    """Normalisers of one optimizer step, counted over all its micro-batches and ranks (docs/algorithm.md §3)."""

    tokens: float
    seqs: float
    distill_tokens: float = 0.0
    distill_seqs: float = 0.0


@dataclass
class ObjectiveResult:
    loss: Tensor
    # metric name -> (sum over this micro-batch, weight): weighted means over the step, see `MetricSums`
    sums: dict[str, tuple[Tensor | float, Tensor | float]] = field(default_factory=dict)
    peaks: dict[str, Tensor] = field(default_factory=dict)  # metric name -> max over this micro-batch


def objective(x: TokenInputs, counts: StepCounts, algo: AlgorithmConfig, max_response_len: int) -> ObjectiveResult:
    """The loss of one micro-batch, normalised by the step's counts (so micro-batch losses sum to the step's)."""
    logp_BR, mask_BR = x.logp_BR, x.mask_BR.bool()
    old_BR = x.old_logp_BR if x.old_logp_BR is not None else logp_BR.detach()
    # Token-level truncated IS between the engine's sampler and the trainer (docs/algorithm.md §3).
    tis_BR = torch.ones_like(logp_BR)
    if x.sampler_logp_BR is not None and algo.tis_threshold is not None:
        tis_BR = truncated_is_weights(old_BR, x.sampler_logp_BR, algo.tis_threshold)
    agg = dict(mode=algo.loss_agg_mode, max_response_len=max_response_len)
    # Zero times the log-probs keeps the graph connected when nothing in this micro-batch carries a loss (pure
    # SDPO without a success or feedback): backward still runs, and DDP ranks stay in step.
    out = ObjectiveResult(loss=0.0 * logp_BR.sum())
    n_tok = mask_BR.sum()
    teacher_logp_BR, distill_mask_BR = x.teacher_logp_BR, x.distill_mask_BR
    mix = MIXES.get(algo.mix)

    if algo.uses_policy_loss:
        adv_BR = x.advantages_B[:, None].expand_as(logp_BR)
        if mix.in_advantage and distill_mask_BR is not None:
            # Rows without a reprompt signal have no SDPO advantage (0), only lambda * A_GRPO.
            sdpo_adv_BR = torch.zeros_like(logp_BR)
            if teacher_logp_BR is not None:
                clip = algo.distill.advantage_clip
                sdpo_adv_BR = sdpo_token_advantages(teacher_logp_BR, logp_BR.detach(), clip) * distill_mask_BR
            adv_BR = mix_advantages(x.advantages_B, sdpo_adv_BR, algo.grpo_weight)
        pg_BR, clipped_BR = clipped_policy_loss(logp_BR, old_BR, adv_BR, algo.policy.clip_eps_low, algo.policy.clip_eps_high)
        pg_BR = pg_BR * tis_BR
        # Routed rows take one signal each: the distilled ones have no policy loss.
        pg_mask_BR = mask_BR & ~distill_mask_BR if mix.routes and distill_mask_BR is not None else mask_BR
        if x.ref_logp_BR is not None:
            kl_BR = kl_penalty(logp_BR, x.ref_logp_BR, algo.policy.kl_estimator)
            pg_BR = pg_BR + algo.policy.kl_coef * kl_BR
            out.sums["policy/kl_ref"] = ((kl_BR.detach() * pg_mask_BR).sum(), pg_mask_BR.sum())
        policy_loss = aggregate(pg_BR, pg_mask_BR, num_tokens=counts.tokens, num_seqs=counts.seqs, **agg)
        out.loss = out.loss + mix.policy_weight(algo.grpo_weight) * policy_loss
        out.sums["policy/loss"] = (policy_loss.detach() * counts.tokens, n_tok)
        out.sums["policy/clip_fraction"] = ((clipped_BR & pg_mask_BR).sum(), pg_mask_BR.sum())

    if distill_mask_BR is not None:
        # Every rank logs the same keys (metrics are all-reduced), with zero weight where nothing was distilled.
        n_distill = distill_mask_BR.sum()
        gap_BR = (logp_BR.detach() - teacher_logp_BR) * distill_mask_BR if teacher_logp_BR is not None else mask_BR * 0.0
        # E_{y ~ student}[log s(y) - log q(y)]: an unbiased estimate of KL(student || teacher) on-policy.
        out.sums["distill/student_teacher_kl"] = (gap_BR.sum(), n_distill)
        if mix.distill_term and teacher_logp_BR is None:
            out.sums["distill/loss"] = out.sums["distill/is_clip_fraction"] = (0.0, 0.0)
        elif mix.distill_term:
            ratio_BR = is_ratio(logp_BR, old_BR, algo.distill.is_clip)
            # Logit-level modes were computed in the forward (`distill_BR`); sampled-token ones need log q(y_t) only.
            per_token_BR = (x.distill_BR.to(logp_BR.dtype) if x.distill_BR is not None else DISTILL_MODES.get(
                algo.distill.mode).token_loss(logp_BR, teacher_logp_BR, distill_mask_BR, algo.distill.advantage_clip))
            if algo.distill.token_clip is not None:  # a logit-level divergence (>= 0) capped per token
                capped_BR = (per_token_BR.detach() > algo.distill.token_clip) & distill_mask_BR
                per_token_BR = per_token_BR.clamp(max=algo.distill.token_clip)
                out.sums["distill/token_clip_fraction"] = (capped_BR.sum(), n_distill)
            if algo.distill.entropy_beta is not None:
                weight_BR = entropy_weights(x.teacher_entropy_BR, distill_mask_BR, algo.distill.entropy_beta)
                per_token_BR = per_token_BR * weight_BR
                out.peaks["distill/entropy_weight_max"] = weight_BR.max()
                out.sums["distill/teacher_entropy"] = ((x.teacher_entropy_BR * distill_mask_BR).sum(), n_distill)
            # A routed mix shares the policy loss's normaliser (the step's tokens): each signal counts in proportion
            # to the tokens it covers.
            tokens, seqs = (counts.tokens, counts.seqs) if mix.routes else (counts.distill_tokens, counts.distill_seqs)
            distill_loss = aggregate(per_token_BR * ratio_BR * tis_BR, distill_mask_BR, num_tokens=tokens,
                                     num_seqs=seqs, **agg)
            out.loss = out.loss + mix.distill_weight(algo.grpo_weight) * distill_loss
            out.sums["distill/loss"] = (distill_loss.detach() * tokens, n_distill)
            out.sums["distill/is_clip_fraction"] = (((ratio_BR >= algo.distill.is_clip) & distill_mask_BR).sum(), n_distill)
    out.sums["policy/entropy"] = ((x.entropy_BR * mask_BR).sum(), n_tok)
    if x.sampler_logp_BR is not None:
        # Engine-vs-trainer mismatch on the behaviour policy's log-probs (docs/algorithm.md §9).
        delta_BR = (old_BR - x.sampler_logp_BR).abs() * mask_BR
        out.sums["rollout/logp_abs_diff_mean"] = (delta_BR.sum(), n_tok)
        out.peaks["rollout/logp_abs_diff_max"] = delta_BR.max()
        out.sums["rollout/tis_weight_mean"] = ((tis_BR * mask_BR).sum(), n_tok)
        if algo.tis_threshold is not None:
            out.sums["rollout/tis_truncated_fraction"] = (((tis_BR >= algo.tis_threshold) & mask_BR).sum(), n_tok)
    return out


def entropy_weights(entropy_BR: Tensor | None, mask_BR: Tensor, beta: float) -> Tensor:
    """SRPO's weights of the distilled tokens (docs/algorithm.md §12): exp(-beta H) over its mean on the masked
    tokens (of this micro-batch), so that confident teacher tokens count more and the loss scale is kept; 0 off the
    mask."""
    if entropy_BR is None:
        raise ValueError("algorithm.distill.entropy_beta needs the teacher's entropy: the trainer must score the teacher")
    raw_BR = torch.exp(-beta * entropy_BR.detach().to(torch.float64)) * mask_BR
    mean = raw_BR.sum() / mask_BR.sum().clamp(min=1)
    return (raw_BR / mean.clamp(min=torch.finfo(torch.float64).tiny)).to(entropy_BR.dtype)


class MetricSums:
    """Weighted sums over a step's micro-batches, averaged once per step (`means`, after combining ranks)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.peaks: dict[str, float] = defaultdict(lambda: -math.inf)

    def add(self, name: str, total: Tensor | float, weight: Tensor | float) -> None:
        self.sums[name] += float(total)
        self.weights[name] += float(weight)

    def add_result(self, result: ObjectiveResult) -> None:
        for name, (total, weight) in result.sums.items():
            self.add(name, total, weight)
        for name, value in result.peaks.items():
            self.peaks[name] = max(self.peaks[name], float(value))

    def means(self, reduce_sum=lambda t: t, reduce_max=lambda t: t) -> dict[str, float]:
        """Weighted means and peaks; the reducers combine ranks first (every rank must hold the same keys)."""
        keys = sorted(self.sums)
        totals = reduce_sum(torch.tensor([[self.sums[k] for k in keys], [self.weights[k] for k in keys]], dtype=torch.float64))
        out = {k: float(s / w) for k, s, w in zip(keys, *totals.cpu()) if w > 0}
        if self.peaks:
            names = sorted(self.peaks)
            out |= dict(zip(names, reduce_max(torch.tensor([self.peaks[k] for k in names], dtype=torch.float64)).tolist()))
        return out
