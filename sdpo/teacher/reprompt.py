"""Turning a group's results into the self-teacher's context (spec section 2). Pure functions over strings.

For each rollout y_i of a question x the teacher sees
    reprompt_template.format(prompt=x, solution=<a successful sibling>, feedback=<the env's feedback on y_i>)
as the last user message (system messages kept), and re-scores y_i's own tokens under it. y_i itself is never put in
the teacher's context (paper Table 6: adding it hurts). A rollout whose reprompt has neither a solution nor
feedback gets no distillation signal (`has_signal` is False).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import random
import re

from sdpo.config import RepromptConfig
from sdpo.envs.base import Problem

_THINKING = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)
TRUNCATION_MARK = "\n[...truncated...]\n"


def strip_thinking(text: str) -> str:
    """Drop <think>...</think> blocks (and an unterminated trailing one) from a demonstration."""
    text = _THINKING.sub("", text)
    return text.split("<think>", 1)[0] if "<think>" in text else text


def pick_demonstrations(
    rewards: Sequence[float],
    group_ids: Sequence[int],
    threshold: float,
    exclude_self: bool,
    rng: random.Random,
) -> list[int | None]:
    """For each rollout, the index of a successful rollout of the same question (random among eligible), or None."""
    successes: dict[int, list[int]] = defaultdict(list)
    for i, (reward, group) in enumerate(zip(rewards, group_ids, strict=True)):
        if reward >= threshold:
            successes[group].append(i)
    picks: list[int | None] = []
    for i, group in enumerate(group_ids):
        eligible = [j for j in successes[group] if not (exclude_self and j == i)]
        picks.append(rng.choice(eligible) if eligible else None)
    return picks


@dataclass(frozen=True)
class Reprompt:
    """The teacher context of one rollout, before rendering with the chat template."""

    problem: Problem
    solution: str | None  # the demonstration text, or None
    feedback: str | None  # the environment's feedback text, or None

    @property
    def has_signal(self) -> bool:
        return self.solution is not None or self.feedback is not None

    def user_text(self, config: RepromptConfig, solution: str | None = None, feedback: str | None = None) -> str:
        """The reprompt as the new last user message; `solution` / `feedback` override the bodies (truncation)."""
        solution = self.solution if solution is None else solution
        feedback = self.feedback if feedback is None else feedback
        solution_part = "" if solution is None else config.solution_template.format(successful_previous_attempt=solution)
        feedback_part = "" if feedback is None else config.feedback_template.format(feedback_raw=feedback)
        return config.reprompt_template.format(prompt=self.problem.question, solution=solution_part, feedback=feedback_part)

    def messages(self, config: RepromptConfig, solution: str | None = None, feedback: str | None = None) -> list[dict[str, str]]:
        """The problem's chat with its last user message replaced by the reprompt."""
        messages = [dict(m) for m in self.problem.messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = self.user_text(config, solution, feedback)
        return messages[: last_user + 1]


def build_reprompts(
    problems: Sequence[Problem],
    responses: Sequence[str],
    rewards: Sequence[float],
    feedback: Sequence[str],
    group_ids: Sequence[int],
    config: RepromptConfig,
    rng: random.Random,
) -> list[Reprompt]:
    """One `Reprompt` per rollout (group-major inputs, one entry per rollout)."""
    demos = pick_demonstrations(
        rewards, group_ids, config.success_reward_threshold, config.dont_reprompt_on_self_success, rng
    )
    reprompts = []
    for i, problem in enumerate(problems):
        solution = None
        if demos[i] is not None:
            solution = responses[demos[i]]
            if config.remove_thinking_from_demonstration:
                solution = strip_thinking(solution)
        env_feedback = feedback[i].strip() if feedback else ""
        use_feedback = (
            config.include_environment_feedback
            and bool(env_feedback)
            and not (config.environment_feedback_only_without_solution and solution is not None)
        )
        reprompts.append(Reprompt(problem, solution, env_feedback if use_feedback else None))
    return reprompts


def fit_bodies(
    solution: str | None,
    feedback: str | None,
    budget: int,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
) -> tuple[str | None, str | None]:
    """Shorten the demonstration and the feedback (never the question or the instruction) to `budget` tokens.

    The public code truncates the whole reprompt from the right, which can cut the closing instruction and the
    assistant header (spec section 9). Here the budget is shared: the shorter body keeps all of its tokens if it
    fits in half, the longer one gets the rest; each truncated body keeps its beginning and ends with a mark.
    """
    bodies = {"solution": solution, "feedback": feedback}
    tokens = {k: encode(v) for k, v in bodies.items() if v is not None}
    if sum(len(t) for t in tokens.values()) <= budget:
        return solution, feedback
    mark_len = len(encode(TRUNCATION_MARK))
    budget = max(0, budget - mark_len * len(tokens))
    allowance: dict[str, int] = {}
    remaining, left = budget, sorted(tokens, key=lambda k: len(tokens[k]))
    while left:
        key = left.pop(0)
        share = remaining // (len(left) + 1)
        allowance[key] = min(len(tokens[key]), share)
        remaining -= allowance[key]
    out = dict(bodies)
    for key, ids in tokens.items():
        if len(ids) > allowance[key]:
            out[key] = decode(ids[: allowance[key]]) + TRUNCATION_MARK
    return out["solution"], out["feedback"]


@dataclass
class RepromptStats:
    success_group_fraction: float  # questions with at least one successful rollout
    reprompt_fraction: float  # rollouts that get a distillation signal
    feedback_fraction: float  # rollouts whose reprompt carries environment feedback
    solution_fraction: float  # rollouts whose reprompt carries a sibling solution


def reprompt_stats(reprompts: Sequence[Reprompt], rewards: Sequence[float], group_ids: Sequence[int], threshold: float) -> RepromptStats:
    n = max(len(reprompts), 1)
    groups = set(group_ids)
    solved = {g for g, r in zip(group_ids, rewards) if r >= threshold}
    return RepromptStats(
        success_group_fraction=len(solved) / max(len(groups), 1),
        reprompt_fraction=sum(r.has_signal for r in reprompts) / n,
        feedback_fraction=sum(r.feedback is not None for r in reprompts) / n,
        solution_fraction=sum(r.solution is not None for r in reprompts) / n,
    )
