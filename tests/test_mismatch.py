"""The engine-vs-trainer mismatch metrics, against hand-computed values."""

import math

import pytest
import torch

from sdpo.losses import truncated_is_weights
from sdpo.rollout.mismatch import logprob_mismatch_metrics


def test_hand_computed_values() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0]])
    sampler = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, 9.0, 9.0]])  # the padding (mask 0) is far off on purpose
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    m = logprob_mismatch_metrics(trainer, sampler, mask, threshold=2.0)
    deltas = [0.5, 0.0, 1.5, -1.0]  # trainer - sampler on the four real tokens
    assert m["rollout/logp_abs_diff_mean"] == pytest.approx(sum(abs(d) for d in deltas) / 4)
    assert m["rollout/logp_abs_diff_max"] == pytest.approx(1.5)
    weights = [min(math.exp(d), 2.0) for d in deltas]  # exp(0.5)=1.65, 1, exp(1.5)=4.48 -> 2, exp(-1)=0.37
    assert m["rollout/tis_weight_mean"] == pytest.approx(sum(weights) / 4, rel=1e-6)
    assert m["rollout/tis_truncated_fraction"] == pytest.approx(0.25)
    assert m["rollout/mismatch_tokens"] == 4.0


def test_weight_mean_is_the_applied_weight() -> None:
    g = torch.Generator().manual_seed(0)
    trainer = -torch.rand(4, 7, generator=g) * 3
    sampler = trainer + torch.randn(4, 7, generator=g)
    mask = torch.rand(4, 7, generator=g) > 0.3
    m = logprob_mismatch_metrics(trainer, sampler, mask, threshold=1.5, prefix="")
    applied = truncated_is_weights(trainer, sampler, 1.5)[mask]
    assert m["tis_weight_mean"] == pytest.approx(applied.mean().item(), rel=1e-6)
    assert m["tis_truncated_fraction"] == pytest.approx((applied >= 1.5).float().mean().item())


def test_identical_logprobs_and_edge_cases() -> None:
    logp = -torch.rand(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    m = logprob_mismatch_metrics(logp, logp.clone(), mask, threshold=2.0)
    assert m["rollout/logp_abs_diff_max"] == 0.0
    assert m["rollout/tis_weight_mean"] == pytest.approx(1.0)
    assert m["rollout/tis_truncated_fraction"] == 0.0

    # No threshold: the plain ratio, never truncated; a huge gap does not overflow.
    m = logprob_mismatch_metrics(torch.tensor([[0.0, -1.0]]), torch.tensor([[-500.0, -1.0]]), torch.ones(1, 2), None)
    assert math.isfinite(m["rollout/tis_weight_mean"]) and m["rollout/tis_truncated_fraction"] == 0.0

    # An empty mask gives zeros, not NaN.
    m = logprob_mismatch_metrics(logp, logp + 1, torch.zeros(2, 5, dtype=torch.bool), threshold=2.0)
    assert all(v == 0.0 for v in m.values())

    with pytest.raises(ValueError, match="shapes differ"):
        logprob_mismatch_metrics(logp, logp[:, :3], mask, 2.0)
    with pytest.raises(ValueError, match="positive"):
        logprob_mismatch_metrics(logp, logp, mask, 0.0)
