"""Reward functions in TRL's style, with feedback: `fn(prompts, completions, **columns) -> list`.

A reward function gets lists (here of one entry each: every completion is scored on its own, so that a timeout or
an exception costs one sample only): `prompts` (the dataset's prompt: text, or a list of chat messages),
`completions` (text; for chat prompts `[{"role": "assistant", "content": text}]`, as TRL passes them) and every
other dataset column as a keyword argument (a list of that row's value). A function that names a column in its
signature gets it; one that takes `**kwargs` gets them all. Each entry of the result is

- a number (or None: "not applicable", counted as 0): a scalar reward, no feedback;
- a `(reward, feedback)` tuple: the feedback text goes to SDPO's self-teacher;
- a `Score(reward, feedback, info)`.

Several functions add up with weights (`env.reward_weights`, default 1 each); their feedback texts are joined.
Built-in rewards by name: `math_verify` and `exact_match`, both against `env.answer_column`; `module:function`
names a researcher's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import importlib
import inspect
import numbers
import pickle
from typing import Any

from sdpo.config import ConfigError
from sdpo.envs.base import Score
from sdpo.registry import Registry

RewardFunction = Callable[..., Sequence[Any]]
_NOT_COLUMNS = {"prompts", "completions"}


def reward_name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def completion_text(completion: Any) -> str:
    """The text of a completion as reward functions receive it (plain text, or TRL's chat form)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


class _AnswerReward:
    """A built-in reward against one answer column: `rate` scores each completion's text against its row's answer."""

    def __init__(self, column: str) -> None:
        self.required_columns = [column]

    def __call__(self, prompts: list, completions: list, **columns: list) -> list[tuple[float, str]]:
        answers = columns[self.required_columns[0]]
        return [self.rate(completion_text(c), str(gold)) for c, gold in zip(completions, answers, strict=True)]

    def rate(self, text: str, gold: str) -> tuple[float, str]:
        raise NotImplementedError


class MathVerify(_AnswerReward):
    """1 when math-verify finds the completion's final answer equivalent to the answer column; feedback when the
    completion has no answer at all (never the gold answer)."""

    __name__ = "math_verify"

    def rate(self, text: str, gold: str) -> tuple[float, str]:
        from sdpo.envs.math import NO_ANSWER_FEEDBACK, verify_answer

        predicted, correct = verify_answer(text, gold)
        return (float(correct), "") if predicted else (0.0, NO_ANSWER_FEEDBACK)


class ExactMatch(_AnswerReward):
    """1 when the completion (its <think> part dropped, surrounding space and case ignored) equals the answer
    column; feedback on a miss says an exact answer alone is expected (never the answer)."""

    __name__ = "exact_match"

    def rate(self, text: str, gold: str) -> tuple[float, str]:
        if text.rsplit("</think>", 1)[-1].strip().casefold() == gold.strip().casefold():
            return 1.0, ""
        return 0.0, "The response is not the expected answer: reply with the exact answer only."


REWARDS: Registry[Callable[[str], RewardFunction]] = Registry("reward function")
REWARDS.register("math_verify")(MathVerify)
REWARDS.register("exact_match")(ExactMatch)


def resolve_reward(name: str, answer_column: str) -> RewardFunction:
    """A built-in reward by name, or `module:function` (a function, or any callable attribute, of an importable
    module)."""
    if ":" not in name:
        if name not in REWARDS:
            raise ConfigError(f"env.rewards: unknown reward {name!r}; built-in: {', '.join(REWARDS.names())}, "
                              "or module:function for your own")
        return REWARDS.get(name)(answer_column)
    module_name, _, attribute = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"env.rewards: cannot import module {module_name!r} of {name!r} ({exc}); is it on "
                          "PYTHONPATH?") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"env.rewards: module {module_name!r} has no {attribute!r}") from None
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"env.rewards: {name!r} is not callable")
    return obj


def qualified_name(fn: Any) -> str:
    """`module:function` of a reward function (what a config records for it)."""
    return f"{getattr(fn, '__module__', type(fn).__module__)}:{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def required_columns(fn: RewardFunction) -> list[str]:
    """The dataset columns a reward function cannot run without: its parameters without defaults."""
    if hasattr(fn, "required_columns"):
        return list(fn.required_columns)
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in _NOT_COLUMNS]


def _column_kwargs(fn: RewardFunction, columns: dict[str, list]) -> dict[str, list]:
    """The columns `fn` accepts: all of them with **kwargs, else those it names."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it everything
        return columns
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return columns
    named = {p.name for p in parameters}
    return {k: v for k, v in columns.items() if k in named}


def why_not_in_processes(funcs: Sequence[RewardFunction]) -> str | None:
    """Why these functions cannot run in worker processes (None when they can).

    A worker process receives each function by pickling, which works for functions of importable modules only:
    not lambdas or closures, nor functions defined in a notebook or a script's `__main__`.
    """
    for fn in funcs:
        module = getattr(fn, "__module__", None) or type(fn).__module__
        if module == "__main__":
            return f"{reward_name(fn)} is defined in __main__ (a notebook or a script)"
        try:
            pickle.dumps(fn)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means: threads
            return f"{reward_name(fn)} cannot be pickled ({type(exc).__name__})"
    return None


def _as_score(value: Any, name: str) -> Score:
    """One entry of a reward function's result as a Score (reward None: not applicable, 0)."""
    if isinstance(value, Score):
        return value
    if value is None or isinstance(value, numbers.Real):
        return Score(0.0 if value is None else float(value))
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], numbers.Real | None)
            and isinstance(value[1], str | None)):
        return Score(0.0 if value[0] is None else float(value[0]), value[1] or "")
    raise TypeError(f"reward function {name} returned {value!r}: expected a number, None, a (reward, feedback) "
                    "tuple or an sdpo.Score")


class Rewards:
    """Several reward functions with weights, scoring one completion at a time. Picklable when its functions are."""

    def __init__(self, funcs: Sequence[RewardFunction], weights: Sequence[float] | None = None) -> None:
        weights = [1.0] * len(funcs) if weights is None else list(weights)
        if len(weights) != len(funcs):
            raise ConfigError(f"env.reward_weights has {len(weights)} entries for {len(funcs)} reward functions")
        for fn in funcs:
            if not callable(fn):
                raise TypeError(f"reward function {fn!r} is not callable")
        self.funcs, self.weights = list(funcs), weights

    @property
    def names(self) -> list[str]:
        return [reward_name(fn) for fn in self.funcs]

    def required_columns(self) -> dict[str, list[str]]:
        return {reward_name(fn): required_columns(fn) for fn in self.funcs}

    def score(self, prompt: Any, completion: Any, columns: dict[str, Any]) -> Score:
        """The weighted sum of the functions' rewards, their feedback texts joined, each reward in info."""
        total, feedback, info = 0.0, [], {}
        lists = {k: [v] for k, v in columns.items()}
        for fn, weight in zip(self.funcs, self.weights, strict=True):
            name = reward_name(fn)
            values = fn(prompts=[prompt], completions=[completion], **_column_kwargs(fn, lists))
            if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) != 1:
                raise TypeError(f"reward function {name} returned {values!r}: expected a list with one entry per "
                                "completion")
            score = _as_score(values[0], name)
            total += weight * score.reward
            if score.feedback.strip():
                feedback.append(score.feedback.strip())
            info |= score.info
            info[f"reward/{name}"] = score.reward
        return Score(total, "\n\n".join(feedback), info)
