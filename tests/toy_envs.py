"""A toy environment for trainer tests: the tiny random model's outputs get both rewards and feedback.

Also the example of a researcher's own environment: configs point at it with `env._target_`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdpo.config import EnvConfig
from sdpo.envs.base import Environment, Problem, Score


@dataclass
class ParityEnvConfig(EnvConfig):
    _target_: str = "toy_envs.ParityEnv"
    name: str = "parity"
    num_questions: int = 6


class ParityEnv(Environment):
    """Reward 1 when the response has an even number of characters; feedback on odd ones."""

    config_class = ParityEnvConfig

    def load(self, split: str) -> list[Problem]:
        return [
            Problem(id=f"{split}-{i}", messages=[{"role": "user", "content": f"Say something of even length ({i})."}])
            for i in range(self.config.num_questions)
        ]

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        if len(response) % 2 == 0:
            return Score(1.0, "", {"status": "correct", "answer": len(response) % 2})
        return Score(0.0, f"The response has {len(response)} characters, an odd number.", {"status": "wrong", "answer": 1})
