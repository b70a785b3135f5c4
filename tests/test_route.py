"""SRPO's routing mix (`algorithm.mix=route`, docs/algorithm.md §12) against a brute-force float64 reference, token by
token: which rows are distilled, the shared normaliser, the entropy-aware weights; the loss and its gradients. Also
the teacher's entropy from the chunked vocabulary projection, and the config's refusals."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo.config import AlgorithmConfig, ConfigError, DistillConfig, TeacherConfig
from sdpo.losses import MIXES, chunked_response_terms, entropy_from_logits
from sdpo.losses.objective import StepCounts, TokenInputs, objective

B, R = 6, 7
SAMPLED = DistillConfig(mode="sampled_token", alpha=1.0)


def random_inputs(seed: int, *, logit_level: bool, off_policy: bool):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    logp = (-randn(B, R).abs() - 0.1).requires_grad_(True)
    mask = torch.rand(B, R, generator=gen) < 0.8
    mask[:, 0] = True
    rewards = (torch.rand(B, generator=gen) < 0.5).double()
    rewards[0], rewards[1] = 1.0, 0.0  # both branches are present
    signal = torch.rand(B, generator=gen) < 0.8
    signal[1] = True
    # The trainer's routing (sdpo/trainer.py): distil the failed rows with a signal.
    routed_B = MIXES.get("route").distilled_rows(signal, rewards >= 1.0)
    x = dict(logp_BR=logp, mask_BR=mask, advantages_B=rewards - rewards.mean(), entropy_BR=randn(B, R).abs(),
             distill_mask_BR=mask & routed_B[:, None], teacher_logp_BR=logp.detach() + randn(B, R, scale=2.0),
             # Entropies of a large vocabulary: exp(-H) spans orders of magnitude, so the weights matter.
             teacher_entropy_BR=randn(B, R).abs() * 2.0)
    if off_policy:  # the PPO clip and the distillation IS cap act
        x["old_logp_BR"] = logp.detach() + randn(B, R, scale=0.5)
        x["sampler_logp_BR"] = logp.detach() + randn(B, R, scale=0.8)
    if logit_level:
        x["distill_BR"] = randn(B, R).abs().requires_grad_(True)
    return x


def brute_force(x: dict, algo: AlgorithmConfig) -> torch.Tensor:
    """docs/algorithm.md §12 summed token by token: (sum over GRPO tokens of the clipped PG loss + sum over distilled
    tokens of w * the distillation loss) / (all tokens), w = exp(-beta H) / its mean over the distilled tokens;
    `seq-mean-token-mean`: each row's mean over its tokens, then the mean over rows."""
    pol, dis = algo.policy, algo.distill
    beta = dis.entropy_beta
    distilled = [(b, t) for b in range(B) for t in range(R) if x["distill_mask_BR"][b, t]]
    mean_raw = 1.0
    if beta is not None:
        mean_raw = sum(math.exp(-beta * float(x["teacher_entropy_BR"][b, t])) for b, t in distilled) / len(distilled)
    row_sums = [0.0] * B
    for b in range(B):
        for t in range(R):
            if not x["mask_BR"][b, t]:
                continue
            s = x["logp_BR"][b, t]
            s0 = float(s.detach())
            old = float(x["old_logp_BR"][b, t]) if "old_logp_BR" in x else s0
            tis = min(math.exp(old - float(x["sampler_logp_BR"][b, t])), algo.tis_threshold) if "sampler_logp_BR" in x else 1.0
            if (b, t) in distilled:
                gap = float(x["teacher_logp_BR"][b, t]) - s0
                per_token = x["distill_BR"][b, t] if "distill_BR" in x else -gap * s
                w = math.exp(-beta * float(x["teacher_entropy_BR"][b, t])) / mean_raw if beta is not None else 1.0
                is_weight = min(math.exp(max(-20.0, min(20.0, s0 - old))), dis.is_clip)
                term = w * per_token * is_weight * tis
            else:
                adv = float(x["advantages_B"][b])
                ratio = torch.exp(s - old)
                clipped = torch.clamp(ratio, 1 - pol.clip_eps_low, 1 + pol.clip_eps_high)
                term = -torch.minimum(ratio * adv, clipped * adv) * tis
            row_sums[b] = row_sums[b] + term
    loss = 0.0 * x["logp_BR"].sum()
    if algo.loss_agg_mode == "token-mean":
        return loss + sum(row_sums) / int(x["mask_BR"].sum())
    assert algo.loss_agg_mode == "seq-mean-token-mean"
    return loss + sum(row_sums[b] / int(x["mask_BR"][b].sum()) for b in range(B)) / B


def counts_of(x: dict) -> StepCounts:
    distill = x["distill_mask_BR"]
    return StepCounts(tokens=float(x["mask_BR"].sum()), seqs=float(B), distill_tokens=float(distill.sum()),
                      distill_seqs=float(distill.any(-1).sum()))


CASES = {
    "sampled_token": (AlgorithmConfig(mix="route", distill=SAMPLED), dict(logit_level=False, off_policy=False)),
    "topk_off_policy": (AlgorithmConfig(mix="route"), dict(logit_level=True, off_policy=True)),
    "entropy_weighted_topk": (AlgorithmConfig(mix="route", distill=DistillConfig(entropy_beta=1.0)),
                              dict(logit_level=True, off_policy=True)),
    "entropy_weighted_sampled": (AlgorithmConfig(mix="route", distill=DistillConfig(mode="sampled_token", alpha=1.0,
                                                                                    entropy_beta=0.5)),
                                 dict(logit_level=False, off_policy=True)),
    "entropy_weighted_seq_mean": (AlgorithmConfig(mix="route", loss_agg_mode="seq-mean-token-mean",
                                                  distill=DistillConfig(entropy_beta=1.0)),
                                  dict(logit_level=True, off_policy=False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_matches_brute_force_loss_and_gradients(case, seed):
    algo, flags = CASES[case]
    x = random_inputs(seed, **flags)
    result = objective(TokenInputs(**x), counts_of(x), algo, max_response_len=R)
    expected = brute_force(x, algo)
    torch.testing.assert_close(result.loss, expected, rtol=1e-10, atol=1e-12)
    leaves = [x["logp_BR"]] + ([x["distill_BR"]] if "distill_BR" in x else [])
    got = torch.autograd.grad(result.loss, leaves, retain_graph=True)
    want = torch.autograd.grad(expected, leaves)
    for g, w in zip(got, want, strict=True):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert "distill/loss" in result.sums and "policy/loss" in result.sums


def test_each_routed_row_takes_one_signal_and_the_weights_act():
    """A distilled row's gradient does not depend on its GRPO advantage, a GRPO row's does not depend on the teacher;
    and the entropy weights change the loss (so the weighted cases above could fail)."""
    x = random_inputs(0, logit_level=False, off_policy=False)
    algo = AlgorithmConfig(mix="route", distill=SAMPLED)
    distilled_B = x["distill_mask_BR"].any(-1)
    assert distilled_B.any() and (~distilled_B).any()

    def grad(inputs):
        return torch.autograd.grad(objective(TokenInputs(**inputs), counts_of(inputs), algo, R).loss, inputs["logp_BR"])[0]

    base = grad(x)
    other_adv = dict(x, advantages_B=x["advantages_B"] + 3.0)
    other_teacher = dict(x, teacher_logp_BR=x["teacher_logp_BR"] - 1.0)
    torch.testing.assert_close(grad(other_adv)[distilled_B], base[distilled_B])
    assert not torch.allclose(grad(other_adv)[~distilled_B], base[~distilled_B])
    torch.testing.assert_close(grad(other_teacher)[~distilled_B], base[~distilled_B])
    assert not torch.allclose(grad(other_teacher)[distilled_B], base[distilled_B])
    weighted = AlgorithmConfig(mix="route", distill=DistillConfig(mode="sampled_token", alpha=1.0, entropy_beta=1.0))
    assert not torch.allclose(objective(TokenInputs(**x), counts_of(x), weighted, R).loss,
                              objective(TokenInputs(**x), counts_of(x), algo, R).loss)


def test_routing_distils_failed_rows_with_a_signal_only():
    signal = torch.tensor([True, True, False, False])
    success = torch.tensor([True, False, True, False])
    assert MIXES.get("route").distilled_rows(signal, success).tolist() == [False, True, False, False]
    assert MIXES.get("loss").distilled_rows(signal, success).tolist() == signal.tolist()


def test_chunked_terms_give_the_teachers_entropy_on_its_rows():
    gen = torch.Generator().manual_seed(0)
    V, H, T = 11, 5, 1.3
    head = torch.nn.Linear(H, V, dtype=torch.float64)
    student = torch.randn(3, 6, H, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 6, H, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, V, (3, 6), generator=gen)
    rows = torch.tensor([0, 2])
    terms = chunked_response_terms(student, head, ids, T, 4, teacher_features=[teacher], teacher_heads=[head],
                                   teacher_weights=[1.0], teacher_rows=rows, teacher_entropy=True)
    with torch.no_grad():
        want = entropy_from_logits(head(teacher), T)
    torch.testing.assert_close(terms["teacher_entropy"][rows], want)
    assert terms["teacher_entropy"][1].abs().sum() == 0
    assert "teacher_entropy" not in chunked_response_terms(student, head, ids, T, 4, teacher_features=[teacher],
                                                           teacher_heads=[head], teacher_weights=[1.0], teacher_rows=rows)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(mix="route", grpo_weight=0.9), "has no GRPO weight: remove algorithm.grpo_weight=0.9"),
    (dict(mix="advantage", grpo_weight=0.9, distill=DistillConfig(mode="sampled_token", alpha=1.0, entropy_beta=1.0)),
     "weights a distillation loss term"),
    (dict(mix="route", distill=DistillConfig(mode="sampled_token", alpha=1.0, entropy_beta=1.0),
          teacher=TeacherConfig(kind="live", scorer="engine")), "algorithm.teacher.scorer=trainer"),
])
def test_route_and_entropy_weighting_refuse_what_cannot_act(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AlgorithmConfig(**kwargs)
    with pytest.raises(ConfigError, match="entropy_beta"):
        DistillConfig(entropy_beta=-1.0)


@pytest.mark.slow
def test_srpo_preset_routes_the_batch_in_a_training_step(tmp_path):
    """algorithm=srpo end to end on the tiny model: only failed rows with a signal are distilled (and scored by the
    teacher), the weighting sees the teacher's entropy, and the step moves the weights."""
    from test_presets import SMALL

    from sdpo import SDPOTrainer, load_config

    config = load_config(["algorithm=srpo", "env.feedback=true", *SMALL, "rollout.num_generations=4",
                          "trainer.questions_per_step=2", "trainer.mini_batch_questions=2",
                          f"trainer.output_dir={tmp_path / 'run'}"])
    trainer = SDPOTrainer(config)
    try:
        result = trainer.training_step()
        batch = result.batch
        success_B = batch.rewards_B >= config.algorithm.reprompt.success_reward_threshold
        assert not (batch.distill_mask_B & success_B).any()
        assert batch.distill_mask_B.any(), "the tiny model's feedback gives failed rows a signal"
        assert "distill/teacher_entropy" in result.metrics and "policy/loss" in result.metrics
        assert result.metrics["optim/skipped_steps"] == 0
    finally:
        trainer.engine.close()
        trainer.run.tracker.close()
