"""chunked_response_terms (the memory-bounded fast path) against the plain whole-sequence computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdpo.losses import chunked_response_terms, distill_per_token, entropy_from_logits, token_logprobs

F64 = torch.float64
B, R, H, V = 2, 7, 5, 11
TEMPERATURE = 0.8
MIX = 0.3  # trust-region teacher: lerp(ref_logits, live_logits, MIX)

DISTILL = [
    {"mode": "full_logits", "alpha": 0.5, "topk": 0, "tail": False},
    {"mode": "topk_logits", "alpha": 1.0, "topk": 4, "tail": True},
    {"mode": "topk_logits", "alpha": 0.0, "topk": 4, "tail": False},
    {"mode": "sampled_token", "alpha": 1.0, "topk": 0, "tail": False},
]


def setup(seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(H, V, bias=True).double()
    ref_head = nn.Linear(H, V, bias=False).double()
    hidden = torch.randn(B, R, H, dtype=F64, requires_grad=True)
    ref_hidden = torch.randn(B, R, H, dtype=F64)
    live_hidden = torch.randn(B, R, H, dtype=F64)  # the live policy under the teacher's context
    ids = torch.randint(0, V, (B, R))
    return head, ref_head, hidden, ref_hidden, live_hidden, ids


def direct(head, ref_head, hidden, ref_hidden, live_hidden, ids, distill_kwargs):
    """Whole-sequence computation: [B, R, V] logits of student and teacher at once."""
    logits = head(hidden)
    teacher_logits = ((1 - MIX) * ref_head(ref_hidden) + MIX * head(live_hidden)).detach()
    return {
        "logp": token_logprobs(logits, ids, TEMPERATURE),
        "entropy": entropy_from_logits(logits, TEMPERATURE).detach(),
        "teacher_logp": token_logprobs(teacher_logits, ids, TEMPERATURE),
        "distill": distill_per_token(logits, teacher_logits, ids, temperature=TEMPERATURE, **distill_kwargs),
    }


def chunked(head, ref_head, hidden, ref_hidden, live_hidden, ids, distill_kwargs, chunk_size):
    return chunked_response_terms(
        hidden, head, ids, TEMPERATURE, chunk_size,
        teacher_features=[ref_hidden, live_hidden], teacher_heads=[ref_head, head],
        teacher_weights=[1 - MIX, MIX], distill_kwargs=distill_kwargs)


def loss_and_grads(out, head, hidden, seed=1):
    g = torch.Generator().manual_seed(seed)
    w_logp, w_distill = torch.rand(B, R, generator=g, dtype=F64), torch.rand(B, R, generator=g, dtype=F64)
    loss = (out["logp"] * w_logp).sum() + (out["distill"] * w_distill).sum()
    return torch.autograd.grad(loss, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("distill_kwargs", DISTILL, ids=lambda d: f"{d['mode']}-{d['alpha']}-{d['tail']}")
@pytest.mark.parametrize("chunk_size", [1, 3, R])
def test_chunked_equals_direct_values_and_gradients(distill_kwargs, chunk_size):
    head, ref_head, hidden, ref_hidden, live_hidden, ids = setup()
    expected = direct(head, ref_head, hidden, ref_hidden, live_hidden, ids, distill_kwargs)
    got = chunked(head, ref_head, hidden, ref_hidden, live_hidden, ids, distill_kwargs, chunk_size)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12)
    assert got["logp"].requires_grad and got["distill"].requires_grad
    assert not got["entropy"].requires_grad and not got["teacher_logp"].requires_grad
    grads_expected = loss_and_grads(expected, head, hidden)
    grads_got = loss_and_grads(got, head, hidden)
    for g_got, g_exp in zip(grads_got, grads_expected):
        assert g_exp.abs().max() > 1e-6
        torch.testing.assert_close(g_got, g_exp, rtol=1e-12, atol=1e-12)


def test_chunked_without_distill_kwargs_and_without_teacher():
    head, ref_head, hidden, ref_hidden, live_hidden, ids = setup(seed=2)
    expected = direct(head, ref_head, hidden, ref_hidden, live_hidden, ids, DISTILL[0])
    got = chunked(head, ref_head, hidden, ref_hidden, live_hidden, ids, None, 2)
    assert set(got) == {"logp", "entropy", "teacher_logp"}
    torch.testing.assert_close(got["teacher_logp"], expected["teacher_logp"])
    student_only = chunked_response_terms(hidden, head, ids, TEMPERATURE, 4)
    assert set(student_only) == {"logp", "entropy"}
    torch.testing.assert_close(student_only["logp"], expected["logp"])
    with torch.no_grad():
        no_grad = chunked_response_terms(hidden, head, ids, TEMPERATURE, 3)
    torch.testing.assert_close(no_grad["logp"], expected["logp"].detach())
    with pytest.raises(ValueError, match="temperature"):
        chunked(head, ref_head, hidden, ref_hidden, live_hidden, ids, {**DISTILL[0], "temperature": 1.0}, 2)


def max_saved_numel(fn):
    """Largest tensor autograd keeps for backward while fn() runs (outside any checkpointed region)."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_chunked_never_keeps_whole_sequence_logits_for_backward():
    head, ref_head, hidden, ref_hidden, live_hidden, ids = setup(seed=3)
    full_logits = B * R * V
    kwargs = DISTILL[0]
    direct_saved = max_saved_numel(lambda: direct(head, ref_head, hidden, ref_hidden, live_hidden, ids, kwargs))
    chunked_saved = max_saved_numel(lambda: chunked(head, ref_head, hidden, ref_hidden, live_hidden, ids, kwargs, 2))
    assert direct_saved >= full_logits  # the check below can fail: the plain path does keep [B, R, V] tensors
    assert chunked_saved < B * 2 * V  # only chunk inputs (hidden slices), no logits at all


@pytest.mark.parametrize("distill_kwargs", DISTILL, ids=lambda d: f"{d['mode']}-{d['alpha']}-{d['tail']}")
@pytest.mark.parametrize("chunk_size", [3, R])
def test_teacher_rows_equal_the_whole_batch_on_those_rows_and_zeros_elsewhere(distill_kwargs, chunk_size):
    # The trainer passes the teacher features of the rows with a signal only (`teacher_rows`): their values and
    # gradients must be the whole-batch ones, the other rows' teacher terms zeros.
    head, ref_head, hidden, ref_hidden, live_hidden, ids = setup(seed=3)
    rows = torch.tensor([1])
    keep = torch.zeros(B, 1, dtype=F64)
    keep[rows] = 1.0
    expected = direct(head, ref_head, hidden, ref_hidden, live_hidden, ids, distill_kwargs)
    expected["teacher_logp"] = expected["teacher_logp"] * keep
    expected["distill"] = expected["distill"] * keep
    got = chunked_response_terms(
        hidden, head, ids, TEMPERATURE, chunk_size, teacher_features=[ref_hidden[rows], live_hidden[rows]],
        teacher_heads=[ref_head, head], teacher_weights=[1 - MIX, MIX], distill_kwargs=distill_kwargs,
        teacher_rows=rows)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12)
    for g_got, g_exp in zip(loss_and_grads(got, head, hidden), loss_and_grads(expected, head, hidden)):
        torch.testing.assert_close(g_got, g_exp, rtol=1e-12, atol=1e-12)
