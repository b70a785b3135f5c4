"""Turning a group's results into the self-teacher's context (docs/algorithm.md §2): pure functions, no model.

`group_reprompts` builds one `Reprompt` per rollout, seeded per question; `teacher_prompt_ids` renders them into
token ids within `max_reprompt_len`. Both are functions of their arguments only (strings, a tokenizer, a seed key).

For each rollout y_i of a question x the teacher sees
    reprompt_template.format(prompt=x, solution=<a successful sibling and/or the data's context>,
                             feedback=<the env's feedback on y_i>)
as the last user message (system messages kept), and re-scores y_i's own tokens under it. y_i itself is never put in
the teacher's context (paper Table 6: adding it hurts) unless `include_own_attempt` asks for that ablation. A rollout
whose reprompt has neither a solution nor feedback gets no distillation signal (`has_signal` is False).

Teacher context from the data (`Problem.teacher_context`: a reference solution or hint only the teacher sees, what
the literature calls privileged information) goes through the solution slot (`solution_slot`), before or instead of
a sibling's answer as `algorithm.reprompt.data_context` says; it never reaches the student's prompt.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
import random
import re
from typing import Any

from transformers import PreTrainedTokenizerBase

from sdpo.config import RepromptConfig
from sdpo.envs.base import Problem
from sdpo.models import render_chat
from sdpo.teacher.choices import DATA_CONTEXT_ORDERS

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
    episode_ids: Sequence[int] | None = None,
) -> list[int | None]:
    """For each rollout, the index of a successful rollout of the same question (random among eligible), or None.

    With `episode_ids` (multi-turn rows), "self" is the rollout's whole episode: a turn learns from a sibling
    episode's success, not from its own episode's later one."""
    successes: dict[int, list[int]] = defaultdict(list)
    for i, (reward, group) in enumerate(zip(rewards, group_ids, strict=True)):
        if reward >= threshold:
            successes[group].append(i)
    owner = list(episode_ids) if episode_ids is not None else list(range(len(group_ids)))
    picks: list[int | None] = []
    for i, group in enumerate(group_ids):
        eligible = [j for j in successes[group] if not (exclude_self and owner[j] == owner[i])]
        picks.append(rng.choice(eligible) if eligible else None)
    return picks


@dataclass(frozen=True)
class Reprompt:
    """The teacher context of one rollout, before rendering with the chat template."""

    problem: Problem
    solution: str | None  # the demonstration text (a sibling's solution and/or the data's context), or None
    feedback: str | None  # the environment's feedback text, or None
    own_attempt: str | None = None  # the rollout's own response (include_own_attempt: an ablation), or None
    from_data: bool = False  # the solution slot holds the data's teacher context (algorithm.reprompt.data_context)

    @property
    def has_signal(self) -> bool:
        return self.solution is not None or self.feedback is not None

    def user_text(self, config: RepromptConfig, solution: str | None = None, feedback: str | None = None) -> str:
        """The reprompt as the new last user message; `solution` / `feedback` override the bodies (truncation)."""
        solution = self.solution if solution is None else solution
        feedback = self.feedback if feedback is None else feedback
        solution_part = "" if solution is None else config.solution_template.format(successful_previous_attempt=solution)
        feedback_part = "" if feedback is None else config.feedback_template.format(feedback_raw=feedback)
        if self.own_attempt is not None and self.has_signal:  # not shortened: the ablation runs short responses
            feedback_part = config.own_attempt_template.format(own_attempt=self.own_attempt) + feedback_part
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
    episode_ids: Sequence[int] | None = None,
    contexts: Sequence[str | None] | None = None,
) -> list[Reprompt]:
    """One `Reprompt` per rollout (group-major inputs, one entry per rollout; `episode_ids` for multi-turn rows;
    `contexts`: each rollout's teacher context from the data, by default its problem's)."""
    demos = pick_demonstrations(
        rewards, group_ids, config.success_reward_threshold, config.dont_reprompt_on_self_success, rng, episode_ids
    )
    contexts = [p.teacher_context for p in problems] if contexts is None else contexts
    reprompts = []
    for i, problem in enumerate(problems):
        sibling = None
        if demos[i] is not None and config.include_solution:
            sibling = responses[demos[i]]
            if config.remove_thinking_from_demonstration:
                sibling = strip_thinking(sibling)
        solution, from_data = solution_slot(sibling, contexts[i], config)
        env_feedback = feedback[i].strip() if feedback else ""
        use_feedback = (
            config.include_environment_feedback
            and bool(env_feedback)
            and not (config.environment_feedback_only_without_solution and solution is not None)
        )
        own_attempt = responses[i] if config.include_own_attempt else None
        reprompts.append(Reprompt(problem, solution, env_feedback if use_feedback else None, own_attempt, from_data))
    return reprompts


def solution_slot(sibling: str | None, context: str | None, config: RepromptConfig) -> tuple[str | None, bool]:
    """What fills the solution slot: a successful sibling's answer and/or the data's teacher context, as
    algorithm.reprompt.data_context orders them (`DATA_CONTEXT_ORDERS`); and whether the data's context is in it."""
    order = DATA_CONTEXT_ORDERS.get(config.data_context)
    if order is None or not (context and context.strip()):
        return sibling, False
    return order(sibling, config.data_context_template.format(context=context.strip()))


def group_reprompts(
    seed_key: str,
    config: RepromptConfig,
    problems: Sequence[Problem],
    responses: Sequence[str],
    rewards: Sequence[float],
    feedback: Sequence[str],
    group_ids: Sequence[int],
    episode_ids: Sequence[int] | None = None,
    contexts: Sequence[str | None] | None = None,
) -> list[Reprompt]:
    """One reprompt per rollout, question by question (multi-turn rows: one per turn, `episode_ids` naming episodes;
    `contexts`: each row's teacher context from the data). Each question's demonstration is drawn with a generator
    seeded by (`seed_key`, question id): the same choice however the groups are spread over processes, and no RNG
    state to checkpoint. The trainer's `seed_key` is "<trainer.seed>:<step>"."""
    rows_by_group: dict[int, list[int]] = defaultdict(list)
    for i, group in enumerate(group_ids):
        rows_by_group[group].append(i)
    reprompts: list[Reprompt | None] = [None] * len(problems)
    for rows in rows_by_group.values():
        rng = random.Random(f"{seed_key}:{problems[rows[0]].id}")
        picked = build_reprompts([problems[i] for i in rows], [responses[i] for i in rows], [rewards[i] for i in rows],
                                 [feedback[i] for i in rows], [group_ids[i] for i in rows], config, rng,
                                 None if episode_ids is None else [episode_ids[i] for i in rows],
                                 None if contexts is None else [contexts[i] for i in rows])
        for i, reprompt in zip(rows, picked, strict=True):
            reprompts[i] = reprompt
    return reprompts  # type: ignore[return-value]


def fit_bodies(
    solution: str | None,
    feedback: str | None,
    budget: int,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
) -> tuple[str | None, str | None]:
    """Shorten the demonstration and the feedback (never the question or the instruction) to `budget` tokens.

    The public code truncates the whole reprompt from the right, which can cut the closing instruction and the
    assistant header (docs/algorithm.md §9). Here the budget is shared: the shorter body keeps all of its tokens if it
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
    solution_fraction: float  # rollouts whose reprompt carries a sibling solution (or the data's context)
    data_context_fraction: float  # rollouts whose reprompt carries the data's teacher context


def reprompt_stats(reprompts: Sequence[Reprompt], rewards: Sequence[float], group_ids: Sequence[int], threshold: float) -> RepromptStats:
    n = max(len(reprompts), 1)
    groups = set(group_ids)
    solved = {g for g, r in zip(group_ids, rewards) if r >= threshold}
    return RepromptStats(
        success_group_fraction=len(solved) / max(len(groups), 1),
        reprompt_fraction=sum(r.has_signal for r in reprompts) / n,
        feedback_fraction=sum(r.feedback is not None for r in reprompts) / n,
        solution_fraction=sum(r.solution is not None for r in reprompts) / n,
        data_context_fraction=sum(r.from_data for r in reprompts) / n,
    )


def teacher_prompt_ids(
    reprompts: Sequence[Reprompt],
    student_prompt_ids: Sequence[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    config: RepromptConfig,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """Render each reprompt with the chat template (and `model.chat_template_kwargs`) within `max_reprompt_len`
    tokens.

    Only the demonstration and the feedback are shortened; the question, the instruction and the assistant header
    stay intact, and a reprompt that cannot fit even without them is an error that says so. Rollouts without a
    signal keep their student prompt (their distillation loss is masked anyway).
    """

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids)

    limit = config.max_reprompt_len
    out = []
    for reprompt, student_ids in zip(reprompts, student_prompt_ids, strict=True):
        if not reprompt.has_signal:
            out.append(list(student_ids))
            continue
        ids = render_chat(tokenizer, reprompt.messages(config), chat_template_kwargs)
        if len(ids) > limit:
            empty = {"solution": None if reprompt.solution is None else "",
                     "feedback": None if reprompt.feedback is None else ""}
            bare = render_chat(tokenizer, reprompt.messages(config, **empty), chat_template_kwargs)
            if len(bare) > limit:
                raise ValueError(f"a reprompt without its demonstration and feedback is {len(bare)} tokens, over "
                                 f"algorithm.reprompt.max_reprompt_len={limit}: raise it (the question, the "
                                 f"instruction and the chat header are never cut; problem {reprompt.problem.id!r})")
            budget = limit - len(bare)
            # Token boundaries can merge differently once the bodies are cut and re-rendered: tighten and retry,
            # and if that does not converge, keep the bodies empty (which fits, checked above).
            for _ in range(4):
                solution, feedback = fit_bodies(reprompt.solution, reprompt.feedback, budget, encode, decode)
                ids = render_chat(tokenizer, reprompt.messages(config, solution, feedback), chat_template_kwargs)
                if len(ids) <= limit:
                    break
                budget -= len(ids) - limit
            else:
                ids = bare
        out.append(ids)
    return out
