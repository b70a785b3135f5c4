"""SDPO and GRPO losses as plain functions of tensors (no configs, no models inside).

Shape suffixes name tensor dimensions: `_B` samples (rollouts) in a (micro-)batch, `_R` response positions,
`_V` vocabulary, `_K` top-k support (K + 1 with a tail bucket), `_H` hidden size. Per-token tensors are
response-aligned and right-padded: position t of row b concerns response token t, and a `mask_BR` marks the real
(loss-bearing) tokens.

Config names map to functions through the registries, each via `.get(name)` and nowhere else: ADVANTAGE_ESTIMATORS
("grpo", used by `sdpo.rollout.episodes.episode_advantages`), AGGREGATIONS ("token-mean", "seq-mean-token-mean",
"seq-mean-token-sum-norm"), DISTILL_MODES ("sampled_token", "sequence", "full_logits", "topk_logits": each a
`DistillMode` that declares whether it needs both models' logits), KL_ESTIMATORS ("k1", "k2", "k3"), MIXES
("loss", "advantage": each a `Mix`) and EPISODE_RETURNS ("final", "any_success", "discounted"). The config validates
its choices against these registries, so an entry registered from outside the library is selectable by name.

The whole objective of a micro-batch (GRPO, pure SDPO, both hybrids) is one function of per-token tensors,
`sdpo.losses.objective.objective`.

Two ways to combine GRPO and SDPO (docs/algorithm.md §3):
- advantage level (paper Eq. 3): `mix_advantages(A_GRPO, sdpo_token_advantages(q, s), grpo_weight=lambda)` goes
  into `clipped_policy_loss`; the SDPO part is then sampled-token only and subject to PPO clipping.
- loss level (TRL's port): (1 - w) * policy loss + w * aggregated `distill_per_token` (any mode), each aggregated
  on its own. With one shared normalisation, sampled_token mode and no clipping active, the two give the same
  gradient at w = 1 - lambda; they differ once the ratio clips or the distillation uses full / top-k logits.
"""

from sdpo.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    EPISODE_RETURNS,
    group_advantages,
    mix_advantages,
    sdpo_token_advantages,
)
from sdpo.losses.aggregate import AGGREGATIONS, aggregate, masked_mean
from sdpo.losses.distill import (
    DISTILL_MODES,
    DistillMode,
    distill_per_token,
    divergence,
    is_ratio,
    log_softmax_temperature,
    sampled_token_distill,
    topk_support,
)
from sdpo.losses.mix import MIXES, Mix
from sdpo.losses.logprobs import chunked_response_terms, entropy_from_logits, token_logprobs
from sdpo.losses.policy import KL_ESTIMATORS, clipped_policy_loss, kl_penalty, truncated_is_weights

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "DISTILL_MODES",
    "DistillMode",
    "EPISODE_RETURNS",
    "KL_ESTIMATORS",
    "MIXES",
    "Mix",
    "aggregate",
    "chunked_response_terms",
    "clipped_policy_loss",
    "distill_per_token",
    "divergence",
    "entropy_from_logits",
    "group_advantages",
    "is_ratio",
    "sampled_token_distill",
    "kl_penalty",
    "log_softmax_temperature",
    "masked_mean",
    "mix_advantages",
    "sdpo_token_advantages",
    "token_logprobs",
    "topk_support",
    "truncated_is_weights",
]
