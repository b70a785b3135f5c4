"""Teacher kinds (docs/algorithm.md §4): which weights score, how they move, eval mode."""

from __future__ import annotations

import pytest
import torch

from sdpo.batch import build_model_inputs
from sdpo.config import ModelConfig, TeacherConfig
from sdpo.models import load_model, response_hidden_states
from sdpo.teacher import Teacher


@pytest.fixture()
def policy(tiny_path):
    torch.manual_seed(0)
    return load_model(ModelConfig(name_or_path="tiny"), tiny_path)


def inputs():
    return build_model_inputs([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], pad_id=2)


def perturb(model, scale=0.1):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_ema_update_is_the_exact_lerp(policy):
    teacher = Teacher(TeacherConfig(kind="ema", update_rate=0.25), policy)
    before = [p.detach().clone() for p in teacher.model.parameters()]
    perturb(policy)
    teacher.update(policy)
    for old, new, live in zip(before, teacher.model.parameters(), policy.parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * live)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_ema_rate_zero_is_frozen_and_frozen_never_moves(policy):
    for config in (TeacherConfig(kind="ema", update_rate=0.0), TeacherConfig(kind="frozen")):
        teacher = Teacher(config, policy)
        before = [p.detach().clone() for p in teacher.model.parameters()]
        perturb(policy)
        teacher.update(policy)
        for old, new in zip(before, teacher.model.parameters()):
            assert torch.equal(old, new)


def test_live_teacher_scores_with_the_current_weights(policy):
    teacher = Teacher(TeacherConfig(kind="live"), policy)
    assert teacher.model is None
    x = inputs()
    scored = teacher.features(policy, x)
    assert scored.weights == [1.0]
    torch.testing.assert_close(scored.features[0].values_BRX, response_hidden_states(policy, x).detach())
    perturb(policy)
    assert not torch.allclose(teacher.features(policy, x).features[0].values_BRX, scored.features[0].values_BRX)


def test_trust_region_lerps_reference_and_live_logits(policy):
    teacher = Teacher(TeacherConfig(kind="trust_region", trust_region_mix=0.3), policy)
    reference = load_model(ModelConfig(name_or_path="tiny"))  # the initial weights
    perturb(policy)
    x = inputs()
    scored = teacher.features(policy, x)
    assert scored.weights == pytest.approx([0.7, 0.3])
    logits = sum(w * f.head(f.values_BRX) for f, w in zip(scored.features, scored.weights))
    with torch.no_grad():
        expected = 0.7 * reference.lm_head(response_hidden_states(reference, x)) + 0.3 * policy.lm_head(
            response_hidden_states(policy, x)
        )
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_teacher_scores_in_eval_mode_without_grad(tiny_path):
    policy = load_model(ModelConfig(name_or_path="tiny"), tiny_path)
    policy.config.attention_dropout = 0.5
    for layer in policy.model.layers:
        layer.self_attn.attention_dropout = 0.5
    policy.train()
    x = inputs()
    # In train mode dropout makes two forwards differ ...
    assert not torch.allclose(response_hidden_states(policy, x), response_hidden_states(policy, x))
    for kind in ("live", "ema"):
        teacher = Teacher(TeacherConfig(kind=kind), policy)
        a, b = (teacher.features(policy, x).features[0].values_BRX for _ in range(2))
        # ... the teacher's targets do not, they carry no grad, and the policy is left in train mode.
        torch.testing.assert_close(a, b)
        assert not a.requires_grad
        assert policy.training
