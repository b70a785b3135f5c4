"""Episodes: an environment that answers each model turn (docs/multi_turn.md).

An episode starts from a question (`Episode.start`); after each model turn the environment returns a `Turn`: the
turn's reward and feedback (its `score`, run through the pooled, sandboxed `score_batch` like any single-turn
sample), whether the episode is done, and the next user or tool message (`Environment.follow_up`). An episode ends
at the first successful turn, when the environment has nothing more to say (`follow_up` returns None: every
single-turn environment, so their episodes are one turn long) or at the turn limit.

`Episode.messages` is the whole conversation; what the model sees of it at each turn (first-in-first-out eviction
at the context limit) is decided when it is rendered (`sdpo.rollout.episodes.render_context`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sdpo.envs.base import Environment, Problem


@dataclass
class Turn:
    """What the environment answered to one model turn."""

    reward: float
    feedback: str  # the env's feedback text on this turn ("" for scalar-only environments)
    done: bool  # no further model turn follows
    next_message: dict[str, str] | None  # the user / tool message that follows (None when done)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Episode:
    problem: Problem
    messages: list[dict[str, str]]  # the question's chat, then assistant / reply messages in turn
    turns: list[Turn] = field(default_factory=list)

    @classmethod
    def start(cls, problem: Problem) -> Episode:
        return cls(problem, [dict(m) for m in problem.messages])

    @property
    def done(self) -> bool:
        return bool(self.turns) and self.turns[-1].done


def as_message(reply: str | dict[str, str] | None) -> dict[str, str] | None:
    """`follow_up`'s answer as a chat message: a string is a user message."""
    if reply is None or isinstance(reply, dict):
        if reply is not None and not {"role", "content"} <= reply.keys():
            raise ValueError(f"follow_up returned {reply!r}: a message needs a 'role' and a 'content'")
        return reply
    return {"role": "user", "content": reply}


def step_episodes(env: Environment, episodes: Sequence[Episode], responses: Sequence[str], truncated: Sequence[bool],
                  success_threshold: float, max_turns: int) -> list[Turn]:
    """Score one model turn of each live episode together (the env's pooled scoring) and advance the episodes."""
    if any(e.done for e in episodes):
        raise ValueError("step_episodes got an episode that is already done")
    scores = env.score_batch([e.problem for e in episodes], responses, truncated)
    turns = []
    for episode, response, score in zip(episodes, responses, scores, strict=True):
        last = score.reward >= success_threshold or len(episode.turns) + 1 >= max_turns
        reply = None if last else as_message(env.follow_up(episode.problem, response, score))
        turn = Turn(score.reward, score.feedback, reply is None, reply, score.info)
        episode.messages.append({"role": "assistant", "content": response})
        if reply is not None:
            episode.messages.append(reply)
        episode.turns.append(turn)
        turns.append(turn)
    return turns
