"""Rollouts as episodes: G episodes per question, all live episodes generating together. Every run's rollouts come
from here (`sdpo.rollout.collector.Collector`): a single-turn run is one-turn episodes; rollout.max_turns > 1 lets
an episode go on while the environment answers.

Each model turn becomes one row of the step's `RolloutBatch`: its prompt is the conversation before the turn
(rendered with the chat template, earliest exchanges evicted first-in-first-out to fit rollout.max_prompt_len, the
system messages and the question always kept), its response that turn's tokens. So only tokens the model wrote
carry a loss, token normalisation counts model tokens only, the sampler's log-probs are per row, and the teacher
of turn t re-scores that row's tokens under the same context with the feedback that followed turn t (the trainer's
reprompts, with a successful sibling episode's last answer as the demonstration) - the single-turn machinery,
unchanged. Earlier turns enter later prompts as re-rendered text (context only, never scored).

GRPO over episodes: each episode has one return (algorithm.episode_return), baselined over the episodes of the
same question and given to every turn of the episode (`episode_advantages`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import contextlib
from dataclasses import dataclass, replace
import logging
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from sdpo.batch import RolloutBatch, pad_right
from sdpo.envs.base import Environment, Problem
from sdpo.envs.episode import Episode, Turn, step_episodes
from sdpo.losses import ADVANTAGE_ESTIMATORS, EPISODE_RETURNS
from sdpo.models import render_chat
from sdpo.rollout.base import Completion, RolloutEngine, SamplingSettings

log = logging.getLogger(__name__)

TURN_SEED_STRIDE = 100_003  # turn t samples with seed + t * stride: a fresh stream per turn


def render_context(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], max_len: int,
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> tuple[list[int], list[dict[str, str]]]:
    """The conversation as the model's next prompt, at most `max_len` tokens, and the messages it kept.

    The head (every message up to the first user message: system prompt and question) always stays; the exchanges
    after it (the model's answer and the reply to it) are evicted earliest first until the prompt fits."""
    messages = [dict(m) for m in messages]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError("a conversation needs a user message (the question)")
    head = users[0] + 1
    for drop in range(0, len(messages) - head + 1, 2):
        kept = messages[:head] + messages[head + drop:]
        ids = render_chat(tokenizer, kept, chat_template_kwargs)
        if len(ids) <= max_len:
            return ids, kept
    raise ValueError(f"the question alone is {len(ids)} tokens, over rollout.max_prompt_len={max_len}: raise it")


def rendered_prompts(tokenizer: PreTrainedTokenizerBase, problems: list[Problem], max_prompt_len: int,
                     chat_template_kwargs: Any = None) -> list[tuple[Problem, list[int]]]:
    """Each problem with its prompt rendered by the chat template, those longer than rollout.max_prompt_len dropped
    (and reported)."""
    rendered = [(p, render_chat(tokenizer, p.messages, chat_template_kwargs)) for p in problems]
    kept = [(p, ids) for p, ids in rendered if len(ids) <= max_prompt_len]
    if len(kept) < len(problems):
        log.warning("dropped %d of %d problems longer than rollout.max_prompt_len=%d tokens",
                    len(problems) - len(kept), len(problems), max_prompt_len)
    if problems and not kept:
        raise ValueError("every problem is longer than rollout.max_prompt_len: raise it")
    return kept


def episode_return(rewards: Sequence[float], mode: str, discount: float = 1.0) -> float:
    """One number for an episode's per-turn rewards (algorithm.episode_return)."""
    if not rewards:
        raise ValueError("an episode has at least one turn")
    return EPISODE_RETURNS.get(mode)(rewards, discount)


def episode_advantages(batch: RolloutBatch, norm_by_std: bool, estimator: str = "grpo") -> Tensor:
    """`algorithm.advantage_estimator` over episodes: each episode's return (a single-turn row's reward) against the
    other episodes of its question, given to every turn of the episode."""
    returns_E, groups_E, episode_B = batch.episodes()
    return ADVANTAGE_ESTIMATORS.get(estimator)(returns_E, groups_E, norm_by_std)[episode_B]


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    max_prompt_len: int  # the conversation shown at each turn (first-in-first-out eviction beyond it)
    success_threshold: float  # a turn at or above it ends its episode
    chat_template_kwargs: Mapping[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Any, max_turns: int | None = None) -> EpisodeLimits:
        return cls(max_turns or config.rollout.max_turns, config.rollout.max_prompt_len,
                   config.algorithm.reprompt.success_reward_threshold, config.model.chat_template_kwargs)

    @classmethod
    def one_turn(cls, success_threshold: float = 1.0) -> EpisodeLimits:
        """A single answer per episode: no conversation is rendered, so no prompt limit applies."""
        return cls(1, 0, success_threshold)


@dataclass
class TurnRow:
    """One model turn of one episode."""

    episode: int
    turn: int
    prompt_ids: list[int]
    context: Problem  # the problem with the messages the turn saw (the teacher's context starts from it)
    completion: Completion
    result: Turn


class EpisodeRollout:
    """G episodes per question, advanced one turn at a time: `begin`, then `next_turn` until `live` is empty."""

    def __init__(self, engine: RolloutEngine, env: Environment, tokenizer: PreTrainedTokenizerBase | None,
                 limits: EpisodeLimits, timer: Callable[[str], contextlib.AbstractContextManager] | None = None) -> None:
        self.engine, self.env, self.tokenizer, self.limits = engine, env, tokenizer, limits
        self.timer = timer or (lambda stage: contextlib.nullcontext())  # `generate` and `score` stages
        self.episodes: list[Episode] = []
        self.groups: list[int] = []
        self.rows: list[TurnRow] = []
        self._first_prompts: list[list[int]] = []
        self._n = 0

    def begin(self, problems: Sequence[Problem], prompt_ids: Sequence[list[int]], n: int) -> None:
        """n episodes per problem (problem-major); `prompt_ids` are the problems' rendered chats."""
        self.episodes = [Episode.start(p) for p in problems for _ in range(n)]
        self.groups = [q for q in range(len(problems)) for _ in range(n)]
        self._first_prompts, self._n, self.rows = [list(p) for p in prompt_ids], n, []

    @property
    def episodes_per_question(self) -> int:
        return self._n

    @property
    def live(self) -> list[int]:
        return [e for e, episode in enumerate(self.episodes) if not episode.done]

    def next_turn(self, sampling: SamplingSettings) -> list[TurnRow]:
        """Every live episode's next turn, generated in one engine call and scored in one `score_batch`."""
        live = self.live
        if not live:  # a sharded policy's generate is a collective: join the other ranks' call with nothing
            self.engine.generate([], replace(sampling, n=1))
            return []
        turn = len(self.episodes[live[0]].turns)
        if turn == 0:  # the single-turn call: n samples of each question's prompt
            prompts = self._first_prompts
            contexts = [self.episodes[e].problem for e in live]
            with self.timer("generate"):
                completions = self.engine.generate(prompts, replace(sampling, n=self._n))
            prompts = [prompts[c.prompt_index] for c in completions]
        else:
            rendered = [render_context(self.tokenizer, self.episodes[e].messages, self.limits.max_prompt_len,
                                       self.limits.chat_template_kwargs) for e in live]
            prompts = [ids for ids, _ in rendered]
            contexts = [replace(self.episodes[e].problem, messages=kept) for e, (_, kept) in zip(live, rendered)]
            seed = None if sampling.seed is None else sampling.seed + turn * TURN_SEED_STRIDE
            with self.timer("generate"):
                completions = self.engine.generate(prompts, replace(sampling, n=1, seed=seed))
        if len(completions) != len(live):
            raise RuntimeError(f"the engine returned {len(completions)} completions for {len(live)} live episodes")
        with self.timer("score"):
            results = step_episodes(self.env, [self.episodes[e] for e in live], [c.text for c in completions],
                                    [c.truncated for c in completions], self.limits.success_threshold,
                                    self.limits.max_turns)
        rows = [TurnRow(e, turn, p, ctx, c, r) for e, p, ctx, c, r in zip(live, prompts, contexts, completions, results)]
        self.rows += rows
        return rows

    def run(self, sampling: SamplingSettings, any_rank: Callable[[bool], bool] = bool) -> None:
        """Turns until no episode is live; sharded (`any_rank`: Distributed.any_rank), until none is on any rank."""
        while any_rank(bool(self.live)):
            self.next_turn(sampling)

    def batch(self, return_mode: str = "final", discount: float = 1.0) -> tuple[RolloutBatch, list[Problem]]:
        """Every turn so far as one row, group-major (question, then episode, then turn), and each row's context."""
        rows = sorted(self.rows, key=lambda r: (r.episode, r.turn))
        returns = {e: episode_return([t.reward for t in ep.turns], return_mode, discount)
                   for e, ep in enumerate(self.episodes) if ep.turns}
        completions = [r.completion for r in rows]
        has_logprobs = all(c.logprobs is not None for c in completions)
        batch = RolloutBatch(
            problem_ids=[r.context.id for r in rows],
            prompt_ids=[r.prompt_ids for r in rows],
            response_ids=[c.token_ids for c in completions],
            response_text=[c.text for c in completions],
            group_ids_B=torch.tensor([self.groups[r.episode] for r in rows], dtype=torch.long),
            truncated_B=torch.tensor([c.truncated for c in completions], dtype=torch.bool),
            sampler_logp_BR=pad_right([c.logprobs for c in completions], 0.0, torch.float32) if has_logprobs else None,
            episode_ids_B=torch.tensor([r.episode for r in rows], dtype=torch.long),
            turn_B=torch.tensor([r.turn for r in rows], dtype=torch.long),
            rewards_B=torch.tensor([r.result.reward for r in rows], dtype=torch.float32),
            feedback=[r.result.feedback for r in rows],
            returns_B=torch.tensor([returns[r.episode] for r in rows], dtype=torch.float32),
            data_context=[r.result.info.get("teacher_context") or r.context.teacher_context for r in rows],
        )
        return batch, [r.context for r in rows]


def run_episodes(engine: RolloutEngine, env: Environment, tokenizer: PreTrainedTokenizerBase | None,
                 problems: Sequence[Problem], prompt_ids: Sequence[list[int]], sampling: SamplingSettings,
                 limits: EpisodeLimits, any_rank: Callable[[bool], bool] = bool,
                 timer: Callable[[str], contextlib.AbstractContextManager] | None = None) -> EpisodeRollout:
    """`sampling.n` episodes per problem (its rendered chat in `prompt_ids`), run until none is live on any rank:
    every path that samples and scores (training, evaluation, the probe, test time) comes through here.
    `tokenizer` renders the conversation of later turns (None: one-turn episodes)."""
    rollout = EpisodeRollout(engine, env, tokenizer, limits, timer)
    rollout.begin(problems, prompt_ids, sampling.n)
    rollout.run(sampling, any_rank)
    return rollout


def episode_metrics(batch: RolloutBatch, success_threshold: float) -> dict[str, Tensor]:
    """Per-episode means of a multi-turn batch (none for a single-turn one)."""
    if batch.episode_ids_B is None:
        return {}
    _, episode_B = torch.unique(batch.episode_ids_B, return_inverse=True)
    count = int(episode_B.max()) + 1
    success_E = torch.zeros(count).index_add(0, episode_B, (batch.rewards_B >= success_threshold).float()).clamp(max=1)
    turns_E = torch.zeros(count).index_add(0, episode_B, torch.ones(len(batch)))
    returns_E = torch.zeros(count).scatter(0, episode_B, batch.returns_B.float())
    return {"episode/success": success_E.mean(), "episode/turns_mean": turns_E.mean(),
            "episode/return_mean": returns_E.mean(), "episode/first_turn_reward": batch.rewards_B[batch.turn_B == 0].mean()}
