"""Self-distillation losses: per-token divergences between student and (stop-gradient) teacher (docs/algorithm.md §3).

Four modes (`DISTILL_MODES`): `sampled_token` (the sampled token only, a policy-gradient form of reverse KL),
`sequence` (the same with one advantage per response: sequence-level credit, an ablation),
`full_logits` (the whole vocabulary) and `topk_logits` (the student's top-k ids, plus a tail bucket or
renormalised). The divergence over a support is chosen by `alpha`: 0 forward KL, 1 reverse KL, else generalised JSD.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sdpo.losses.advantages import sdpo_token_advantages
from sdpo.registry import Registry



@dataclass(frozen=True)
class DistillMode:
    """A distillation mode and what it needs (`needs_logits`), so that its callers ask the mode instead of naming it.

    Logit-level modes compare the two distributions at every position from both models' logits: `logit_loss`
    (student_logits_BRV, teacher_logits_BRV, response_ids_BR, *, alpha, topk, tail, temperature, entry_clip), the
    teacher detached, computed chunk by chunk inside the forward. Sampled-token modes need only the sampled tokens'
    log-probs log s(y_t) and log q(y_t), which an inference engine can supply too: `token_loss`(student_logp_BR,
    teacher_logp_BR, mask_BR, advantage_clip), reverse KL only. Both return the per-token loss [B, R]."""

    needs_logits: bool
    logit_loss: Callable[..., Tensor] | None = None
    token_loss: Callable[[Tensor, Tensor, Tensor, float | None], Tensor] | None = None
    # The per-token loss is the sampled-token SDPO advantage q(y_t) - s(y_t): what algorithm.distill.advantage_clip
    # clips and algorithm.mix=advantage mixes into the policy gradient.
    token_advantage: bool = False


DISTILL_MODES: Registry[DistillMode] = Registry("distillation mode")

# logsumexp of the top-k log-probs is clamped to this before computing the tail mass (docs/algorithm.md §3): when the top-k
# holds (numerically) all the mass, log(1 - exp(0)) would be -inf and poison the loss with NaN.
_TAIL_MAX_LOG_MASS = -1e-7


def log_softmax_temperature(logits: Tensor, temperature: float) -> Tensor:
    """log_softmax(logits / temperature) over the last dim, computed in at least float32.

    The sampler drew tokens at this temperature, so the trainer must score them at the same one (docs/algorithm.md §9).
    Half-precision logits are upcast: a bf16 log-softmax over ~150k entries loses the small differences we train on.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    # At temperature 1 the division would only copy a [B, R, V] tensor (and keep it for the backward).
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def gather_token(logp_BRV: Tensor, ids_BR: Tensor) -> Tensor:
    """The entries of `logp_BRV` at `ids_BR` along the last dim -> [B, R]."""
    return logp_BRV.gather(-1, ids_BR.long().unsqueeze(-1)).squeeze(-1)


def _kl_terms(p_log: Tensor, q_log: Tensor) -> Tensor:
    """The terms p (log p - log q) of KL(P || Q), one per support entry, from log-probs (F.kl_div convention)."""
    return F.kl_div(q_log, p_log, reduction="none", log_target=True)


def divergence(student_logp_K: Tensor, teacher_logp_K: Tensor, alpha: float, entry_clip: float | None = None) -> Tensor:
    """Divergence between two distributions given as log-probs over the same support (the last dim).

    alpha = 0: forward KL(T || S); alpha = 1: reverse KL(S || T), the paper's Eq. 1; otherwise the generalised JSD
    (1 - alpha) KL(S || M) + alpha KL(T || M) with M = (1 - alpha) S + alpha T (alpha = 0.5 is the usual JSD).
    `entry_clip`: each support entry's term is capped there before the sum (no gradient through a capped entry), so
    that a few vocabulary entries cannot dominate a token's signal. Pure math: differentiable in both arguments
    (callers detach the teacher).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha in (0.0, 1.0):
        p_log, q_log = (teacher_logp_K, student_logp_K) if alpha == 0.0 else (student_logp_K, teacher_logp_K)
        terms = _kl_terms(p_log, q_log)
        return (terms if entry_clip is None else terms.clamp(max=entry_clip)).sum(-1)
    # log M via logsumexp of the weighted log-probs, stable when either probability underflows.
    mix_log = torch.logsumexp(
        torch.stack([student_logp_K + math.log(1.0 - alpha), teacher_logp_K + math.log(alpha)]), dim=0
    )
    student_terms, teacher_terms = _kl_terms(student_logp_K, mix_log), _kl_terms(teacher_logp_K, mix_log)
    if entry_clip is None:  # two sums, not a clamped sum: the unclipped divergence keeps its own rounding
        return (1.0 - alpha) * student_terms.sum(-1) + alpha * teacher_terms.sum(-1)
    return ((1.0 - alpha) * student_terms + alpha * teacher_terms).clamp(max=entry_clip).sum(-1)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012: switch formula at x = -log 2)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _with_tail(logp_K: Tensor) -> Tensor:
    """Append a bucket holding the mass outside the support: [..., K] -> [..., K + 1]."""
    log_mass = torch.logsumexp(logp_K, dim=-1, keepdim=True).clamp(max=_TAIL_MAX_LOG_MASS)
    return torch.cat([logp_K, _log1mexp(log_mass)], dim=-1)


def topk_support(
    student_logits_BRV: Tensor, teacher_logits_BRV: Tensor, k: int, tail: bool, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs on the student's top-k ids (temperature-scaled), docs/algorithm.md §3.

    Both are normalised over the full vocabulary before gathering, so the student's gradient also reaches the
    logits outside the top-k through the logsumexp. tail=True appends the leftover-mass bucket (-> K + 1 entries),
    tail=False renormalises over the K entries. The teacher is detached.
    """
    if k <= 0:
        raise ValueError(f"top-k must be positive, got {k}")
    student_logp_BRV = log_softmax_temperature(student_logits_BRV, temperature)
    teacher_logp_BRV = log_softmax_temperature(teacher_logits_BRV.detach(), temperature)
    ids_BRK = student_logp_BRV.detach().topk(min(k, student_logp_BRV.shape[-1]), dim=-1).indices
    student_BRK = student_logp_BRV.gather(-1, ids_BRK)
    teacher_BRK = teacher_logp_BRV.gather(-1, ids_BRK)
    if tail:
        return _with_tail(student_BRK), _with_tail(teacher_BRK)
    return (student_BRK - torch.logsumexp(student_BRK, -1, keepdim=True),
            teacher_BRK - torch.logsumexp(teacher_BRK, -1, keepdim=True))


def _sampled_token_logps(student_logits_BRV: Tensor, teacher_logits_BRV: Tensor, response_ids_BR: Tensor,
                         temperature: float) -> tuple[Tensor, Tensor]:
    """log s(y_t) and log q(y_t) of the sampled tokens: what the sampled-token and sequence modes need."""
    return (gather_token(log_softmax_temperature(student_logits_BRV, temperature), response_ids_BR),
            gather_token(log_softmax_temperature(teacher_logits_BRV, temperature), response_ids_BR))


def sampled_token_distill(student_logp_BR: Tensor, teacher_logp_BR: Tensor, advantage_clip: float | None = None) -> Tensor:
    """The sampled-token loss from the two log-probs of the sampled tokens (also when an engine scored the teacher):
    -A_SDPO * s with A_SDPO = q - s detached, clipped to [-advantage_clip, advantage_clip] when given (docs/algorithm.md §3)."""
    return -sdpo_token_advantages(teacher_logp_BR, student_logp_BR, advantage_clip) * student_logp_BR


def sequence_distill(student_logp_BR: Tensor, teacher_logp_BR: Tensor, mask_BR: Tensor) -> Tensor:
    """Sequence-level credit (the paper's credit-granularity ablation): every token of a response gets the same SDPO
    advantage, the response's mean log-ratio A_b = mean_t (q_t - s_t) over its real tokens (detached), in the loss
    -A_b * s_t. The sampled-token form gives each token its own q_t - s_t; this one spreads the sequence's total
    evenly, which is all that differs. The mean rather than the sum (the sum, log q(y) - log s(y), is the
    score-function gradient of the sequence-level reverse KL) keeps the scale of the token-level form, so that the
    ablation compares how credit is assigned and not step sizes (the sum is ~R times larger). Padding gets 0."""
    mask = mask_BR.to(student_logp_BR.dtype)
    gap_BR = (teacher_logp_BR - student_logp_BR).detach() * mask
    advantage_B = gap_BR.sum(-1) / mask.sum(-1).clamp(min=1.0)
    return -advantage_B[:, None] * student_logp_BR * mask


def _full_logits(student_logits_BRV, teacher_logits_BRV, response_ids_BR, *, alpha, topk, tail, temperature,
                 entry_clip=None):
    return divergence(log_softmax_temperature(student_logits_BRV, temperature),
                      log_softmax_temperature(teacher_logits_BRV, temperature), alpha, entry_clip)


def _topk_logits(student_logits_BRV, teacher_logits_BRV, response_ids_BR, *, alpha, topk, tail, temperature,
                 entry_clip=None):
    return divergence(*topk_support(student_logits_BRV, teacher_logits_BRV, topk, tail, temperature), alpha,
                      entry_clip)


# The sampled-token form: reverse KL estimated at the sampled token, whose gradient (s - q) * grad s is the REINFORCE
# form of grad KL(S || T) with per-token advantage q - s (docs/algorithm.md §3). No other alpha has this form.
DISTILL_MODES.register("sampled_token")(DistillMode(
    needs_logits=False, token_loss=lambda s_BR, q_BR, mask_BR, clip: sampled_token_distill(s_BR, q_BR, clip),
    token_advantage=True))
DISTILL_MODES.register("full_logits")(DistillMode(needs_logits=True, logit_loss=_full_logits))
DISTILL_MODES.register("topk_logits")(DistillMode(needs_logits=True, logit_loss=_topk_logits))
DISTILL_MODES.register("sequence")(DistillMode(
    needs_logits=False, token_loss=lambda s_BR, q_BR, mask_BR, clip: sequence_distill(s_BR, q_BR, mask_BR)))


def distill_per_token(
    student_logits_BRV: Tensor,
    teacher_logits_BRV: Tensor,
    response_ids_BR: Tensor,
    mode: str,
    alpha: float,
    topk: int,
    tail: bool,
    temperature: float,
    entry_clip: float | None = None,
) -> Tensor:
    """Per-token distillation loss [B, R] of the student toward the teacher; `mode` names a DISTILL_MODES entry.
    `entry_clip` (logit-level modes): the cap on each support entry's term (`divergence`).

    The teacher is always detached (stop-gradient, paper Eq. 1). `topk` and `tail` matter only for topk_logits;
    `response_ids_BR` only for the sampled-token modes, whose every position counts as a real token here (the
    objective passes them the response mask). Mask and aggregate the result with `aggregate`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    entry = DISTILL_MODES.get(mode)
    if entry.needs_logits:
        return entry.logit_loss(student_logits_BRV, teacher_logits_BRV.detach(), response_ids_BR,
                                alpha=alpha, topk=topk, tail=tail, temperature=temperature, entry_clip=entry_clip)
    if alpha != 1.0:
        raise ValueError(f"distillation mode {mode!r} supports only alpha=1.0 (reverse KL), got {alpha}")
    s_BR, q_BR = _sampled_token_logps(student_logits_BRV, teacher_logits_BRV.detach(), response_ids_BR, temperature)
    return entry.token_loss(s_BR, q_BR, torch.ones_like(s_BR, dtype=torch.bool), None)


def is_ratio(logp_BR: Tensor, old_logp_BR: Tensor, clip: float) -> Tensor:
    """Importance weight pi_theta / pi_old for off-policy steps, detached and capped at `clip` (docs/algorithm.md §3).

    The log-ratio is clamped to [-20, 20] first so that a stale token cannot overflow exp.
    """
    return torch.exp((logp_BR - old_logp_BR).clamp(-20.0, 20.0)).detach().clamp(max=clip)
