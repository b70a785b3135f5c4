"""How far the inference engine's sampler is from the trainer: metrics for token-level truncated IS (docs/algorithm.md §3, §9).

An engine such as vLLM samples with its own kernels (fused attention, bf16 weights, another reduction order), so
log pi_sampler(y_t) differs from the trainer's recomputed log pi_trainer(y_t) even at identical weights. The
trainer corrects for it with the truncated importance weight min(pi_trainer / pi_sampler, threshold)
(`sdpo.losses.truncated_is_weights`); these metrics say how large the gap is and how often the cap binds. A
`logp_abs_diff_mean` that grows during training, or a truncated fraction well above a few percent, points to a
real mismatch (wrong temperature, raw instead of processed log-probs, a stale weight sync), not numerics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdpo.losses import truncated_is_weights

# exp() overflows float32 above ~88; a ratio past exp(20) is "infinitely off" for these metrics anyway.
_MAX_LOG_RATIO = 20.0


@torch.no_grad()
def logprob_mismatch_metrics(
    trainer_logp_BR: Tensor,
    sampler_logp_BR: Tensor,
    mask_BR: Tensor,
    threshold: float | None,
    *,
    prefix: str = "rollout/",
) -> dict[str, float]:
    """Mismatch statistics over the real (masked) response tokens.

    Keys (after `prefix`):
    - `logp_abs_diff_mean`, `logp_abs_diff_max`: mean and max of |log pi_trainer(y_t) - log pi_sampler(y_t)|.
    - `tis_weight_mean`: mean of the weight applied to the loss, min(exp(trainer - sampler), threshold)
      (the untruncated ratio when `threshold` is None). Near 1 when the two agree.
    - `tis_truncated_fraction`: fraction of tokens whose ratio exceeds `threshold` (0 when None).
    - `mismatch_tokens`: how many tokens the statistics cover.
    With no masked token every statistic is 0.
    """
    if trainer_logp_BR.shape != sampler_logp_BR.shape or trainer_logp_BR.shape != mask_BR.shape:
        raise ValueError(
            f"shapes differ: trainer {tuple(trainer_logp_BR.shape)}, sampler {tuple(sampler_logp_BR.shape)}, "
            f"mask {tuple(mask_BR.shape)}"
        )
    if threshold is not None and threshold <= 0:
        raise ValueError(f"the truncated-IS threshold must be positive, got {threshold}")
    mask = mask_BR.bool()
    trainer = trainer_logp_BR.detach().float()[mask]
    sampler = sampler_logp_BR.detach().float().to(trainer.device)[mask]
    count = trainer.numel()
    if count == 0:
        names = ("logp_abs_diff_mean", "logp_abs_diff_max", "tis_weight_mean", "tis_truncated_fraction")
        return {prefix + name: 0.0 for name in (*names, "mismatch_tokens")}
    delta = trainer - sampler
    abs_delta = delta.abs()
    if threshold is None:
        weights = delta.clamp(max=_MAX_LOG_RATIO).exp()
        truncated = torch.zeros_like(delta, dtype=torch.bool)
    else:
        # The same function the trainer multiplies the losses with, so the logged weight is the applied weight.
        weights = truncated_is_weights(trainer, sampler, threshold)
        truncated = delta > math.log(threshold)
    return {
        prefix + "logp_abs_diff_mean": abs_delta.mean().item(),
        prefix + "logp_abs_diff_max": abs_delta.max().item(),
        prefix + "tis_weight_mean": weights.mean().item(),
        prefix + "tis_truncated_fraction": truncated.float().mean().item(),
        prefix + "mismatch_tokens": float(count),
    }
