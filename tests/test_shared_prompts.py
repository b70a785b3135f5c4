"""Forwards with shared prompts (trainer.learner.planner.share_prompts, sdpo.models.PromptPass): each distinct prompt runs once and
its rollouts' responses on its key/value cache, within a micro-batch or across an optimizer step's micro-batches.
Checked against one forward per row in float64, values and gradients."""

from __future__ import annotations

import pytest
import torch

from sdpo.batch import (Layout, RolloutBatch, SharedPromptInputs, build_model_inputs, build_prompt_inputs,
                        build_shared_prompt_inputs)
from sdpo.models import PromptPass, response_features

# Three distinct prompts of different lengths (left padding), shared by 2, 3 and 1 rows, in mixed order; ragged
# responses, one of them empty.
PROMPTS = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8], [11, 12, 13], [9, 10], [9, 10]]
RESPONSES = [[20, 21, 22], [23], [24, 25, 26, 27, 28], [], [29, 30], [31, 32, 33, 34]]
# The same after a 4-token prefix they all start with (a chat template's system turn), which a pass runs once.
PREFIXED = [[3, 4, 2, 1, *p] for p in PROMPTS]
PROMPT_SETS = pytest.mark.parametrize("prompts", [PROMPTS, PREFIXED], ids=["own", "common-prefix"])


def batch_of(prompts, responses, groups=None) -> RolloutBatch:
    n = len(prompts)
    return RolloutBatch(problem_ids=[str(i) for i in range(n)], prompt_ids=[list(p) for p in prompts],
                        response_ids=[list(r) for r in responses], response_text=[""] * n,
                        group_ids_B=torch.tensor(groups if groups is not None else list(range(n))),
                        truncated_B=torch.zeros(n, dtype=torch.bool))


def logp_and_grads(model, inputs, response_ids_BR, weights_BR):
    model.zero_grad(set_to_none=True)
    features = response_features(model, inputs)
    logp_BR = torch.log_softmax(features.head(features.values_BRX), -1).gather(-1, response_ids_BR[..., None])[..., 0]
    (logp_BR * weights_BR).sum().backward()
    return logp_BR.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_float64(tiny_path, lora: bool):
    from sdpo.config import ModelConfig
    from sdpo.models import load_model

    config = ModelConfig(name_or_path="tiny", dtype="float32")
    config.lora.enabled = lora
    return load_model(config, tiny_path).double()


def compare(model, prompts, responses, shared, grad_rtol):
    batch = batch_of(prompts, responses)
    response_ids_BR, mask_BR = batch.response_ids_BR, batch.response_mask_BR
    weights_BR = torch.randn(mask_BR.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * mask_BR
    plain_logp, plain_grads = logp_and_grads(model, build_model_inputs(prompts, responses, 0), response_ids_BR, weights_BR)
    shared_logp, shared_grads = logp_and_grads(model, shared, response_ids_BR, weights_BR)
    torch.testing.assert_close(shared_logp[mask_BR], plain_logp[mask_BR], rtol=1e-12, atol=1e-12)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    assert any(g.abs().sum() > 0 for g in plain_grads.values())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=grad_rtol, atol=grad_rtol * grad.abs().max(), msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_cached_prompt_forward_is_exact(tiny_path, lora):
    # Every row with a prompt of its own, through the two-forward path: the key/value cache, its row index and the
    # positions are right to float64 rounding.
    model = tiny_float64(tiny_path, lora)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    responses = [[20, 21, 22], [23], []]
    compare(model, prompts, responses, build_shared_prompt_inputs(prompts, responses, 0), grad_rtol=1e-10)


@PROMPT_SETS
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shared_prompts_give_the_values_and_gradients_of_one_forward_per_row(tiny_path, lora, prompts):
    model = tiny_float64(tiny_path, lora)
    shared = batch_of(prompts, RESPONSES).student_inputs(pad_id=0, layout=Layout(share_prompts=True))
    assert isinstance(shared, SharedPromptInputs) and shared.prompts.input_ids.shape[0] == 3
    assert shared.prompts.common == (4 if prompts is PREFIXED else 0)
    # The values agree to float64 rounding; the gradients only to float32 rounding: transformers' RMSNorm computes
    # in float32 even in a float64 model, and a shared prompt's gradient is summed over its rows before that cast.
    compare(model, prompts, RESPONSES, shared, grad_rtol=1e-6)


def test_the_common_prefix_is_laid_out_once_before_the_padding():
    prompts = build_prompt_inputs(PREFIXED, pad_id=0)
    assert prompts.common == 4 and list(prompts.index) == [tuple(p) for p in (PREFIXED[0], PREFIXED[1], PREFIXED[3])]
    assert prompts.input_ids.tolist() == [[3, 4, 2, 1, 5, 6, 7, 8], [3, 4, 2, 1, 0, 0, 9, 10], [3, 4, 2, 1, 0, 11, 12, 13]]
    assert prompts.position_ids[1].tolist()[-2:] == [4, 5] and prompts.position_ids[2].tolist()[-3:] == [4, 5, 6]
    # Each prompt keeps a token of its own (its last position predicts the response); a prefix that would save
    # fewer than MIN_PREFIX_SAVING positions is not worth a forward of its own.
    assert build_prompt_inputs([[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6], [1, 2, 3, 7]], 0).common == 2
    assert build_prompt_inputs([[3, 4, 2, 1, 5], [3, 4, 2, 1, 6]], 0).common == 0
    assert build_prompt_inputs(PROMPTS, 0).common == 0


def test_rows_with_distinct_prompts_keep_one_forward():
    batch = batch_of([[1, 2], [3, 4]], [[5], [6]])
    assert not isinstance(batch.student_inputs(pad_id=0, layout=Layout(share_prompts=True)), SharedPromptInputs)
    assert not isinstance(batch_of(PROMPTS, RESPONSES).student_inputs(pad_id=0), SharedPromptInputs)


@PROMPT_SETS
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_prompt_pass_for_several_micro_batches(tiny_path, lora, prompts):
    # The trainer's optimizer step: one pass over its distinct prompts; micro-batches whose rows straddle the
    # prompts read the pass's detached copies, the last one its own tensors plus `pending()` (the earlier
    # micro-batches' gradient through the prompts' forward, and through their common prefix's).
    model = tiny_float64(tiny_path, lora)
    batch = batch_of(prompts, RESPONSES)
    response_ids_BR, mask_BR = batch.response_ids_BR, batch.response_mask_BR
    weights_BR = torch.randn(mask_BR.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * mask_BR
    plain_logp, plain_grads = logp_and_grads(model, build_model_inputs(prompts, RESPONSES, 0), response_ids_BR, weights_BR)

    model.zero_grad(set_to_none=True)
    step_pass = PromptPass(model, build_prompt_inputs(prompts, 0))
    assert step_pass.prompts.input_ids.shape[0] == 3
    micro_batches = [[0, 1], [2, 3], [4, 5]]
    for i, rows in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        micro = batch.select(rows)
        inputs = micro.student_inputs(0, Layout(shared=step_pass.prompts))
        features = response_features(model, inputs, step_pass, last)
        width = features.values_BRX.shape[1]
        logp = torch.log_softmax(features.head(features.values_BRX), -1).gather(-1, micro.response_ids_BR[..., None])[..., 0]
        torch.testing.assert_close(logp[micro.response_mask_BR], plain_logp[rows][:, :width][micro.response_mask_BR],
                                   rtol=1e-12, atol=1e-12)
        loss = (logp * weights_BR[rows][:, :width]).sum()
        (loss + step_pass.pending() if last else loss).backward()
    for name, p in model.named_parameters():
        if name in plain_grads:
            torch.testing.assert_close(p.grad, plain_grads[name], rtol=1e-6, atol=1e-6 * plain_grads[name].abs().max(),
                                       msg=name)


def rows_features(teacher, model, micro, passes, share):
    """The teacher's features of a micro-batch's rows with a signal (as its micro-batch forward runs them)."""
    rows = torch.tensor(micro.distill_rows, dtype=torch.long)
    inputs = micro.select(rows).teacher_inputs(0, Layout(share, passes[0].prompts if passes else None))
    return teacher.features(model, inputs, passes).of_rows(rows, micro.response_width)


@PROMPT_SETS
@pytest.mark.parametrize("kind", ["ema", "trust_region"])
def test_the_teachers_reprompt_pass_gives_the_features_of_one_forward_per_row(tiny_path, kind, prompts):
    # The trainer's block of micro-batches: the rows with a signal name their reprompt (here the student's prompts,
    # row 4 without a signal); one pass per teacher source over the distinct ones, which every micro-batch's
    # teacher forward continues. trust_region mixes two sources (the initial weights and the live policy).
    from sdpo.config import TeacherConfig
    from sdpo.teacher import Teacher

    model = tiny_float64(tiny_path, lora=False)
    teacher = Teacher(TeacherConfig(kind=kind), model)
    with torch.no_grad():  # the live policy moves away from the teacher's copy
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    block = batch_of([[1]] * len(PROMPTS), RESPONSES)
    block.teacher_prompt_ids = [list(p) for p in prompts]
    block.distill_mask_B = torch.tensor([True, True, True, True, False, True])
    passes = teacher._prompt_passes(model, block, 0, torch.device("cpu"))
    assert passes is not None and len(passes) == {"ema": 1, "trust_region": 2}[kind]  # one per source
    assert passes[0].prompts.input_ids.shape[0] == 3  # the distinct reprompts of the rows with a signal
    assert passes[0].prompts.common == (4 if prompts is PREFIXED else 0)

    for rows in ([0, 1], [2, 3], [4, 5]):
        micro = block.select(rows)
        widths = []  # what each source's forward reads: the responses only, on the reprompts' cache
        hooks = [m.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
                 for m in (model, teacher.model)]
        continued = rows_features(teacher, model, micro, passes, share=True)
        for hook in hooks:
            hook.remove()
        assert widths == [micro.select(micro.distill_rows).response_width] * len(passes)
        per_row = rows_features(teacher, model, micro, None, share=False)
        assert continued.rows.tolist() == per_row.rows.tolist() == micro.distill_rows
        mask_BR = micro.response_mask_BR[continued.rows]
        assert mask_BR.any() and len(continued.features) == len(per_row.features) == len(passes)
        for a, b in zip(continued.features, per_row.features, strict=True):
            torch.testing.assert_close(a.head(a.values_BRX)[mask_BR], b.head(b.values_BRX)[mask_BR], rtol=1e-12, atol=1e-12)


def test_no_reprompt_pass_without_shared_reprompts(tiny_path):
    from sdpo.config import TeacherConfig
    from sdpo.teacher import Teacher

    model = tiny_float64(tiny_path, lora=False)
    block = batch_of(PROMPTS, RESPONSES)
    block.teacher_prompt_ids = [list(p) for p in PROMPTS]
    block.distill_mask_B = torch.tensor([True, True, False, True, False, False])  # three distinct reprompts
    assert Teacher(TeacherConfig(), model)._prompt_passes(model, block, 0, torch.device("cpu")) is None
    block.distill_mask_B[2] = True  # rows 0 and 2 share one
    assert Teacher(TeacherConfig(), model)._prompt_passes(model, block, 0, torch.device("cpu")) is not None
    engine_scored = Teacher(TeacherConfig(kind="live", scorer="engine"), model)
    assert engine_scored._prompt_passes(model, block, 0, torch.device("cpu")) is None


def test_prompt_blocks_keep_a_prompts_rollouts_together():
    batch = batch_of(PROMPTS, RESPONSES)  # prompts in order of appearance: A B A C B B
    blocks = list(batch.prompt_blocks(2))
    assert [b.prompt_ids for b in blocks] == [[PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[4], PROMPTS[5]], [PROMPTS[3]]]
    assert [b.response_ids for b in blocks][1] == [RESPONSES[3]]
    assert [len(b) for b in batch.prompt_blocks(3)] == [6]


def test_sliding_window_models_keep_one_forward_per_row():
    # A sliding-window layer's cache keeps only the last window of the prompt: no pass for those models.
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from sdpo.models import supports_prompt_pass

    small = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    assert supports_prompt_pass(LlamaForCausalLM(LlamaConfig(**small)))
    assert not supports_prompt_pass(MistralForCausalLM(MistralConfig(sliding_window=4, **small)))


def test_the_trainer_shares_prompts_only_where_the_cache_is_kept(tmp_path):
    from conftest import TINY_OVERRIDES

    from sdpo import SDPOTrainer, load_config

    def trainer(*overrides):
        return SDPOTrainer(load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", *overrides]))

    assert trainer().learner.planner.share_prompts
    assert not trainer("trainer.share_prompts=false").learner.planner.share_prompts
    assert not trainer("model.gradient_checkpointing=true").learner.planner.share_prompts


@pytest.mark.parametrize("generations, passes", [(4, 1), (1, 0)])
def test_a_prompt_pass_only_where_rollouts_share_prompts(tmp_path, monkeypatch, generations, passes):
    # One rollout per question: nothing to share, so the step keeps one length-sorted layout and one forward per row.
    from conftest import TINY_OVERRIDES

    from sdpo import SDPOTrainer, load_config

    trainer = SDPOTrainer(load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", "algorithm=grpo",
                                       f"rollout.num_generations={generations}"]))
    calls, continued = [], []
    original = trainer.learner.prompt_pass
    monkeypatch.setattr(trainer.learner, "prompt_pass",
                        lambda prompts: calls.append(len(prompts)) or original(prompts))
    # What the update's forwards (the ones with a gradient; generation runs without) do: a response forward continues
    # a prompt pass's key/value cache only where one ran.
    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            continued.append(kwargs.get("past_key_values") is not None)

    hook = trainer.learner.unwrapped.register_forward_pre_hook(record, with_kwargs=True)
    trainer.training_step()
    hook.remove()
    assert len(calls) == passes
    assert any(continued) == (passes > 0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_forwards_for_features_project_no_position_onto_the_vocabulary(tiny_path, lora):
    """`no_logits`: the forwards that want only hidden states or a cache (prompt passes, continued responses) skip the
    vocabulary head entirely (no [rows, 1, V] product), and their hidden states are the full forward's."""
    from sdpo.models import no_logits

    model = tiny_float64(tiny_path, lora)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    full = model(input_ids=ids, output_hidden_states=True)
    features_only = model(input_ids=ids, output_hidden_states=True, logits_to_keep=no_logits(ids))
    assert full.logits.shape[:2] == (2, 4)
    assert features_only.logits.shape[:2] == (2, 0)
    torch.testing.assert_close(features_only.hidden_states[-1], full.hidden_states[-1], rtol=0, atol=0)
