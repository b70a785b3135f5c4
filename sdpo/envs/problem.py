"""The values an environment and its scoring pool pass around: a `Problem` in, a `Score` out.

A module of their own so that `sdpo.envs.base` (the Environment interface, which scores through the pool) and
`sdpo.envs.pool` (which calls `Environment.score`) both import them without importing each other. Import them from
`sdpo.envs` or `sdpo.envs.base`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    id: str
    messages: list[dict[str, str]]  # the chat the policy sees: optional system message, then the user question
    data: dict[str, Any] = field(default_factory=dict)  # what scoring needs (answer, tests, ...)
    # What only the self-teacher sees (a reference solution or a hint the data carries: "privileged" context, OPSD):
    # rendered into the reprompt (algorithm.reprompt.data_context), never into `messages`, so never into the
    # student's prompt or a rollout.
    teacher_context: str | None = None

    @property
    def question(self) -> str:
        """The last user message (the reprompt builder embeds this text)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class Score:
    reward: float
    feedback: str = ""
    # Small JSON-able facts for metrics and debugging, e.g. {"status": "wrong_answer", "passed": 3, "total": 5}.
    info: dict[str, Any] = field(default_factory=dict)
