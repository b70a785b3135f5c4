"""One forward per multi-turn episode (trainer.pack_episodes, sdpo.batch.PackedInputs): the turns of an episode run
as one sequence, and the step's loss, gradients and metrics equal those of one row per turn (float64, tiny model):
GRPO, pure SDPO and both hybrids, with the conversation whole and with earlier exchanges evicted, with prompts shared
and not, the old-policy log-probs too; a single-turn batch is untouched."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_OVERRIDES
from test_episodes import GuessEnv, guessing_engine
from sdpo.batch import Layout, PackedInputs, RolloutBatch, build_branch_inputs, build_model_inputs, forward_inputs, turn_chains
from sdpo.hydra_config import load_config
from sdpo.plan import MicroBatch
from sdpo.losses.objective import MetricSums
from sdpo.models import load_model, response_features, response_logprobs
from sdpo.rollout.episodes import episode_advantages
from sdpo.trainer import SDPOTrainer


# ---------------------------------------------------------------------------------------------------------------
# which rows chain


def test_a_turn_continues_its_episode_only_where_its_prompt_extends_the_previous_turn():
    prompts = [[1, 2], [1, 2, 7, 8, 9], [1, 2, 7, 8, 9, 5, 6], [1, 2], [1, 2, 3, 9, 9]]
    responses = [[7, 8], [5], [4], [3, 4], [1]]
    episodes = [[0, 1, 2], [3, 4]]  # each episode's rows in turn order
    # Episode 0: turn 1's prompt starts with turn 0's prompt + response; turn 2's does not continue turn 1's
    # (prompt [1, 2, 7, 8, 9] + response [5] is followed by 5, 6: fine) -> all three chain.
    assert turn_chains(prompts, responses, episodes) == [[0, 1, 2], [3], [4]]
    # Episode 1's second turn does not start with [1, 2, 3, 4] (a re-tokenized or evicted turn): a chain of its own.
    assert turn_chains(prompts, responses) == [[0], [1], [2], [3], [4]]  # single-turn: every row alone
    # Rows of another episode never chain, even where their tokens would.
    assert turn_chains(prompts[:2], responses[:2], [[0], [1]]) == [[0], [1]]
    # Rows out of turn order are ordered by their turn (`RolloutBatch.episode_rows`).
    batch = RolloutBatch(["q"] * 2, [prompts[1], prompts[0]], [responses[1], responses[0]], [""] * 2,
                         torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool),
                         episode_ids_B=torch.tensor([0, 0]), turn_B=torch.tensor([1, 0]))
    assert batch.chains() == [[1, 0]]


def test_micro_batches_hold_whole_episodes_and_at_most_their_size_in_turns():
    # Episode 0: 3 chained turns (one sequence); episode 1: 2 turns that do not chain (two); episode 2: one turn.
    prompts = [[1], [1, 2, 3], [1, 2, 3, 4, 5], [6], [7], [8]]
    responses = [[2], [4], [6], [9], [9], [9, 9]]
    batch = RolloutBatch(["q"] * 6, prompts, responses, [""] * 6, torch.tensor([0, 0, 0, 0, 0, 1]),
                         torch.zeros(6, dtype=torch.bool), episode_ids_B=torch.tensor([0, 0, 0, 1, 1, 2]),
                         turn_B=torch.tensor([0, 1, 2, 0, 1, 0]))
    assert batch.chains() == [[0, 1, 2], [3], [4], [5]]
    # Ordered by their last row's length (2, 3, 6 tokens): episode 1, 2, 0. Micro-batches count turns (rows), as
    # single-turn micro-batches do: an episode of more turns than the size gets one of its own.
    for size, expected in [(1, [[3, 4], [5], [0, 1, 2]]), (2, [[3, 4], [5], [0, 1, 2]]), (3, [[3, 4, 5], [0, 1, 2]]),
                           (5, [[3, 4, 5], [0, 1, 2]]), (6, [[3, 4, 5, 0, 1, 2]])]:
        micro = [m.prompt_ids for m in batch.episode_micro_batches(size)]
        assert micro == [[prompts[i] for i in rows] for rows in expected], size


def test_packed_inputs_place_each_rows_response_where_it_is_in_the_sequence():
    prompts, responses = [[1, 2], [1, 2, 7, 8, 9]], [[7, 8], [5, 6, 4]]
    inputs = forward_inputs(prompts, responses, 0, Layout(chains=[[0, 1]]))
    assert isinstance(inputs, PackedInputs)
    sequence = inputs.sequences
    assert sequence.input_ids.tolist() == [[1, 2, 7, 8, 9, 5, 6, 4]] and sequence.prompt_width == 2
    # Row 0's tokens are the sequence's response positions 0-1 (then padding points at its last); row 1's are 3-5.
    assert inputs.index_BR.tolist() == [[0, 1, 1], [3, 4, 5]]
    # No chain of two: the plain layouts, unchanged.
    assert not isinstance(forward_inputs(prompts, responses, 0, Layout(chains=[[0], [1]])), PackedInputs)


# ---------------------------------------------------------------------------------------------------------------
# the forward: values and gradients of one row per turn

# Relative (gradients: to their largest entry). The tiny Llama's RMSNorm computes in float32 whatever its input's
# dtype, so a float64 forward is float32-exact only: packed and per-row forwards sum the same attention terms over
# different key lengths and the same gradient contributions in a different order, and a last-bit difference can
# round differently there (~1e-7; tests/test_shared_prompts.py allows the same for shared prompts).
GRAD_RTOL = 1e-6


def per_row_and_packed(model, prompts, responses, chains, share_prompts):
    """The response log-probs (summed with fixed weights) and their gradients, run per row and packed."""
    out = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        inputs = forward_inputs(prompts, responses, 0, Layout(share_prompts, chains=chains if packed else None))
        assert isinstance(inputs, PackedInputs) == packed
        features = response_features(model, inputs)
        logp = torch.log_softmax(features.head(features.values_BRX), -1)
        ids = torch.tensor([r + [0] * (max(map(len, responses)) - len(r)) for r in responses])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (ids.shape[1] - len(r)) for r in responses], dtype=torch.float64)
        token_logp = logp.gather(-1, ids[..., None])[..., 0] * mask
        weights = torch.linspace(0.5, 1.5, token_logp.numel(), dtype=torch.float64).view_as(token_logp)
        (token_logp * weights).sum().backward()
        out.append((token_logp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    return out


@pytest.mark.parametrize("share_prompts", [False, True])
def test_a_packed_forward_gives_the_values_and_gradients_of_one_row_per_turn(tiny_path, share_prompts):
    model = load_model(load_config(["model=tiny"]).model, tiny_path).double().train()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 200, (n,), generator=g).tolist()  # noqa: E731
    prompts, responses, chains = [], [], []
    for episode in range(3):  # the two first share their question (a group), the third is its own
        prompt = ids(6) if episode != 1 else list(prompts[0])
        rows = []
        for turn in range(episode + 1):  # 1, 2 and 3 turns
            rows.append(len(prompts))
            prompts.append(prompt)
            responses.append(ids(3 + turn))
            prompt = prompt + responses[-1] + ids(2)  # the environment's reply, then the next turn
        chains.append(rows)
    (rows_logp, rows_grads), (packed_logp, packed_grads) = per_row_and_packed(model, prompts, responses, chains,
                                                                              share_prompts)
    torch.testing.assert_close(packed_logp, rows_logp, rtol=0, atol=1e-10)
    for a, b in zip(packed_grads, rows_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=GRAD_RTOL * b.abs().max())
    # The old-policy / reference log-probs of a batch, packed and not.
    mask = RolloutBatch(["q"] * len(prompts), prompts, responses, [""] * len(prompts), torch.zeros(len(prompts)),
                        torch.zeros(len(prompts))).response_mask_BR  # columns past a response hold no meaning
    packed = response_logprobs(model, prompts, responses, 0, 1.0, batch_size=2, layout=Layout(chains=chains))
    torch.testing.assert_close(packed[mask], response_logprobs(model, prompts, responses, 0, 1.0, batch_size=2)[mask],
                               rtol=0, atol=1e-10)


def test_reprompts_that_branch_off_the_conversation_give_the_features_of_their_own_forward(tiny_path):
    """The teacher's side: each turn's reprompt shares the conversation up to that turn with the episode's sequence;
    run once, then continued by each reprompt's own tokens and response."""
    model = load_model(load_config(["model=tiny"]).model, tiny_path).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 200, (n,), generator=g).tolist()  # noqa: E731
    conversation = ids(12)  # system prompt, question, the first answer, the reply, ...
    trunks = [conversation + ids(5), ids(7)]
    prompts = [conversation[:4] + ids(6),  # turn 0: branches off early (its reprompt replaces the question)
               conversation[:10] + ids(3),  # turn 1: the conversation up to it, then its reprompt
               trunks[0][:8] + ids(1),  # a one-token branch
               ids(4)]  # shares nothing with its trunk (sees none of it)
    responses = [ids(3), ids(5), ids(2), ids(4)]
    inputs = build_branch_inputs(trunks, [0, 0, 0, 1], prompts, responses, 0)
    assert inputs.visible_B.tolist() == [4, 10, 8, 0]
    with torch.no_grad():
        branched = response_features(model, inputs)
        alone = response_features(model, build_model_inputs(prompts, responses, 0))
    for b, response in enumerate(responses):
        torch.testing.assert_close(branched.values_BRX[b, : len(response)], alone.values_BRX[b, : len(response)],
                                   rtol=GRAD_RTOL, atol=GRAD_RTOL)


# ---------------------------------------------------------------------------------------------------------------
# the learner's step: loss, gradients and metrics of one row per turn


def float64_trainer(tmp_path, tokenizer, *overrides, solve_turn=2):
    config = load_config([*TINY_OVERRIDES, "trainer.questions_per_step=2", "trainer.mini_batch_questions=2",
                          "algorithm.reprompt.max_reprompt_len=1024", "rollout.max_turns=3", "rollout.max_new_tokens=32",
                          "model.autocast_dtype=none", "trainer.micro_batch_size=3", f"trainer.output_dir={tmp_path}",
                          *overrides])
    trainer = SDPOTrainer(config, env=GuessEnv(num_questions=2), engine=guessing_engine(tokenizer, solve_turn=solve_turn))
    trainer.learner.unwrapped.double()
    for model in (trainer.learner.teacher.model, getattr(trainer.learner.reference, "model", None)):
        if model is not None:
            model.double()
    return trainer


def scored_batch(trainer) -> RolloutBatch:
    batch, contexts, _ = trainer.collector.collect(trainer.next_questions(), trainer.step)
    batch, _ = trainer.teacher_context(batch, contexts)
    acfg = trainer.config.algorithm
    batch.advantages_B = episode_advantages(batch, acfg.norm_adv_by_std, acfg.advantage_estimator)
    return batch


def step_gradients(trainer, batch, pack: bool):
    """One optimizer step's gradients and metrics, per turn or packed, and the positions of the student's forwards."""
    learner = trainer.learner
    learner.planner.pack_episodes = pack
    learner.optimizer.zero_grad(set_to_none=True)
    sizes = []
    hook = learner.unwrapped.register_forward_pre_hook(  # the student's forwards (the teacher's run without grad)
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].numel()) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    counts, sums = learner.step_counts(batch), MetricSums()
    try:
        for micro in learner.planner.micro_batches(batch, learner.prompt_pass):
            assert isinstance(micro, MicroBatch)
            learner.micro_batch_step(micro, counts, sums)
    finally:
        hook.remove()
    grads = [p.grad.clone() for p in trainer.dist.trainable]
    learner.optimizer.zero_grad(set_to_none=True)
    return grads, sums.means(), sizes


CASES = {
    "grpo": ["algorithm=grpo"],
    "sdpo": ["algorithm=sdpo"],
    "hybrid_advantage": ["algorithm=sdpo_grpo"],
    "hybrid_loss": ["algorithm=sdpo_grpo", "algorithm.mix=loss"],
    "sdpo_old_logprobs": ["algorithm=sdpo", "trainer.epochs_per_step=2", "algorithm.teacher.kind=ema"],
    "seq_mean": ["algorithm=sdpo_grpo", "algorithm.loss_agg_mode=seq-mean-token-mean"],
}


# Every case with prompts shared (the teacher's reprompts then branch off the episode's sequence), with the
# conversation whole and evicted; without sharing (one forward per sequence, the teacher per turn) for two.
STEP_CASES = [(case, evicted, True) for case in CASES for evicted in (False, True)] + [
    (case, evicted, False) for case in ("sdpo", "hybrid_advantage") for evicted in (False, True)]


@pytest.mark.parametrize("case, evicted, share_prompts", STEP_CASES)
def test_the_packed_step_equals_one_row_per_turn(tmp_path, tokenizer, case, evicted, share_prompts):
    # The guessing episodes' turn-2 prompt is ~70 tokens; at 60 their first exchange is evicted (and the scripted
    # solver, which counts the exchanges it sees, answers at turn 1, so that the returns differ).
    trainer = float64_trainer(tmp_path, tokenizer, *CASES[case], f"trainer.share_prompts={share_prompts}",
                              f"rollout.max_prompt_len={60 if evicted else 512}", solve_turn=1 if evicted else 2)
    batch = scored_batch(trainer)
    if trainer.learner.config.trainer.epochs_per_step > 1:
        trainer.learner.planner.pack_episodes = False
        per_turn_old = trainer.learner.sampled_logprobs(trainer.learner.policy, batch)
        trainer.learner.planner.pack_episodes = True
        batch.old_logp_BR = trainer.learner.sampled_logprobs(trainer.learner.policy, batch)
        mask = batch.response_mask_BR  # columns past a response hold no meaning
        torch.testing.assert_close(batch.old_logp_BR[mask], per_turn_old[mask], rtol=GRAD_RTOL, atol=1e-10)
    chains = batch.chains()
    episodes = len(batch.episode_rows())
    if evicted:
        assert episodes < len(chains) < len(batch)  # some turns start a sequence of their own, some still chain
    else:
        assert len(chains) == episodes < len(batch)  # one sequence per episode
    rows_grads, rows_metrics, rows_sizes = step_gradients(trainer, batch, pack=False)
    packed_grads, packed_metrics, packed_sizes = step_gradients(trainer, batch, pack=True)
    assert any(g.abs().sum() > 0 for g in packed_grads)
    for a, b in zip(packed_grads, rows_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=GRAD_RTOL * b.abs().max())
    assert packed_metrics.keys() == rows_metrics.keys()
    for key, value in rows_metrics.items():  # abs: a loss near 0 is a sum of O(1) terms of both signs
        assert packed_metrics[key] == pytest.approx(value, rel=GRAD_RTOL, abs=1e-7), key
    # Whole conversations: the student's forwards ran fewer positions (padding included), one sequence per episode
    # instead of the conversation again at every turn.
    assert 0 < sum(packed_sizes) and (evicted or sum(packed_sizes) < 0.8 * sum(rows_sizes))


def test_a_single_turn_batch_is_untouched_by_packing(tmp_path):
    config = load_config([*TINY_OVERRIDES, "model.autocast_dtype=none", f"trainer.output_dir={tmp_path}"])
    trainer = SDPOTrainer(config)
    batch = scored_batch(trainer)
    assert batch.episode_ids_B is None and not trainer.learner.planner.packs(batch)
    # Each row is an episode of its own: episode-wise blocks are the row-wise ones.
    assert batch.chains() == batch.episode_rows() == [[i] for i in range(len(batch))]
    for size in (1, 3, 8):
        blocks = [b.response_ids for b in batch.prompt_blocks(size, by_episode=True)]
        assert blocks == [b.response_ids for b in batch.prompt_blocks(size)]
    assert not isinstance(batch.student_inputs(0, Layout(chains=batch.chains())), PackedInputs)
