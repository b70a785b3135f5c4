"""Losses against slow, obviously-correct float64 references written loop-style, values and gradients.

References loop over samples, positions and vocabulary entries with scalar float64 torch ops (so that autograd
gives their gradients), never calling the library.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from sdpo.losses import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    DISTILL_MODES,
    KL_ESTIMATORS,
    aggregate,
    clipped_policy_loss,
    distill_per_token,
    divergence,
    entropy_from_logits,
    group_advantages,
    is_ratio,
    kl_penalty,
    masked_mean,
    mix_advantages,
    sdpo_token_advantages,
    token_logprobs,
    topk_support,
    truncated_is_weights,
)
from sdpo.losses.distill import sequence_distill

F64 = torch.float64
B, R, V = 2, 3, 7


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_(True)


# ---------------------------------------------------------------- scalar reference helpers

def ref_log_softmax(row, temperature):
    """list of scalar tensors -> list of log-probs of softmax(row / temperature)."""
    z = [x / temperature for x in row]
    log_norm = torch.log(sum(torch.exp(zj) for zj in z))
    return [zj - log_norm for zj in z]


def ref_kl(p_log, q_log):
    """KL(P || Q) = sum_j p_j (log p_j - log q_j)."""
    return sum(torch.exp(p) * (p - q) for p, q in zip(p_log, q_log))


def ref_divergence(s_log, t_log, alpha):
    if alpha == 0:
        return ref_kl(t_log, s_log)
    if alpha == 1:
        return ref_kl(s_log, t_log)
    m_log = [torch.log((1 - alpha) * torch.exp(s) + alpha * torch.exp(t)) for s, t in zip(s_log, t_log)]
    return (1 - alpha) * ref_kl(s_log, m_log) + alpha * ref_kl(t_log, m_log)


def ref_topk(s_row_logits, t_row_logits, k, tail, temperature):
    s_full = ref_log_softmax(s_row_logits, temperature)
    t_full = ref_log_softmax(t_row_logits, temperature)
    ids = sorted(range(len(s_row_logits)), key=lambda j: -s_row_logits[j].item())[:k]
    s_k, t_k = [s_full[j] for j in ids], [t_full[j] for j in ids]
    if tail:
        return (s_k + [torch.log(1 - sum(torch.exp(x) for x in s_k))],
                t_k + [torch.log(1 - sum(torch.exp(x) for x in t_k))])
    s_norm = torch.log(sum(torch.exp(x) for x in s_k))
    t_norm = torch.log(sum(torch.exp(x) for x in t_k))
    return [x - s_norm for x in s_k], [x - t_norm for x in t_k]


def ref_distill(s_logits, t_logits, ids, mode, alpha, k, tail, temperature):
    """[B, R] reference of distill_per_token built from per-position scalars; teacher detached."""
    t_logits = t_logits.detach()
    rows = []
    for b in range(s_logits.shape[0]):
        row = []
        for r in range(s_logits.shape[1]):
            s_row = [s_logits[b, r, v] for v in range(s_logits.shape[2])]
            t_row = [t_logits[b, r, v] for v in range(t_logits.shape[2])]
            if mode == "sampled_token":
                y = int(ids[b, r])
                s_y = ref_log_softmax(s_row, temperature)[y]
                q_y = ref_log_softmax(t_row, temperature)[y]
                row.append((s_y - q_y).detach() * s_y)
            elif mode == "full_logits":
                row.append(ref_divergence(ref_log_softmax(s_row, temperature),
                                          ref_log_softmax(t_row, temperature), alpha))
            else:
                row.append(ref_divergence(*ref_topk(s_row, t_row, k, tail, temperature), alpha))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def grads_match(lib_fn, ref_fn, inputs, seed=0, tol=1e-10):
    """Values of lib_fn(*inputs) and ref_fn(*inputs) agree, and so do the gradients of a random weighting."""
    lib_in = [x.detach().clone().requires_grad_(True) for x in inputs]
    ref_in = [x.detach().clone().requires_grad_(True) for x in inputs]
    lib_out, ref_out = lib_fn(*lib_in), ref_fn(*ref_in)
    close(lib_out, ref_out, tol)
    weights = torch.rand(lib_out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    lib_grads = torch.autograd.grad((lib_out * weights).sum(), lib_in, allow_unused=True)
    ref_grads = torch.autograd.grad((ref_out * weights).sum(), ref_in, allow_unused=True)
    for lib_g, ref_g in zip(lib_grads, ref_grads):
        assert (lib_g is None) == (ref_g is None)
        if lib_g is not None:
            close(lib_g, ref_g, tol)
    return lib_grads


# ---------------------------------------------------------------- divergence and distillation

@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_divergence_matches_reference_value_and_both_gradients(alpha):
    s_logits, t_logits = rand(B, R, V, seed=1), rand(B, R, V, seed=2)

    def lib(s, t):
        return divergence(torch.log_softmax(s, -1), torch.log_softmax(t, -1), alpha)

    def ref(s, t):
        return torch.stack([torch.stack([
            ref_divergence(ref_log_softmax(list(s[b, r]), 1.0), ref_log_softmax(list(t[b, r]), 1.0), alpha)
            for r in range(R)]) for b in range(B)])

    grads = grads_match(lib, ref, [s_logits, t_logits])
    assert grads[0].abs().max() > 1e-3 and grads[1].abs().max() > 1e-3


def test_divergence_is_zero_for_equal_distributions_and_positive_otherwise():
    logp = torch.log_softmax(rand(4, V, seed=3).detach(), -1)
    other = torch.log_softmax(rand(4, V, seed=4).detach(), -1)
    for alpha in (0.0, 0.5, 1.0):
        close(divergence(logp, logp, alpha), torch.zeros(4, dtype=F64))
        assert (divergence(logp, other, alpha) > 0).all()


def test_divergence_gradcheck_float64():
    s, t = rand(2, 5, seed=5), rand(2, 5, seed=6)
    for alpha in (0.0, 0.3, 1.0):
        assert torch.autograd.gradcheck(
            lambda a, b: divergence(torch.log_softmax(a, -1), torch.log_softmax(b, -1), alpha), (s, t))


DISTILL_CASES = [
    ("full_logits", 0.0, 0, False), ("full_logits", 0.3, 0, False),
    ("full_logits", 0.5, 0, False), ("full_logits", 1.0, 0, False),
    ("topk_logits", 1.0, 3, True), ("topk_logits", 0.5, 3, True), ("topk_logits", 0.0, 4, True),
    ("topk_logits", 1.0, 3, False), ("topk_logits", 0.3, 3, False),
    ("sampled_token", 1.0, 0, False),
]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("mode,alpha,k,tail", DISTILL_CASES)
def test_distill_per_token_matches_reference(mode, alpha, k, tail, temperature):
    s_logits, t_logits = rand(B, R, V, seed=7, scale=2.0), rand(B, R, V, seed=8, scale=2.0)
    ids = torch.randint(0, V, (B, R), generator=torch.Generator().manual_seed(9))

    def lib(s, t):
        return distill_per_token(s, t, ids, mode, alpha, k, tail, temperature)

    def ref(s, t):
        return ref_distill(s, t, ids, mode, alpha, k, tail, temperature)

    s_grad, t_grad = grads_match(lib, ref, [s_logits, t_logits])
    assert t_grad is None  # stop-gradient on the teacher
    assert s_grad.abs().max() > 1e-4


@pytest.mark.parametrize("tail", [True, False])
def test_topk_support_gradient_reaches_logits_outside_topk(tail):
    s_logits, t_logits = rand(B, R, V, seed=10), rand(B, R, V, seed=11)
    k = 3
    s_k, t_k = topk_support(s_logits, t_logits, k, tail, 1.0)
    assert s_k.shape == (B, R, k + int(tail)) and not t_k.requires_grad
    close(s_k.exp().sum(-1), torch.ones(B, R, dtype=F64))  # a distribution on the (extended) support
    close(t_k.exp().sum(-1), torch.ones(B, R, dtype=F64))
    divergence(s_k, t_k, 1.0).sum().backward()
    outside = torch.ones(B, R, V, dtype=torch.bool).scatter(-1, s_logits.detach().topk(k, -1).indices, False)
    grad_outside = s_logits.grad[outside]
    if tail:
        # Through the full-vocab logsumexp (and the tail bucket) every logit gets gradient.
        assert (grad_outside.abs() > 1e-8).all()
    else:
        # Renormalising over the top-k cancels the full logsumexp exactly: no gradient outside.
        close(grad_outside, torch.zeros_like(grad_outside), 1e-12)


def test_topk_tail_bucket_is_finite_when_topk_holds_all_mass():
    s_logits = torch.tensor([[[30.0, -30.0, -30.0, -30.0]]], dtype=F64, requires_grad=True)
    t_logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]], dtype=F64)
    loss = distill_per_token(s_logits, t_logits, torch.zeros(1, 1, dtype=torch.long), "topk_logits", 0.5, 1, True, 1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s_logits.grad).all()


def test_sampled_token_gradient_is_advantage_times_score():
    s_logits, t_logits = rand(B, R, V, seed=12), rand(B, R, V, seed=13)
    ids = torch.randint(0, V, (B, R), generator=torch.Generator().manual_seed(14))
    w = torch.rand(B, R, generator=torch.Generator().manual_seed(15), dtype=F64)
    loss = distill_per_token(s_logits, t_logits, ids, "sampled_token", 1.0, 0, False, 0.8)
    (grad_lib,) = torch.autograd.grad((loss * w).sum(), s_logits)
    s = token_logprobs(s_logits, ids, 0.8)
    q = token_logprobs(t_logits.detach(), ids, 0.8)
    (grad_expected,) = torch.autograd.grad(s, s_logits, grad_outputs=(s - q).detach() * w)
    close(grad_lib, grad_expected)
    close(loss, ((s - q) * s).detach())


def test_sampled_token_rejects_other_alpha_and_unknown_mode_lists_names():
    x = torch.zeros(1, 1, 3)
    ids = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="alpha=1.0"):
        distill_per_token(x, x, ids, "sampled_token", 0.5, 0, False, 1.0)
    with pytest.raises(KeyError, match="full_logits, sampled_token, sequence, topk_logits"):
        distill_per_token(x, x, ids, "logits", 1.0, 0, False, 1.0)


def ref_sequence(s_logp, q_logp, mask):
    """Sequence-level credit, loop-style: each real token's loss is -(mean over the row's real tokens of q - s) * s."""
    rows = []
    for b in range(s_logp.shape[0]):
        real = [t for t in range(s_logp.shape[1]) if mask[b, t]]
        advantage = sum((q_logp[b, t] - s_logp[b, t]).detach() for t in real) / max(len(real), 1)
        rows.append(torch.stack([-advantage * s_logp[b, t] if mask[b, t] else 0.0 * s_logp[b, t]
                                 for t in range(s_logp.shape[1])]))
    return torch.stack(rows)


def test_sequence_credit_matches_reference_and_gives_every_token_its_rows_mean_advantage():
    s_logp, q_logp = -rand(3, 4, seed=40).abs(), -rand(3, 4, seed=41).abs()
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    s_grad, q_grad = grads_match(lambda s, q: sequence_distill(s, q, mask), lambda s, q: ref_sequence(s, q, mask),
                                 [s_logp, q_logp])
    assert q_grad is None  # the advantage is detached
    s, q = s_logp.detach(), q_logp.detach()
    (grad,) = torch.autograd.grad(sequence_distill(s_logp, q_logp, mask).sum(), s_logp)
    expected = -((q - s) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1) * mask
    close(grad, expected)
    assert (grad[0, :3] == grad[0, 0]).all() and grad[0, 3] == 0 and (grad[2] == 0).all()


def test_sequence_mode_from_logits_matches_reference():
    s_logits, t_logits = rand(B, R, V, seed=42, scale=2.0), rand(B, R, V, seed=43, scale=2.0)
    ids = torch.randint(0, V, (B, R), generator=torch.Generator().manual_seed(44))
    full = torch.ones(B, R, dtype=torch.bool)

    def ref(s, t):
        s_y = torch.stack([torch.stack([ref_log_softmax([s[b, r, v] for v in range(V)], 0.7)[int(ids[b, r])]
                                        for r in range(R)]) for b in range(B)])
        q_y = torch.stack([torch.stack([ref_log_softmax([t[b, r, v] for v in range(V)], 0.7)[int(ids[b, r])]
                                        for r in range(R)]) for b in range(B)]).detach()
        return ref_sequence(s_y, q_y, full)

    grads_match(lambda s, t: distill_per_token(s, t, ids, "sequence", 1.0, 0, False, 0.7), ref, [s_logits, t_logits])
    with pytest.raises(ValueError, match="alpha=1.0"):
        distill_per_token(s_logits, t_logits, ids, "sequence", 0.5, 0, False, 0.7)


def test_token_logprobs_and_entropy_match_reference():
    logits = rand(B, R, V, seed=16)
    ids = torch.randint(0, V, (B, R), generator=torch.Generator().manual_seed(17))
    temperature = 0.6

    def ref_logp(x):
        return torch.stack([torch.stack([ref_log_softmax(list(x[b, r]), temperature)[int(ids[b, r])]
                                         for r in range(R)]) for b in range(B)])

    def ref_entropy(x):
        return torch.stack([torch.stack([-sum(torch.exp(lp) * lp for lp in ref_log_softmax(list(x[b, r]), temperature))
                                         for r in range(R)]) for b in range(B)])

    grads_match(lambda x: token_logprobs(x, ids, temperature), ref_logp, [logits])
    grads_match(lambda x: entropy_from_logits(x, temperature), ref_entropy, [logits])
    banned = torch.tensor([[[0.0, float("-inf"), 1.0]]])
    assert torch.isfinite(entropy_from_logits(banned, 1.0)).all()


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_sampled_token_logprobs_match_reference(temperature):
    # The teacher's log q(y_t) via logsumexp, and the student's via log-softmax (temperature 1 skips the division).
    from sdpo.losses.logprobs import sampled_token_logprobs

    logits = rand(B, R, V, seed=18)
    ids = torch.randint(0, V, (B, R), generator=torch.Generator().manual_seed(19))
    reference = torch.stack([torch.stack([ref_log_softmax(list(logits[b, r]), temperature)[int(ids[b, r])]
                                          for r in range(R)]) for b in range(B)])
    close(sampled_token_logprobs(logits, ids, temperature), reference, 1e-12)
    close(token_logprobs(logits, ids, temperature), reference, 1e-12)
    half = logits.to(torch.bfloat16)
    close(sampled_token_logprobs(half, ids, temperature), token_logprobs(half, ids, temperature), 1e-5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        sampled_token_logprobs(logits, ids, 0.0)


def test_half_precision_logits_are_scored_in_float32():
    logits = torch.randn(B, R, V).to(torch.bfloat16)
    ids = torch.zeros(B, R, dtype=torch.long)
    assert token_logprobs(logits, ids, 1.0).dtype == torch.float32
    close(token_logprobs(logits, ids, 1.0), token_logprobs(logits.float(), ids, 1.0), 1e-6)


# ---------------------------------------------------------------- policy loss, KL, IS weights

def test_clipped_policy_loss_matches_reference_and_flags_clipped_tokens():
    eps_low, eps_high = 0.2, 0.28
    logp, old = rand(4, 6, seed=20, scale=0.5), rand(4, 6, seed=21, scale=0.5).detach()
    adv = rand(4, 6, seed=22).detach()

    def ref(lp):
        out, flags = [], []
        for b in range(4):
            row, frow = [], []
            for r in range(6):
                ratio = torch.exp(lp[b, r] - old[b, r])
                a = float(adv[b, r])
                clipped_ratio = min(max(ratio.item(), 1 - eps_low), 1 + eps_high)
                unclipped_obj = ratio * a
                clipped_obj = ratio * a if 1 - eps_low <= ratio.item() <= 1 + eps_high else torch.tensor(
                    clipped_ratio * a, dtype=F64)
                use_clipped = clipped_obj.item() < unclipped_obj.item()
                row.append(-(clipped_obj if use_clipped else unclipped_obj))
                frow.append(use_clipped)
            out.append(torch.stack(row))
            flags.append(frow)
        return torch.stack(out), torch.tensor(flags)

    grads_match(lambda lp: clipped_policy_loss(lp, old, adv, eps_low, eps_high)[0], lambda lp: ref(lp)[0], [logp])
    _, clipped = clipped_policy_loss(logp, old, adv, eps_low, eps_high)
    assert torch.equal(clipped, ref(logp.detach())[1])
    assert 0 < clipped.sum() < clipped.numel()  # the data exercises both branches


def test_clip_higher_is_asymmetric():
    adv = torch.ones(1, 2, dtype=F64)
    old = torch.zeros(1, 2, dtype=F64)
    logp = torch.tensor([[math.log(1.25), math.log(1.3)]], dtype=F64)
    loss, clipped = clipped_policy_loss(logp, old, adv, 0.2, 0.28)
    assert clipped.tolist() == [[False, True]]  # 1.25 is inside [0.8, 1.28], 1.3 is not
    close(loss, torch.tensor([[-1.25, -1.28]], dtype=F64))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_reference(estimator):
    logp, ref_logp = rand(B, R, seed=30), rand(B, R, seed=31)
    formulas = {
        "k1": lambda lp, rp: lp - rp,
        "k2": lambda lp, rp: 0.5 * (lp - rp) ** 2,
        "k3": lambda lp, rp: torch.exp(rp - lp) - (rp - lp) - 1,
    }

    def ref(lp, rp):
        return torch.stack([torch.stack([formulas[estimator](lp[b, r], rp[b, r].detach()) for r in range(R)])
                            for b in range(B)])

    _, ref_grad = grads_match(lambda lp, rp: kl_penalty(lp, rp, estimator), ref, [logp, ref_logp])
    assert ref_grad is None  # the reference policy is a constant
    if estimator != "k1":
        assert (kl_penalty(logp, ref_logp, estimator) >= 0).all()
    assert set(KL_ESTIMATORS.names()) == {"k1", "k2", "k3"}


def test_truncated_is_weights_and_is_ratio_match_reference_and_are_detached():
    a, b = rand(3, 5, seed=40), rand(3, 5, seed=41)
    b_far = b.detach().clone()
    b_far[0, 0] = -1000.0  # an extreme log-ratio: exp overflow must still give the cap
    b_far[0, 1] = 1000.0  # is_ratio clamps the log-ratio at -20: exp(-20), not 0
    expected_tis = torch.tensor([[min(math.exp(min((a[i, j] - b_far[i, j]).item(), 700)), 2.0) for j in range(5)]
                                 for i in range(3)], dtype=F64)
    tis = truncated_is_weights(a, b_far, 2.0)
    close(tis, expected_tis)
    assert not tis.requires_grad and 0 < (tis == 2.0).sum() < tis.numel()
    ratio = is_ratio(a, b_far, 1.5)
    expected_ratio = torch.tensor([[min(math.exp(max(-20.0, min(20.0, (a[i, j] - b_far[i, j]).item()))), 1.5)
                                    for j in range(5)] for i in range(3)], dtype=F64)
    close(ratio, expected_ratio)
    assert not ratio.requires_grad and ratio[0, 0] == 1.5 and ratio[0, 1] == math.exp(-20.0)


# ---------------------------------------------------------------- advantages

@pytest.mark.parametrize("norm_by_std", [False, True])
def test_group_advantages_match_reference_with_noncontiguous_groups(norm_by_std):
    rewards = [1.0, 0.0, 0.0, 2.0, 1.0, 0.5, 0.7, 2.0, 2.0]
    groups = [3, 1, 3, 9, 1, 3, 5, 9, 1]  # group 5 has one member; group 9 has equal rewards
    by_group: dict[int, list[float]] = {}
    for r, g in zip(rewards, groups):
        by_group.setdefault(g, []).append(r)
    expected = []
    for r, g in zip(rewards, groups):
        members = by_group[g]
        a = r - statistics.mean(members)
        if norm_by_std:
            a = a / (statistics.stdev(members) + 1e-6) if len(members) > 1 else 0.0
        expected.append(a)
    out = group_advantages(torch.tensor(rewards, dtype=F64), torch.tensor(groups), norm_by_std=norm_by_std)
    close(out, torch.tensor(expected, dtype=F64), 1e-9)
    assert out[6] == 0 and out[3] == 0 and out[0] != 0
    assert ADVANTAGE_ESTIMATORS.get("grpo") is group_advantages


def test_sdpo_token_advantages_clip_and_detach():
    teacher, student = rand(B, R, seed=50, scale=5.0), rand(B, R, seed=51, scale=5.0)
    adv = sdpo_token_advantages(teacher, student, clip=None)
    clipped = sdpo_token_advantages(teacher, student, clip=2.0)
    for b in range(B):
        for r in range(R):
            diff = teacher[b, r].item() - student[b, r].item()
            assert adv[b, r].item() == pytest.approx(diff)
            assert clipped[b, r].item() == pytest.approx(max(-2.0, min(2.0, diff)))
    assert not adv.requires_grad and (clipped.abs() == 2.0).any()


def test_mix_advantages_is_convex_combination_broadcast_over_positions():
    grpo = torch.tensor([1.0, -0.5], dtype=F64)
    sdpo = rand(2, R, seed=52).detach()
    mixed = mix_advantages(grpo, sdpo, 0.9)
    for b in range(2):
        for r in range(R):
            assert mixed[b, r].item() == pytest.approx(0.9 * float(grpo[b]) + 0.1 * sdpo[b, r].item())
    close(mix_advantages(grpo, sdpo, 1.0), grpo[:, None].expand(2, R))
    with pytest.raises(ValueError):
        mix_advantages(grpo, sdpo, 1.5)


# ---------------------------------------------------------------- aggregation

def make_batch(nb=7, nr=6, seed=60):
    values = rand(nb, nr, seed=seed)
    lengths = torch.randint(0, nr + 1, (nb,), generator=torch.Generator().manual_seed(seed + 1))
    lengths[0] = nr
    lengths[1] = 0  # a sequence with no loss token
    mask = torch.arange(nr)[None, :] < lengths[:, None]
    return values, mask


def ref_aggregate(values, mask, mode, num_tokens, num_seqs, max_len):
    total = 0.0
    for b in range(values.shape[0]):
        seq = [values[b, r] for r in range(values.shape[1]) if mask[b, r]]
        if mode == "token-mean":
            total = total + sum(seq) / num_tokens
        elif mode == "seq-mean-token-mean":
            total = total + (sum(seq) / len(seq) if seq else 0.0) / num_seqs
        else:
            total = total + sum(seq) / max_len / num_seqs
    return total


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_matches_reference_and_ignores_masked_entries(mode):
    values, mask = make_batch()
    garbage = values.detach().clone()
    garbage[~mask] = 1e30  # masked-out entries must not contribute, whatever they hold
    values_g = (values + (garbage - values.detach())).detach().requires_grad_(True)
    n_tok, n_seq = int(mask.sum()), values.shape[0] + 3  # normalisers are the caller's global counts
    lib = aggregate(values_g, mask, mode, n_tok, n_seq, max_response_len=10)
    ref = ref_aggregate(values, mask, mode, n_tok, n_seq, 10)
    close(lib, ref)
    (g_lib,) = torch.autograd.grad(lib, values_g)
    (g_ref,) = torch.autograd.grad(ref, values)
    close(g_lib, g_ref)
    assert (g_lib[~mask] == 0).all()


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_is_micro_batch_invariant(mode):
    values, mask = make_batch(nb=9, nr=6, seed=70)
    n_tok, n_seq = mask.sum(), values.shape[0]
    full = aggregate(values, mask, mode, n_tok, n_seq, max_response_len=6)
    (g_full,) = torch.autograd.grad(full, values)
    for bounds in ([0, 1, 4, 9], [0, 5, 9], [0, 2, 3, 6, 8, 9]):
        total, local = 0.0, 0.0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            # Each micro-batch is padded only to its own longest response, as a collator would do.
            width = max(1, int(mask[lo:hi].sum(-1).max()))
            v, m = values[lo:hi, :width], mask[lo:hi, :width]
            total = total + aggregate(v, m, mode, n_tok, n_seq, max_response_len=6)
            local = local + aggregate(v, m, mode, m.sum(), hi - lo, max_response_len=6)
        close(total, full)
        (g_split,) = torch.autograd.grad(total, values)
        close(g_split, g_full)
        # Sanity: per-micro-batch normalisation really differs, so the check above can fail.
        assert abs(local.item() - full.item()) > 1e-6


def test_aggregate_errors_and_zero_count():
    values, mask = make_batch()
    with pytest.raises(ValueError, match="max_response_len"):
        aggregate(values, mask, "seq-mean-token-sum-norm", 10, 7)
    with pytest.raises(KeyError, match="seq-mean-token-mean, seq-mean-token-sum-norm, token-mean"):
        aggregate(values, mask, "sum", 10, 7)
    empty = torch.zeros_like(mask)
    assert aggregate(values, empty, "token-mean", 0, 7).item() == 0.0
    assert set(AGGREGATIONS.names()) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}


def test_masked_mean():
    values, mask = make_batch()
    kept = [values[b, r].item() for b in range(values.shape[0]) for r in range(values.shape[1]) if mask[b, r]]
    assert masked_mean(values, mask).item() == pytest.approx(sum(kept) / len(kept))
    per_row = masked_mean(values, mask, dim=-1)
    assert per_row[1].item() == 0.0  # an all-masked row
    assert per_row[0].item() == pytest.approx(values[0].mean().item())


def test_registries_cover_the_documented_names():
    assert DISTILL_MODES.names() == ["full_logits", "sampled_token", "sequence", "topk_logits"]
    assert ADVANTAGE_ESTIMATORS.names() == ["grpo"]


# ---------------------------------------------------------------- per-token and per-entry clips of the distillation


def ref_clipped_divergence(s_log, t_log, alpha, entry_clip):
    """Each support entry's term of the divergence, capped at entry_clip, summed: loop style."""
    m_log = [torch.log((1 - alpha) * torch.exp(s) + alpha * torch.exp(t)) for s, t in zip(s_log, t_log)]
    total = 0.0
    for s, t, m in zip(s_log, t_log, m_log):
        if alpha == 0:
            term = torch.exp(t) * (t - s)
        elif alpha == 1:
            term = torch.exp(s) * (s - t)
        else:
            term = (1 - alpha) * torch.exp(s) * (s - m) + alpha * torch.exp(t) * (t - m)
        total = total + torch.clamp(term, max=entry_clip)
    return total


@pytest.mark.parametrize("mode, alpha", [("full_logits", 1.0), ("full_logits", 0.0), ("full_logits", 0.5),
                                         ("topk_logits", 0.5)])
def test_entry_clip_caps_each_vocabulary_term_value_and_gradients(mode, alpha):
    # Sharp random logits, so that some entries' terms exceed the cap and others do not.
    s_logits, t_logits = 3 * rand(B, R, V, seed=11), 3 * rand(B, R, V, seed=12)
    ids = torch.randint(0, V, (B, R), generator=torch.Generator().manual_seed(13))
    clip, k = 0.05, 4

    def ref(s, t):
        t = t.detach()
        rows = []
        for b in range(B):
            row = []
            for r in range(R):
                s_row = [s[b, r, v] for v in range(V)]
                t_row = [t[b, r, v] for v in range(V)]
                if mode == "full_logits":
                    s_log, t_log = ref_log_softmax(s_row, 1.0), ref_log_softmax(t_row, 1.0)
                else:
                    s_log, t_log = ref_topk(s_row, t_row, k, True, 1.0)
                row.append(ref_clipped_divergence(s_log, t_log, alpha, clip))
            rows.append(torch.stack(row))
        return torch.stack(rows)

    lib = lambda s, t: distill_per_token(s, t, ids, mode, alpha, k, True, 1.0, entry_clip=clip)  # noqa: E731
    grads_match(lib, ref, [s_logits, t_logits])
    unclipped = distill_per_token(s_logits, t_logits, ids, mode, alpha, k, True, 1.0)
    clipped = distill_per_token(s_logits, t_logits, ids, mode, alpha, k, True, 1.0, entry_clip=clip)
    assert (clipped < unclipped - 1e-9).any() and (clipped <= unclipped + 1e-12).all()  # the cap bites, never adds


def test_no_entry_clip_is_the_unclipped_loss_bit_for_bit():
    s_logits, t_logits = rand(B, R, V, seed=21), rand(B, R, V, seed=22)
    ids = torch.zeros(B, R, dtype=torch.long)
    for alpha in (0.0, 0.5, 1.0):
        a = distill_per_token(s_logits, t_logits, ids, "full_logits", alpha, 0, False, 1.0)
        b = divergence(torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1), alpha)
        assert torch.equal(a, b)


def test_token_clip_caps_each_token_divergence_in_the_objective_value_and_gradient():
    from sdpo.config import AlgorithmConfig, DistillConfig
    from sdpo.losses.objective import StepCounts, TokenInputs, objective

    gen = torch.Generator().manual_seed(31)
    logp = (-torch.rand(B, R, generator=gen, dtype=F64)).requires_grad_(True)
    distill = (torch.rand(B, R, generator=gen, dtype=F64) * 2).requires_grad_(True)  # per-token divergences >= 0
    mask = torch.rand(B, R, generator=gen) > 0.2
    clip = 1.0
    algo = AlgorithmConfig(grpo_weight=0.0, mix="loss",
                           distill=DistillConfig(mode="full_logits", alpha=1.0, token_clip=clip))
    counts = StepCounts(tokens=float(mask.sum()), seqs=float(B), distill_tokens=float(mask.sum()), distill_seqs=float(B))
    x = TokenInputs(logp_BR=logp, mask_BR=mask, advantages_B=torch.zeros(B, dtype=F64), entropy_BR=torch.zeros(B, R),
                    distill_mask_BR=mask, teacher_logp_BR=logp.detach() - 0.1, distill_BR=distill)
    result = objective(x, counts, algo, max_response_len=R)
    # Brute force: token-mean over the distilled tokens of min(d, clip) (on-policy: IS ratio 1, no sampler).
    total = 0.0
    for b in range(B):
        for r in range(R):
            if mask[b, r]:
                total = total + torch.clamp(distill[b, r], max=clip)
    expected = total / mask.sum()
    close(result.loss, expected, 1e-12)
    grad, = torch.autograd.grad(result.loss, distill)
    want = ((distill.detach() < clip) & mask).to(F64) / mask.sum()
    close(grad, want, 1e-12)
    capped = ((distill.detach() > clip) & mask).sum()
    assert capped > 0
    total_w = result.sums["distill/token_clip_fraction"]
    assert float(total_w[0]) == float(capped) and float(total_w[1]) == float(mask.sum())


def test_clips_are_refused_where_they_would_do_nothing():
    from sdpo.config import ConfigError, DistillConfig

    with pytest.raises(ConfigError, match="advantage_clip"):
        DistillConfig(mode="sampled_token", alpha=1.0, token_clip=1.0)
    with pytest.raises(ConfigError, match="out of range"):
        DistillConfig(mode="full_logits", entry_clip=-1.0)
