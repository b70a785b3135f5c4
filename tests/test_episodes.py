"""Multi-turn episodes (sdpo/envs/episode.py, sdpo/rollout/episodes.py): bookkeeping (loss only on model tokens,
eviction keeps the question, per-turn rewards and feedback aligned), episode returns and advantages against a
float64 brute force, the teacher of turn t against a brute-force forward of the same context, single-turn results
unchanged, and a real multi-turn step with the transformers engine (the vLLM one: tests/test_episodes_vllm.py)."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import TINY_OVERRIDES
from sdpo.config import RepromptConfig
from sdpo.envs.base import Environment, Problem, Score
from sdpo.envs.episode import Episode, step_episodes
from sdpo.hydra_config import load_config
from sdpo.losses import group_advantages
from sdpo.models import load_model, render_chat
from sdpo.rollout.base import SamplingSettings
from sdpo.rollout.episodes import EpisodeLimits, EpisodeRollout, episode_advantages, episode_return, render_context
from sdpo.testing import ScriptedEngine
from sdpo.trainer import SDPOTrainer

ANSWER = "forty two"
QUESTION = "What is six times seven?"


class GuessEnv(Environment):
    """Reward 1 for the exact answer; otherwise feedback naming the wrong guess, and a reply asking again."""

    scoring_mode = "inline"

    def __init__(self, num_questions: int = 1, talks: bool = True) -> None:
        self.num_questions, self.talks = num_questions, talks

    def load(self, split: str) -> list[Problem]:
        return [Problem(id=f"q{i}", messages=[{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": f"{QUESTION} ({i})"}])
                for i in range(self.num_questions)]

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        if response.strip() == ANSWER:
            return Score(1.0, "", {"status": "correct"})
        return Score(0.0, f"'{response.strip()}' is wrong", {"status": "wrong"})

    def follow_up(self, problem: Problem, response: str, score: Score) -> str | None:
        return f"{score.feedback}. Try again." if self.talks else None


def guessing_engine(tokenizer, solver: int = 1, solve_turn: int = 1) -> ScriptedEngine:
    """Episode j guesses "guess j" first; episode `solver` answers right at `solve_turn`, the others keep guessing.
    Every response it writes is recorded (`engine.written`), to check the batch against."""
    engine = ScriptedEngine(tokenizer)
    engine.written = []

    def respond(prompt, j):
        text = tokenizer.decode(prompt)
        turn = text.count("Try again")
        episode = int(re.search(r"guess (\d)", text).group(1)) if turn else j
        words = ANSWER if (episode == solver and turn == solve_turn) else f"guess {episode} round {turn}"
        ids = tokenizer.encode(" " + words, add_special_tokens=False) + [tokenizer.eos_token_id]
        engine.written.append(ids)
        return ids

    engine.respond = respond
    return engine


def rollout(tokenizer, engine, env, n=4, max_turns=3, max_prompt_len=512, num_questions=1):
    problems = env.load("train")[:num_questions]
    runner = EpisodeRollout(engine, env, tokenizer, EpisodeLimits(max_turns, max_prompt_len, 1.0))
    runner.begin(problems, [render_chat(tokenizer, p.messages) for p in problems], n)
    runner.run(SamplingSettings(n=n, max_new_tokens=32, seed=0))
    return runner


# ---------------------------------------------------------------------------------------------------------------
# bookkeeping


def test_rows_hold_only_model_tokens_with_rewards_and_feedback_aligned_per_turn(tokenizer):
    env, engine = GuessEnv(), guessing_engine(tokenizer)
    batch, contexts = rollout(tokenizer, engine, env).batch()
    # Episodes 0, 2, 3 run out of turns (3), episode 1 succeeds at its second turn: rows episode-major, then turn.
    assert batch.episode_ids_B.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]
    assert batch.turn_B.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2]
    assert batch.group_ids_B.tolist() == [0] * 11
    assert batch.rewards_B.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    # The loss mask covers exactly the tokens the engine wrote, each once: nothing of the prompt or the replies.
    assert sorted(batch.response_ids) == sorted(engine.written)
    assert int(batch.response_mask_BR.sum()) == sum(len(w) for w in engine.written)
    for i in range(len(batch)):
        inputs = batch.select([i]).student_inputs(tokenizer.pad_token_id)
        row = inputs.input_ids[0, inputs.attention_mask[0].bool()].tolist()
        assert row == batch.prompt_ids[i] + batch.response_ids[i]
        # Feedback and reward are the environment's score of this very turn's text.
        expected = env.score(contexts[i], batch.response_text[i])
        assert (batch.feedback[i], float(batch.rewards_B[i])) == (expected.feedback, expected.reward)
        # The next turn of the episode sees this turn's answer and the reply carrying its feedback, after it.
        if i + 1 < len(batch) and batch.episode_ids_B[i + 1] == batch.episode_ids_B[i]:
            assert contexts[i + 1].messages[-2:] == [{"role": "assistant", "content": batch.response_text[i]},
                                                     {"role": "user", "content": f"{batch.feedback[i]}. Try again."}]
            assert contexts[i + 1].messages[:2] == contexts[i].messages[:2]  # the system prompt and the question
            assert batch.prompt_ids[i + 1] == render_chat(tokenizer, contexts[i + 1].messages)
        elif i + 1 < len(batch):
            assert batch.turn_B[i + 1] == 0


def test_single_turn_environments_end_every_episode_after_one_turn(tokenizer):
    batch, _ = rollout(tokenizer, guessing_engine(tokenizer), GuessEnv(talks=False), max_turns=5).batch()
    assert batch.turn_B.tolist() == [0, 0, 0, 0] and batch.episode_ids_B.tolist() == [0, 1, 2, 3]


def test_eviction_drops_the_earliest_exchanges_and_keeps_the_question(tokenizer):
    head = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    exchanges = [m for k in range(6) for m in ({"role": "assistant", "content": f"answer {k} " + "word " * 20},
                                               {"role": "user", "content": f"reply {k} " + "word " * 20})]
    full = render_chat(tokenizer, head + exchanges)
    limit = len(render_chat(tokenizer, head + exchanges[6:])) + 5  # room for the last three exchanges, not four
    ids, kept = render_context(tokenizer, head + exchanges, limit)
    assert len(full) > limit >= len(ids)
    assert kept == head + exchanges[6:]  # first in, first out: whole exchanges, the newest kept
    assert ids == render_chat(tokenizer, kept)
    # Too small for any exchange: the question alone; smaller than the question: an error that names the key.
    question_only = render_chat(tokenizer, head)
    assert render_context(tokenizer, head + exchanges, len(question_only) + 3)[1] == head
    with pytest.raises(ValueError, match="rollout.max_prompt_len"):
        render_context(tokenizer, head + exchanges, len(question_only) - 1)


def test_long_episodes_are_evicted_within_the_prompt_limit(tokenizer):
    env = GuessEnv()
    question = render_chat(tokenizer, env.load("train")[0].messages)
    limit = len(question) + 30  # the question and about one exchange
    batch, contexts = rollout(tokenizer, guessing_engine(tokenizer, solver=9), env, max_turns=4,
                              max_prompt_len=limit).batch()
    assert max(len(p) for p in batch.prompt_ids) <= limit
    late = [i for i in range(len(batch)) if batch.turn_B[i] == 3]
    assert late
    for i in late:
        assert batch.prompt_ids[i][: len(question) - 3] == question[:-3]  # the question (minus the assistant header)
        assert contexts[i].messages[:2] == env.load("train")[0].messages
        assert "round 0" not in tokenizer.decode(batch.prompt_ids[i])  # the first exchange was evicted


def test_step_episodes_rejects_finished_episodes_and_bad_messages(tokenizer):
    env = GuessEnv()
    episode = Episode.start(env.load("train")[0])
    (turn,) = step_episodes(env, [episode], [ANSWER], [False], 1.0, 3)
    assert turn.done and turn.next_message is None and episode.messages[-1] == {"role": "assistant", "content": ANSWER}
    with pytest.raises(ValueError, match="already done"):
        step_episodes(env, [episode], [ANSWER], [False], 1.0, 3)
    env.follow_up = lambda problem, response, score: {"text": "no role"}
    with pytest.raises(ValueError, match="'role' and a 'content'"):
        step_episodes(env, [Episode.start(env.load("train")[0])], ["nope"], [False], 1.0, 3)


# ---------------------------------------------------------------------------------------------------------------
# returns and advantages


def brute_force_advantages(returns, groups, norm_by_std):
    out = []
    for r, g in zip(returns, groups):
        same = [x for x, h in zip(returns, groups) if h == g]
        mean = sum(same) / len(same)
        if not norm_by_std:
            out.append(r - mean)
            continue
        var = sum((x - mean) ** 2 for x in same) / max(len(same) - 1, 1)
        out.append((r - mean) / (var**0.5 + 1e-6))
    return out


@pytest.mark.parametrize("mode", ["final", "any_success", "discounted"])
@pytest.mark.parametrize("norm_by_std", [False, True])
def test_episode_advantages_baseline_returns_over_the_episodes_of_a_question(mode, norm_by_std):
    from sdpo.batch import RolloutBatch

    # Two questions; episodes of 1-3 turns with rewards per turn.
    episodes = {0: (0, [0.0, 0.0, 1.0]), 1: (0, [1.0]), 2: (0, [0.0, 0.5, 0.0]), 3: (1, [0.0, 1.0]), 4: (1, [0.25])}
    rows = [(e, g, t, r) for e, (g, rewards) in episodes.items() for t, r in enumerate(rewards)]
    returns = {e: episode_return(rewards, mode, 0.5) for e, (_, rewards) in episodes.items()}
    expected_returns = {"final": [1.0, 1.0, 0.0, 1.0, 0.25], "any_success": [1.0, 1.0, 0.5, 1.0, 0.25],
                        "discounted": [0.25, 1.0, 0.25, 0.5, 0.25]}[mode]
    assert list(returns.values()) == expected_returns
    n = len(rows)
    batch = RolloutBatch(problem_ids=[""] * n, prompt_ids=[[1]] * n, response_ids=[[2]] * n, response_text=[""] * n,
                         group_ids_B=torch.tensor([g for _, g, _, _ in rows]), truncated_B=torch.zeros(n, dtype=torch.bool),
                         episode_ids_B=torch.tensor([e for e, _, _, _ in rows]), turn_B=torch.tensor([t for _, _, t, _ in rows]),
                         rewards_B=torch.tensor([r for _, _, _, r in rows]),
                         returns_B=torch.tensor([returns[e] for e, _, _, _ in rows]))
    per_episode = brute_force_advantages([returns[e] for e in episodes], [g for g, _ in episodes.values()], norm_by_std)
    expected = torch.tensor([per_episode[e] for e, _, _, _ in rows], dtype=torch.float64)
    torch.testing.assert_close(episode_advantages(batch, norm_by_std).double(), expected, rtol=1e-6, atol=1e-6)


def test_one_turn_episodes_give_the_single_turn_advantages():
    from sdpo.batch import RolloutBatch

    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 0, 1, 1, 1])
    single = RolloutBatch(problem_ids=[""] * 6, prompt_ids=[[1]] * 6, response_ids=[[2]] * 6, response_text=[""] * 6,
                          group_ids_B=groups, truncated_B=torch.zeros(6, dtype=torch.bool), rewards_B=rewards)
    episodic = RolloutBatch(**{**vars(single), "episode_ids_B": torch.arange(6), "turn_B": torch.zeros(6, dtype=torch.long),
                               "returns_B": rewards.clone()})
    for norm in (False, True):
        assert torch.equal(episode_advantages(single, norm), group_advantages(rewards, groups, norm))
        assert torch.equal(episode_advantages(episodic, norm), group_advantages(rewards, groups, norm))
    with pytest.raises(ValueError, match="returns_B"):
        episode_advantages(RolloutBatch(**{**vars(episodic), "returns_B": None}), False)


# ---------------------------------------------------------------------------------------------------------------
# the trainer: teacher per turn, single-turn unchanged, a real step


def make_trainer(tmp_path, engine=None, env=None, *overrides):
    config = load_config([*TINY_OVERRIDES, "trainer.questions_per_step=1", "trainer.mini_batch_questions=1",
                          "algorithm.reprompt.max_reprompt_len=1024", "rollout.max_prompt_len=512",
                          f"trainer.output_dir={tmp_path}", *overrides])
    return SDPOTrainer(config, env=env or GuessEnv(), engine=engine)


def test_teacher_of_turn_t_rescores_its_tokens_under_the_feedback_that_followed(tmp_path, tokenizer, tiny_path):
    trainer = make_trainer(tmp_path, guessing_engine(tokenizer), None, "rollout.max_turns=3", "rollout.max_new_tokens=32")
    batch, contexts, _ = trainer.collector.collect(trainer.next_questions(), trainer.step)
    batch, _ = trainer.teacher_context(batch, contexts)
    # Every failed turn has feedback; the lone success has neither feedback nor a sibling success to learn from.
    assert batch.distill_mask_B.tolist() == [True] * 4 + [False] + [True] * 6
    rcfg = RepromptConfig(max_reprompt_len=1024)
    solver_answer = batch.response_text[4]  # episode 1's successful second turn
    assert solver_answer.strip() == ANSWER
    row = 1  # episode 0, turn 1: a failed turn with a sibling episode's success to show
    question, first, reply = contexts[row].messages[1], batch.response_text[0], contexts[row].messages[-1]
    # By hand: the system prompt, the question, turn 0's answer, then the reply turned into the reprompt.
    reprompt = rcfg.reprompt_template.format(
        prompt=reply["content"],
        solution=rcfg.solution_template.format(successful_previous_attempt=solver_answer),
        feedback=rcfg.feedback_template.format(feedback_raw=batch.feedback[row]))
    context = [contexts[row].messages[0], question, {"role": "assistant", "content": first},
               {"role": "user", "content": reprompt}]
    context_ids = render_chat(tokenizer, context)
    assert batch.teacher_prompt_ids[row] == context_ids
    # Episode 1's own first turn learns from no one (its success is its own episode's): feedback only.
    assert rcfg.solution_template.split("{")[0].strip() not in tokenizer.decode(batch.teacher_prompt_ids[3])
    # The trainer's teacher forward (batched, left-padded) equals a float64 forward of that one context.
    features = trainer.learner.teacher.features(trainer.learner.unwrapped, batch.teacher_inputs(tokenizer.pad_token_id))
    f = features.features[0]
    logp = torch.log_softmax(f.head(f.values_BRX).float(), -1)
    response = batch.response_ids[row]
    ours = logp[row, torch.arange(len(response)), torch.tensor(response)].double()
    reference = load_model(trainer.config.model, tiny_path).double().eval()
    with torch.no_grad():
        ids = torch.tensor([context_ids + response])
        full = torch.log_softmax(reference(ids).logits[0].double(), -1)
    start = len(context_ids) - 1
    brute = full[start : start + len(response)].gather(-1, torch.tensor(response)[:, None])[:, 0]
    torch.testing.assert_close(ours, brute, rtol=0, atol=1e-4)


def test_a_one_turn_episode_is_the_single_turn_step(tmp_path, tokenizer):
    """max_turns=1 runs through the episode path like any run: its batch is what one generate call and one scoring
    call give (the single-turn step), with no episode fields, and the step's metrics are computed from it."""
    trainer = make_trainer(tmp_path, ScriptedEngine(tokenizer), GuessEnv(num_questions=2),
                           "trainer.questions_per_step=2", "trainer.mini_batch_questions=2", "algorithm=sdpo_grpo")
    problems = [trainer.train_problems[i] for i in trainer.sampler._order()[:2]]
    sampling = SamplingSettings.from_config(trainer.config.rollout, seed=trainer.dist.sampling_seed(trainer.config.trainer.seed, 0))
    completions = trainer.engine.generate([trainer.collector.prompt_ids(p) for p in problems], sampling)
    scores = trainer.env.score_batch([problems[c.prompt_index] for c in completions], [c.text for c in completions],
                                     [c.truncated for c in completions])
    result = trainer.training_step()
    batch = result.batch
    assert batch.episode_ids_B is None and batch.turn_B is None and batch.returns_B is None
    assert batch.prompt_ids == [trainer.collector.prompt_ids(problems[c.prompt_index]) for c in completions]
    assert batch.response_ids == [c.token_ids for c in completions]
    assert batch.group_ids_B.tolist() == [c.prompt_index for c in completions]
    assert batch.rewards_B.tolist() == [s.reward for s in scores] and batch.feedback == [s.feedback for s in scores]
    assert result.metrics["reward/mean"] == pytest.approx(sum(s.reward for s in scores) / len(scores))
    assert not any(key.startswith("episode/") for key in result.metrics)
    assert {"policy/loss", "policy/clip_fraction", "distill/student_teacher_kl"} <= result.metrics.keys()


@pytest.mark.parametrize("algorithm", ["grpo", "sdpo"])
def test_multi_turn_step_with_the_transformers_engine(tmp_path, algorithm):
    config = load_config([*TINY_OVERRIDES, "env=arithmetic", "env.feedback=true", "rollout.max_turns=3",
                          f"algorithm={algorithm}", "algorithm.reprompt.max_reprompt_len=512", "rollout.max_prompt_len=96",
                          "eval.num_questions=2", "eval.samples_per_question=2", f"trainer.output_dir={tmp_path}"])
    trainer = SDPOTrainer(config)
    before = {n: p.detach().clone() for n, p in trainer.learner.unwrapped.named_parameters()}
    result = trainer.training_step()
    batch = result.batch
    assert len(batch) > 8 and batch.turn_B.max() >= 1  # the random tiny model fails: episodes run on
    assert max(len(r) for r in batch.response_ids) <= config.rollout.max_new_tokens
    assert max(len(p) for p in batch.prompt_ids) <= config.rollout.max_prompt_len
    for i in range(1, len(batch)):
        if batch.turn_B[i] > 0:  # the reply to the previous turn, with its feedback, is the last user message
            assert batch.feedback[i - 1] in trainer.tokenizer.decode(batch.prompt_ids[i])
    assert 0.0 <= result.metrics["episode/success"] <= 1.0 and result.metrics["episode/turns_mean"] > 1
    assert any(not torch.equal(p, before[n]) for n, p in trainer.learner.unwrapped.named_parameters())
    metrics = trainer.evaluate()
    assert {"eval/avg@2", "eval/episode_success", "eval/episode_turns"} <= metrics.keys()


def test_the_documented_example_environment_runs_episodes(tokenizer):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "multi_turn.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    assert len(code.strip().splitlines()) <= 40
    namespace: dict = {}
    exec(compile(code, "docs/multi_turn.md", "exec"), namespace)  # noqa: S102 - our own documentation's code
    env = namespace["GuessNumberEnv"](namespace["GuessNumberConfig"]())
    engine = ScriptedEngine(tokenizer)
    engine.respond = lambda prompt, j: tokenizer.encode(
        f" {20 * tokenizer.decode(prompt).count('Guess again') + 10 + j}", add_special_tokens=False) + [tokenizer.eos_token_id]
    problem = env.load("train")[0]
    runner = EpisodeRollout(engine, env, tokenizer, EpisodeLimits(4, 512, 1.0))
    runner.begin([problem], [render_chat(tokenizer, problem.messages)], 2)
    runner.run(SamplingSettings(n=2, max_new_tokens=8))
    batch, _ = runner.batch()
    secret = problem.data["secret"]
    for i in range(len(batch)):
        guess = int(batch.response_text[i])
        assert guess == 20 * int(batch.turn_B[i]) + 10 + (int(batch.episode_ids_B[i]) if batch.turn_B[i] == 0 else 0)
        expected = "" if guess == secret else f"{guess} is too {'low' if guess < secret else 'high'}."
        assert batch.feedback[i] == expected
    for episode in (0, 1):  # runs to its success, else to the turn limit
        rewards = batch.rewards_B[batch.episode_ids_B == episode].tolist()
        assert (rewards[-1] == 1.0 and 1.0 not in rewards[:-1]) or rewards == [0.0] * 4


# ---------------------------------------------------------------------------------------------------------------
# the built-in environments that answer turns


def test_a_code_episode_resubmits_after_the_judges_verdict():
    from sdpo.envs import ENVIRONMENTS

    cls = ENVIRONMENTS.get("humaneval")
    env = cls(cls.config_class(time_limit_s=2.0))
    problem = env.load("test")[0]
    reference = problem.data["reference"]
    episode = Episode.start(problem)
    crash = f"```python\nraise ValueError('broken on purpose')\n{reference}\n```"
    (first,) = step_episodes(env, [episode], [crash], [False], 1.0, 3)  # scored in the sandboxed pool
    assert first.reward == 0.0 and not first.done and first.feedback.startswith("Runtime Error")
    assert first.next_message["role"] == "user" and first.feedback in first.next_message["content"]
    assert "resubmit" in first.next_message["content"]
    (second,) = step_episodes(env, [episode], [f"```python\n{reference}\n```"], [False], 1.0, 3)
    assert second.reward == 1.0 and second.done and second.next_message is None
    assert [m["role"] for m in episode.messages[-4:]] == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("name, overrides, says", [
    ("arithmetic", {"feedback": True}, "is not the correct answer. Try again."),
    ("arithmetic", {"feedback": False}, "That is not correct. Try again."),
    ("tooluse", {"feedback": "full"}, "Actions mismatch"),
    ("tooluse", {"feedback": "none"}, "That is not the right tool call."),
])
def test_arithmetic_and_tool_use_answer_a_wrong_turn(name, overrides, says):
    from sdpo.envs import ENVIRONMENTS

    cls = ENVIRONMENTS.get(name)
    env = cls(cls.config_class(**overrides))
    problem = env.load("test")[0]
    wrong = "Action: no_such_tool\nAction Input: {}" if name == "tooluse" else "-12345"
    (turn,) = step_episodes(env, [Episode.start(problem)], [wrong], [False], 1.0, 2)
    assert turn.reward == 0.0 and not turn.done and says in turn.next_message["content"]
    assert turn.feedback in turn.next_message["content"]
