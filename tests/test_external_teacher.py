"""Teachers beyond the self (docs/algorithm.md §11): a teacher model of its own, checked against the policy's
tokenizer, with or without the reprompt, several routed by a data column, and the `algorithm=opd` preset."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_OVERRIDES
from toy_envs import ParityEnv, ParityEnvConfig
from transformers import LlamaConfig, LlamaForCausalLM

from sdpo import SDPOTrainer, load_config
from sdpo.config import ConfigError, ModelConfig, TeacherConfig
from sdpo.envs.base import Problem
from sdpo.losses import DISTILL_MODES, chunked_response_terms, group_advantages
from sdpo.models import load_model, load_tokenizer, response_logprobs
from sdpo.plan import Block, MicroBatch
from sdpo.teacher import Teacher, TeacherRouter
from sdpo.teacher.external import teacher_dir


def save_copy(folder, model, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def initial_copy(tmp_path, tiny_path, tokenizer):
    """The tiny policy's initial weights saved as a model folder of their own."""
    return save_copy(tmp_path / "teacher", load_model(ModelConfig(name_or_path="tiny"), tiny_path), tokenizer)


def other_teacher(folder, tokenizer, seed=1, hidden=96):
    """A random teacher of another width sharing the tiny policy's tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return save_copy(folder, LlamaForCausalLM(config), tokenizer)


def make_trainer(tmp_path, *overrides):
    """The tiny trainer on the parity toy env, or on the config's env where `overrides` name one."""
    config = load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", "model.dtype=float32",
                          "rollout.max_new_tokens=12", *overrides])
    own_env = any(o.startswith("env=") for o in overrides)
    return SDPOTrainer(config, env=None if own_env else ParityEnv(ParityEnvConfig()))


def context_and_advantages(trainer, batch, problems_B):
    batch, _ = trainer.teacher_context(batch, problems_B)
    return batch.with_advantages(group_advantages(batch.rewards_B, batch.group_ids_B))


def step_gradient(trainer, batch):
    """The gradient and metrics of one update on `batch`, nothing applied."""
    grads = {}

    def optimizer_step():
        grads["step"] = [p.grad.clone() for p in trainer.dist.trainable]
        trainer.learner.optimizer.zero_grad(set_to_none=True)
        return False, 0.0

    trainer.dist.optimizer_step = optimizer_step
    metrics = trainer.learner.update(batch, trainer.step)
    return grads["step"], metrics


def mode_overrides(mode):
    alpha = [] if DISTILL_MODES.get(mode).needs_logits else ["algorithm.distill.alpha=1.0"]
    return [f"algorithm.distill.mode={mode}", *alpha]


@pytest.mark.parametrize("context", ["reprompt", "none"])
@pytest.mark.parametrize("mode", DISTILL_MODES.in_order())
def test_an_external_copy_of_the_initial_weights_is_the_frozen_self_teacher(tmp_path, initial_copy, mode, context):
    """Loss and gradient of one update equal, bit for bit, for every distillation mode, with and without the
    reprompt."""
    frozen = make_trainer(tmp_path / "frozen", "algorithm.teacher.kind=frozen", f"algorithm.teacher.context={context}",
                          *mode_overrides(mode))
    external = make_trainer(tmp_path / "external", "algorithm.teacher.kind=external",
                            f"algorithm.teacher.model={initial_copy}", f"algorithm.teacher.context={context}",
                            *mode_overrides(mode))
    assert external.learner.teacher.model is not frozen.learner.teacher.model
    for trainer in (frozen, external):  # the same step away from the teacher (without it, context=none has no gap)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in trainer.learner.unwrapped.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    batch, problems_B, _ = frozen.collector.collect(frozen.next_questions(), frozen.step)
    # Ragged responses, as real rollouts have (the random-init model never stops early).
    batch.response_ids = [r[: 2 + (5 * i) % 11] for i, r in enumerate(batch.response_ids)]
    ours, theirs = (context_and_advantages(t, batch, problems_B) for t in (frozen, external))
    assert ours.teacher_prompt_ids == theirs.teacher_prompt_ids
    assert torch.equal(ours.distill_mask_B, theirs.distill_mask_B)
    if context == "none":  # every row distilled, under its own prompt
        assert bool(ours.distill_mask_B.all()) and ours.teacher_prompt_ids == batch.prompt_ids
    grads_frozen, metrics_frozen = step_gradient(frozen, ours)
    grads_external, metrics_external = step_gradient(external, theirs)
    assert any(g.abs().sum() > 0 for g in grads_frozen)
    assert metrics_external["distill/loss"] == metrics_frozen["distill/loss"]
    assert metrics_external["distill/student_teacher_kl"] == metrics_frozen["distill/student_teacher_kl"]
    for a, b in zip(grads_frozen, grads_external, strict=True):
        assert torch.equal(a, b)


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, tiny_path, tokenizer):
    other = load_tokenizer(tiny_path)
    other.add_tokens(["<teacher_only_token>"])
    folder = save_copy(tmp_path / "other", load_model(ModelConfig(name_or_path="tiny"), tiny_path), other)
    policy = load_model(ModelConfig(name_or_path="tiny"), tiny_path)
    with pytest.raises(ConfigError) as refused:
        Teacher(TeacherConfig(kind="external", model=str(folder)), policy, tokenizer=tokenizer)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"algorithm.teacher.model={folder}: its tokenizer's vocabulary differs from the policy's")
    assert "a teacher must share the policy's tokenizer" in message
    # The same tokenizer over a head of another size: refused too.
    wide = other_teacher(tmp_path / "wide", tokenizer, hidden=64)
    config = LlamaConfig.from_pretrained(wide)
    config.vocab_size += 64
    save_copy(wide, LlamaForCausalLM(config), tokenizer)
    with pytest.raises(ConfigError, match="output head has .* entries, the policy's"):
        Teacher(TeacherConfig(kind="external", model=str(wide)), policy, tokenizer=tokenizer)


def test_the_cli_prints_the_refusal_as_one_line(tmp_path, tiny_path):
    from test_errors import assert_one_line, train

    other = load_tokenizer(tiny_path)
    other.add_tokens(["<teacher_only_token>"])
    folder = save_copy(tmp_path / "other", load_model(ModelConfig(name_or_path="tiny"), tiny_path), other)
    proc = train(tmp_path, "algorithm=opd", f"algorithm.teacher.model={folder}")
    assert_one_line(proc, f"error: algorithm.teacher.model={folder}: its tokenizer's vocabulary differs from the "
                          "policy's (49153 tokens against 49152; e.g. ", exact=False)
    assert proc.stderr.strip().endswith("a teacher must share the policy's tokenizer")


def test_a_teacher_path_is_a_model_folder_or_a_run_directory(tmp_path, initial_copy):
    assert teacher_dir(str(initial_copy), "model") == initial_copy
    run = tmp_path / "run"
    for step in (2, 4):
        folder = run / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "COMPLETE").write_text("")
    (run / "checkpoints" / "step-000006").mkdir()  # killed before its marker: not a checkpoint
    assert teacher_dir(str(run), "model") == run / "checkpoints" / "step-000004"
    with pytest.raises(ConfigError, match="neither a model folder .* nor a run directory"):
        teacher_dir(str(tmp_path / "nothing"), "model")


def test_the_external_teacher_is_configured_explicitly():
    with pytest.raises(ConfigError, match="read by the external teacher only: add algorithm.teacher.kind=external"):
        TeacherConfig(model="/some/where")
    with pytest.raises(ConfigError, match="models and algorithm.teacher.key go together"):
        TeacherConfig(kind="external", models={"a": "/x"})
    with pytest.raises(ConfigError, match="nothing to distill"):
        TeacherConfig(kind="live", context="none")
    with pytest.raises(ConfigError, match=r"algorithm.teacher.context='nothing' is not valid; allowed values: "
                                          r"'reprompt', 'none'"):
        TeacherConfig(context="nothing")
    with pytest.raises(ConfigError, match="needs a teacher model: algorithm.teacher.model=<path>"):
        Teacher(TeacherConfig(kind="external"), torch.nn.Linear(2, 2))


def test_row_values_route_to_the_teachers_named():
    router = TeacherRouter("domain", ["math", "code"])
    rows = [Problem("a", [], {"columns": {"domain": "code"}}), Problem("b", [], {"domain": "math"})]
    assert router.routes(rows).tolist() == [1, 0]
    with pytest.raises(ConfigError, match="problem 'c' has domain='bio', which algorithm.teacher.models does not "
                                          "name \\(it names math, code\\): add a teacher for it"):
        router.routes([Problem("c", [], {"columns": {"domain": "bio"}})])
    with pytest.raises(ConfigError, match="problem 'd' has no such column"):
        router.routes([Problem("d", [], {"columns": {"topic": "x"}})])


def write_rows(path, domains):
    rows = [{"prompt": f"Say something ({i}).", "answer": "yes", "domain": d} for i, d in enumerate(domains)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("context", ["reprompt", "none"])
def test_rows_reach_the_teacher_their_key_names(tmp_path, initial_copy, tokenizer, context):
    """Two teachers of different widths, each row's teacher log-probs are its own teacher's (scored directly)."""
    wide = other_teacher(tmp_path / "wide", tokenizer)
    data = write_rows(tmp_path / "rows.jsonl", ["plain", "wide", "wide", "plain"])
    trainer = make_trainer(tmp_path, "env=dataset", f"env.path={data}", "env.rewards=[exact_match]",
                           "model.autocast_dtype=none", "algorithm.teacher.kind=external", "algorithm.teacher.key=domain",
                           f"+algorithm.teacher.models={{plain: '{initial_copy}', wide: '{wide}'}}",
                           f"algorithm.teacher.context={context}", "trainer.questions_per_step=4",
                           "algorithm.reprompt.include_environment_feedback=false",
                           "algorithm.reprompt.data_context=off", "algorithm.reprompt.success_reward_threshold=0.0")
    batch, problems_B, _ = trainer.collector.collect(trainer.next_questions(), trainer.step)
    batch = context_and_advantages(trainer, batch, problems_B)
    domains = [p.data["columns"]["domain"] for p in problems_B]
    assert batch.teacher_route_B.tolist() == [["plain", "wide"].index(d) for d in domains]
    assert {"plain", "wide"} <= set(domains) and bool(batch.distill_mask_B.all())
    learner = trainer.learner
    micro = MicroBatch(batch, Block(batch, shared=False), True, True, share=learner.planner.share_prompts)
    targets = learner.teacher.targets(learner.unwrapped, micro, learner.forward)
    with torch.no_grad():
        student = learner.unwrapped
        from sdpo.models import response_features

        features = response_features(student, micro.student_inputs(learner.pad_id))
        terms = chunked_response_terms(features.values_BRX, features.head, batch.response_ids_BR, 1.0, 4,
                                       **targets.chunk_kwargs(None))
    teachers = [load_model(ModelConfig(name_or_path=str(f)), f) for f in (initial_copy, wide)]
    for row, domain in enumerate(domains):
        own = teachers[["plain", "wide"].index(domain)]
        expected = response_logprobs(own.eval(), [batch.teacher_prompt_ids[row]], [batch.response_ids[row]],
                                     learner.pad_id, 1.0)
        n = len(batch.response_ids[row])
        torch.testing.assert_close(terms["teacher_logp"][row, :n], expected[0, :n], rtol=1e-5, atol=1e-5)
        other = teachers[1 - ["plain", "wide"].index(domain)]
        elsewhere = response_logprobs(other.eval(), [batch.teacher_prompt_ids[row]], [batch.response_ids[row]],
                                      learner.pad_id, 1.0)
        assert not torch.allclose(terms["teacher_logp"][row, :n], elsewhere[0, :n], atol=1e-3)
    targets.release()
    # An update through both teachers runs (each micro-batch mixes them: micro_batch_size 8 of 16 rows).
    grads, metrics = step_gradient(trainer, batch)
    assert torch.isfinite(torch.tensor(metrics["distill/loss"])) and any(g.abs().sum() > 0 for g in grads)


def test_a_row_whose_key_names_no_teacher_stops_the_run(tmp_path, initial_copy):
    data = write_rows(tmp_path / "rows.jsonl", ["plain", "bio"])
    trainer = make_trainer(tmp_path, "env=dataset", f"env.path={data}", "env.rewards=[exact_match]",
                           "algorithm.teacher.kind=external", "algorithm.teacher.key=domain",
                           f"+algorithm.teacher.models={{plain: '{initial_copy}'}}", "algorithm.teacher.context=none")
    batch, problems_B, _ = trainer.collector.collect(trainer.next_questions(), trainer.step)
    with pytest.raises(ConfigError, match="has domain='bio', which algorithm.teacher.models does not name"):
        trainer.teacher_context(batch, problems_B)


def test_the_opd_preset_distills_every_row_from_the_external_teacher(tmp_path, initial_copy):
    config = load_config(["algorithm=opd", f"algorithm.teacher.model={initial_copy}"])
    algo = config.algorithm
    assert (algo.name, algo.grpo_weight, algo.uses_policy_loss) == ("opd", 0.0, False)
    assert (algo.teacher.kind, algo.teacher.context, algo.distill.alpha) == ("external", "none", 1.0)
    trainer = make_trainer(tmp_path, "algorithm=opd", f"algorithm.teacher.model={initial_copy}",
                           "trainer.total_steps=2")
    before = [p.detach().clone() for p in trainer.learner.unwrapped.parameters()]
    batch, problems_B, _ = trainer.collector.collect(trainer.next_questions(), trainer.step)
    batch, _ = trainer.teacher_context(batch, problems_B)
    assert bool(batch.distill_mask_B.all())  # no success, feedback or data context needed
    metrics = trainer.train()
    assert trainer.step == 2 and torch.isfinite(torch.tensor(metrics["distill/loss"]))
    assert "policy/loss" not in metrics  # no GRPO term
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.learner.unwrapped.parameters()))
    # The teacher never moves.
    teacher = Teacher(TeacherConfig(kind="external", model=str(initial_copy)), trainer.learner.unwrapped,
                      tokenizer=trainer.tokenizer)
    for a, b in zip(teacher.model.parameters(), trainer.learner.teacher.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_teachers_server_is_configured_with_its_limits(initial_copy):
    served = ["algorithm=opd", f"algorithm.teacher.model={initial_copy}", "algorithm.teacher.scorer=server"]
    with pytest.raises(ConfigError, match="scorer=server needs algorithm.distill.mode=sampled_token"):
        load_config(served)
    config = load_config([*served, "algorithm.distill.mode=sampled_token", "algorithm.teacher.server_url=http://h:1"])
    assert (config.algorithm.teacher.scorer, config.algorithm.teacher.server_url) == ("server", "http://h:1")
    with pytest.raises(ConfigError, match="scorer=server serves one external teacher"):
        TeacherConfig(scorer="server")
    with pytest.raises(ConfigError, match="server_url=http://h:1 is read by algorithm.teacher.scorer=server only"):
        TeacherConfig(kind="external", model="/x", server_url="http://h:1")
