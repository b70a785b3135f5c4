"""Full training steps with the tiny model: weights change, the teacher moves as configured, losses are
micro-batch invariant, a non-finite step is skipped, a run leaves its files."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from conftest import TINY_OVERRIDES
from torch.utils._python_dispatch import TorchDispatchMode
from toy_envs import ParityEnv, ParityEnvConfig

from sdpo import SDPOTrainer, load_config
from sdpo.learner import Learner
from sdpo.plan import Block, MicroBatch
from sdpo.losses import aggregate
from sdpo.teacher import NoTeacher, Teacher, reprompt_limit


def make_trainer(tmp_path, *overrides, env=True):
    config = load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", *overrides])
    return SDPOTrainer(config, env=ParityEnv(ParityEnvConfig()) if env else None)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def changed(before, model):
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sdpo_step_changes_weights_and_moves_the_ema_teacher(tmp_path):
    trainer = make_trainer(tmp_path, "algorithm.teacher.kind=ema", "algorithm.teacher.update_rate=0.5")
    policy_before, teacher_before = params(trainer.learner.unwrapped), params(trainer.learner.teacher.model)
    metrics = trainer.training_step().metrics
    assert metrics["teacher/reprompt_fraction"] > 0, "the toy env must give the teacher something to learn from"
    assert metrics["distill/loss"] > 0
    assert changed(policy_before, trainer.learner.unwrapped)
    for t0, t1, p1 in zip(teacher_before, trainer.learner.teacher.model.parameters(), trainer.learner.unwrapped.parameters()):
        torch.testing.assert_close(t1, 0.5 * t0 + 0.5 * p1)
    for key in ("reward/mean", "teacher/success_group_fraction", "teacher/feedback_fraction", "policy/entropy",
                "distill/student_teacher_kl", "optim/grad_norm", "response/length_mean",
                "time/generate", "time/score", "time/teacher_context", "time/teacher_forward", "time/update"):
        assert key in metrics, key


def test_frozen_teacher_stays_put(tmp_path):
    trainer = make_trainer(tmp_path, "algorithm.teacher.kind=frozen")
    teacher_before, policy_before = params(trainer.learner.teacher.model), params(trainer.learner.unwrapped)
    trainer.training_step()
    assert changed(policy_before, trainer.learner.unwrapped)
    assert not changed(teacher_before, trainer.learner.teacher.model)


@pytest.mark.parametrize("kind", ["live", "trust_region"])
def test_live_and_trust_region_teachers_train(tmp_path, kind):
    trainer = make_trainer(tmp_path, f"algorithm.teacher.kind={kind}")
    before = params(trainer.learner.unwrapped)
    metrics = trainer.training_step().metrics
    assert changed(before, trainer.learner.unwrapped)
    assert torch.isfinite(torch.tensor(metrics["distill/loss"]))


def test_grpo_builds_no_teacher_and_learns(tmp_path):
    trainer = make_trainer(tmp_path, "algorithm=grpo")
    assert isinstance(trainer.learner.teacher, NoTeacher)
    before = params(trainer.learner.unwrapped)
    metrics = trainer.training_step().metrics
    assert "distill/loss" not in metrics and "policy/loss" in metrics
    assert changed(before, trainer.learner.unwrapped)


@pytest.mark.parametrize("algorithm", ["sdpo_grpo", "sdpo"])
def test_hybrids_and_several_minibatches_run(tmp_path, algorithm):
    # Two optimizer steps per generation batch: old log-probs are computed and the ratio departs from 1.
    trainer = make_trainer(tmp_path, f"algorithm={algorithm}", "trainer.mini_batch_questions=1")
    scored_by = []  # the models whose log-probs of the sampled tokens the update takes first
    original = trainer.learner.sampled_logprobs
    trainer.learner.sampled_logprobs = lambda model, batch: scored_by.append(model) or original(model, batch)
    result = trainer.training_step()
    assert trainer.learner.scheduler.last_epoch == 2  # two optimizer steps, both applied
    assert scored_by == [trainer.learner.policy] and result.metrics["optim/skipped_steps"] == 0


def loss_gradients(trainer, batch, micro_batch_size):
    trainer.learner.optimizer.zero_grad(set_to_none=True)
    counts = trainer.learner.step_counts(batch)
    from sdpo.losses.objective import MetricSums

    learner = trainer.learner
    for rows in batch.micro_batches(micro_batch_size):
        micro = MicroBatch(rows, Block(rows, shared=False), True, True, share=learner.planner.share_prompts)
        targets = learner.teacher.targets(learner.unwrapped, micro, learner.forward)
        learner.micro_batch_loss(micro, targets, counts, MetricSums()).backward()
        targets.release()
    grads = [p.grad.clone() for p in trainer.dist.trainable]
    trainer.learner.optimizer.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("algorithm", ["sdpo", "grpo", "sdpo_grpo"])
def test_loss_gradient_does_not_depend_on_micro_batch_size(tmp_path, algorithm):
    trainer = make_trainer(tmp_path, f"algorithm={algorithm}", "model.dtype=float32")
    problems = trainer.next_questions()
    batch, problems_B, _ = trainer.collector.collect(problems, trainer.step)
    batch, _ = trainer.teacher_context(batch, problems_B)
    from sdpo.losses import group_advantages

    batch.advantages_B = group_advantages(batch.rewards_B, batch.group_ids_B)
    whole = loss_gradients(trainer, batch, len(batch))
    split = loss_gradients(trainer, batch, 3)
    assert any(g.abs().sum() > 0 for g in whole)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_gradient_skips_the_step_and_the_teacher_update(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "algorithm.teacher.kind=ema")
    original = Learner.micro_batch_loss

    def nan_loss(self, *args):
        return original(self, *args) * float("nan")

    monkeypatch.setattr(Learner, "micro_batch_loss", nan_loss)
    policy_before, teacher_before = params(trainer.learner.unwrapped), params(trainer.learner.teacher.model)
    metrics = trainer.training_step().metrics
    assert metrics["optim/skipped_steps"] == 1
    assert not changed(policy_before, trainer.learner.unwrapped)
    assert not changed(teacher_before, trainer.learner.teacher.model)


def test_train_writes_metrics_config_plot_and_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.total_steps=2", "eval.every=1", "eval.samples_per_question=2",
                           "eval.num_questions=2")
    trainer.train()
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/avg@2" in rows[0] and "eval/pass@2" in rows[-1] and "reward/mean" in rows[-1]
    assert (run / "config.yaml").exists() and (run / "reward_curve.png").stat().st_size > 0
    assert (run / "checkpoints" / "step-000002" / "COMPLETE").exists()
    assert load_config([f"trainer.output_dir={run}"]).trainer.output_dir == str(run)


def test_aggregate_is_the_normaliser_the_trainer_uses():
    # The trainer passes global counts: summing micro-batch contributions gives the step's token mean.
    values, mask = torch.arange(6.0).reshape(2, 3), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    total = sum(aggregate(values[i : i + 1], mask[i : i + 1], "token-mean", num_tokens=5, num_seqs=2) for i in range(2))
    assert total == pytest.approx((0 + 1 + 3 + 4 + 5) / 5)


def test_hf_engine_greedy_with_several_samples_repeats_the_greedy_answer(tmp_path):
    from sdpo.rollout import SamplingSettings

    trainer = make_trainer(tmp_path)
    prompts = [trainer.collector.prompt_ids(p) for p in trainer.train_problems[:2]]
    completions = trainer.engine.generate(prompts, SamplingSettings(n=3, temperature=0.0, max_new_tokens=5))
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1]
    assert completions[0].token_ids == completions[1].token_ids == completions[2].token_ids
    single = trainer.engine.generate(prompts[:1], SamplingSettings(n=1, temperature=0.0, max_new_tokens=5))
    assert single[0].token_ids == completions[0].token_ids


def float64_step_inputs(tmp_path, *overrides):
    """A trainer with a float64 policy (and teacher) and one generation batch ready for its update."""
    return step_inputs(tmp_path, *overrides, double=True)


def step_inputs(tmp_path, *overrides, double=False):
    """A trainer (its policy and teacher in float64 with `double`) and one generation batch ready for its update."""
    trainer = make_trainer(tmp_path, "model.dtype=float32", "rollout.max_new_tokens=12", *overrides)
    if double:
        trainer.learner.unwrapped.double()
        if isinstance(trainer.learner.teacher, Teacher):
            trainer.learner.teacher.model.double()
    batch, problems_B, _ = trainer.collector.collect(trainer.next_questions(), trainer.step)
    # The random-init model never stops early: give the responses the ragged lengths real rollouts have (the
    # rewards read the text, which is kept).
    batch.response_ids = [r[: 2 + (5 * i) % 11] for i, r in enumerate(batch.response_ids)]
    batch, _ = trainer.teacher_context(batch, problems_B)
    from sdpo.losses import group_advantages

    batch.advantages_B = group_advantages(batch.rewards_B, batch.group_ids_B)
    return trainer, batch


def step_gradients(trainer, batch, **variants) -> dict[str, list[torch.Tensor]]:
    """The gradient of one optimizer step on `batch` (nothing applied) for each variant: name -> trainer attributes."""
    grads = {}
    for label, attributes in variants.items():
        for name, value in attributes.items():  # the planner's settings, or the learner's
            setattr(trainer.learner.planner if hasattr(trainer.learner.planner, name) else trainer.learner, name, value)

        def optimizer_step(label=label):  # record the step's gradient, apply nothing
            grads[label] = [p.grad.clone() for p in trainer.dist.trainable]
            trainer.learner.optimizer.zero_grad(set_to_none=True)
            return False, 0.0

        trainer.dist.optimizer_step = optimizer_step
        trainer.learner.update(batch, trainer.step)
    return grads


@pytest.mark.parametrize("algorithm", ["sdpo", "sdpo_grpo"])
def test_length_sorted_micro_batches_give_the_same_loss_gradient(tmp_path, algorithm):
    # The update cuts micro-batches from the mini-batch ordered by length (less padding); in float64 the gradient
    # must be that of the unsorted micro-batches up to rounding.
    trainer, batch = float64_step_inputs(tmp_path, f"algorithm={algorithm}")
    trainer.learner.planner.share_prompts = False  # one forward per row: shared prompts round differently (tested below)
    ordered = batch.by_length()
    lengths = [len(r) for r in ordered.response_ids]
    assert lengths == sorted(lengths) and sorted(ordered.problem_ids) == sorted(batch.problem_ids)
    assert [len(r) for r in batch.response_ids] != lengths, "the rollouts must come unsorted for the test to mean anything"
    unsorted = loss_gradients(trainer, batch, 3)
    by_length = loss_gradients(trainer, ordered, 3)
    assert any(g.abs().sum() > 0 for g in unsorted)
    for a, b in zip(unsorted, by_length):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("algorithm", ["sdpo", "sdpo_grpo", "grpo"])
def test_shared_prompts_give_the_update_the_same_gradient(tmp_path, algorithm):
    # trainer.learner.planner.share_prompts: an optimizer step's 4 prompts run in blocks of at most 3 (sdpo.models.PromptPass),
    # each for micro-batches of 3 (so a group's rollouts straddle micro-batches, and the earlier ones' prompt
    # gradient reaches the weights through the block's last backward). In float64 the gradient must be that of one
    # forward per row.
    trainer, batch = float64_step_inputs(tmp_path, f"algorithm={algorithm}", "trainer.micro_batch_size=3",
                                         "trainer.questions_per_step=4", "trainer.mini_batch_questions=4")
    assert trainer.learner.planner.share_prompts and [len(block) for block in batch.prompt_blocks(3)] == [12, 4]
    reprompt_passes = []  # the teacher's: its blocks' distinct reprompts once (no gradient)
    teacher = trainer.learner.teacher
    original = getattr(teacher, "_prompt_passes", lambda *args, **kwargs: None)
    teacher._prompt_passes = lambda *args, **kwargs: reprompt_passes.append(original(*args, **kwargs)) or reprompt_passes[-1]
    grads = step_gradients(trainer, batch, **{"per row": {"share_prompts": False}, "shared": {"share_prompts": True}})
    assert any(g.abs().sum() > 0 for g in grads["per row"])
    assert isinstance(trainer.learner.teacher, Teacher) == any(p is not None for p in reprompt_passes)
    # The chat template's system turn opens every prompt and reprompt: the passes run it once.
    assert all(p[0].prompts.common > 0 for p in reprompt_passes if p is not None)
    for a, b in zip(grads["per row"], grads["shared"], strict=True):
        assert a.dtype == torch.float64
        # float32 rounding only: transformers' RMSNorm computes in float32 (tests/test_shared_prompts.py).
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * a.abs().max())


@pytest.mark.parametrize("overrides", [["algorithm=grpo"], ["algorithm=sdpo_grpo"],
                                       ["algorithm=sdpo_grpo", "algorithm.teacher.kind=live"]])
def test_weights_cast_once_per_step_give_the_same_gradient(tmp_path, overrides):
    # trainer.learner.cast_weights_once: one autocast region per optimizer step keeps autocast's bfloat16 casts of the policy's
    # weights for all the step's forwards. The gradient must be the one of a region per forward, also when a live
    # teacher's no-grad forward casts the same weights first (a cast cached without gradient history would cut the
    # weights off the student's graph). Not bit for bit: where one backward reaches a weight's shared cast twice
    # (a block's prompt pass and its last micro-batch), autograd sums the two bfloat16 gradients in bfloat16 before
    # the float32 accumulation, one extra rounding (~2^-9 relative); a lost contribution would be far larger.
    trainer, batch = step_inputs(tmp_path, "model.autocast_dtype=bfloat16", "trainer.micro_batch_size=3", *overrides)
    assert trainer.learner.cast_weights_once and trainer.learner.autocast_dtype == torch.bfloat16
    grads = step_gradients(trainer, batch, per_forward={"cast_weights_once": False}, per_step={"cast_weights_once": True})
    assert all(g is not None for g in grads["per_step"]) and any(g.abs().sum() > 0 for g in grads["per_step"])
    errors = [(b - a).norm() / a.norm() for a, b in zip(grads["per_forward"], grads["per_step"], strict=True) if a.norm() > 0]
    assert max(errors) < 2e-2  # measured: 0.25% at most, 0.11% median


class WeightCasts(TorchDispatchMode):
    """Counts autocast's float32 -> bfloat16 casts per source tensor (by storage address)."""

    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter[int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 and kwargs.get("dtype") == torch.bfloat16:
            self.count[args[0].data_ptr()] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("overrides", [["algorithm=grpo"], ["algorithm=sdpo_grpo"],
                                       ["algorithm=sdpo_grpo", "algorithm.teacher.kind=live"],
                                       ["algorithm=sdpo_grpo", "algorithm.teacher.kind=trust_region"]])
def test_a_step_casts_each_weight_once(tmp_path, overrides):
    # One autocast region per optimizer step: every weight of the policy and of the teacher's own copy (EMA or
    # initial; on a CPU) is cast to bfloat16 once, however many forwards the step runs (a prompt pass, micro-batches
    # of 3, the teacher's reprompt pass and forwards, the heads per logits chunk); with a region per forward, the
    # tied output head is cast in each.
    trainer, batch = step_inputs(tmp_path, "model.autocast_dtype=bfloat16", "trainer.micro_batch_size=3", *overrides)
    copy = trainer.learner.teacher.model  # EMA or initial weights, else None
    models = [trainer.learner.unwrapped] + ([copy] if copy is not None else [])
    assert len(models) == (1 if overrides[-1] in ("algorithm=grpo", "algorithm.teacher.kind=live") else 2)
    heads = [m.get_output_embeddings().weight.data_ptr() for m in models]
    weights = [p.data_ptr() for m in models for p in m.parameters()]
    for once in (False, True):
        trainer.learner.cast_weights_once = once
        with WeightCasts() as casts:
            trainer.learner.update(batch, trainer.step)
        if once:
            assert all(casts.count[h] == 1 for h in heads) and max(casts.count[w] for w in weights) == 1
            assert sum(casts.count[w] for w in weights) > 2 * len(models)  # the linear layers' weights, not the norms'
        else:
            assert all(casts.count[h] > 1 for h in heads)
        # the teacher copy's gradient flag is the step's only: it stays frozen, and no gradient ever reaches it
        assert not any(p.requires_grad or p.grad is not None for m in models[1:] for p in m.parameters())


def test_adamw_runs_fused_in_one_process(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.learner.optimizer.optimizer.defaults["fused"]
    before = params(trainer.learner.unwrapped)
    trainer.training_step()
    assert changed(before, trainer.learner.unwrapped)


def test_reprompts_stay_within_the_model_window(tmp_path):
    """algorithm.reprompt.max_reprompt_len (the paper's 10240) is capped at the model's window minus the response
    limit, for the trainer's teacher and for the engine that scores reprompts: vLLM refuses a max_model_len past
    max_position_embeddings (scorer=engine failed to start on SmolLM2, window 8192)."""
    trainer = make_trainer(tmp_path, "algorithm=sdpo", "algorithm.reprompt.max_reprompt_len=10240")
    window = trainer.learner.unwrapped.config.max_position_embeddings
    assert trainer.learner.teacher.reprompt_len == window - trainer.config.rollout.max_new_tokens < 10240
    trainer.config.algorithm.reprompt.max_reprompt_len = 96  # below the window: the configured limit holds
    assert reprompt_limit(trainer.config, trainer.learner.unwrapped) == 96
    trainer.learner.teacher.reprompt_len = 96
    batch, problems_B, _ = trainer.collector.collect(trainer.next_questions(), trainer.step)
    batch, _ = trainer.teacher_context(batch, problems_B)
    assert all(len(ids) <= 96 for ids in batch.teacher_prompt_ids)
