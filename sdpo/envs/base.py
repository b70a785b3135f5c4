"""The environment interface: questions in, (reward, feedback text) per response out.

An environment owns its data loading and splits, its prompt formatting (chat messages) and its scoring. It knows
nothing about models or torch. Feedback text is a first-class value: scalar-only environments return "".
`score` handles one sample and must be picklable (it runs in worker processes); `score_batch` fans out through
`sdpo.envs.pool` with a per-sample timeout, so one slow or crashing sample never stalls training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from sdpo.config import EnvConfig
from sdpo.envs.problem import Problem, Score
from sdpo.envs.rows import DataError, MissingDataError, data_file, hub_rows, read_jsonl  # the errors: re-exported
from sdpo.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]


class Environment(ABC):
    """Subclass, set `config_class`, implement `load` and `score`; register with `@ENVIRONMENTS.register(name)`."""

    config_class: ClassVar[type[EnvConfig]] = EnvConfig
    # How `score_batch` runs `score` (see sdpo.envs.pool): "process" (killable workers, the safe default),
    # "thread", or "inline" for bounded string parsing.
    scoring_mode: ClassVar[str] = "process"

    # Where the full data set lives on the Hugging Face hub, for the missing-data message: (id, what to set).
    hub_hint: ClassVar[str | None] = None

    def __init__(self, config: EnvConfig) -> None:
        self.config = config

    @property
    def data_dir(self) -> Path:
        path = Path(self.config.data_dir).expanduser()
        return path if path.is_absolute() else (REPO_ROOT / path).resolve()

    def read_rows(self, relative: str, what: str, split: str | None = None) -> tuple[str | Path, Iterator[tuple[int, dict[str, Any]]]]:
        """(where, rows) of one data file: `relative` under `env.data_dir`, or, with `env.hub.id` set, the hub data
        set's `split` (None: `env.hub.split`, or its only split). `where` names the source in row errors; each row
        comes with its line (file) or row number (hub, from 1)."""
        if self.config.hub.id is not None:
            return hub_rows(self.config.hub, split, what)
        path = data_file(self.data_dir, relative, what, self.hub_hint)
        return path, read_jsonl(path)

    @abstractmethod
    def load(self, split: str) -> list[Problem]:
        """All problems of a split ("train" or "test" or an environment-specific name)."""

    @abstractmethod
    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        """Reward and feedback for one response. Runs in a worker: no shared state, no model."""

    def score_batch(self, problems: Sequence[Problem], responses: Sequence[str], truncated: Sequence[bool]) -> list[Score]:
        # Imported on first use: the pool's atexit hook and multiprocessing load only for a run that scores.
        from sdpo.envs.pool import score_in_pool

        return score_in_pool(self, problems, responses, truncated)

    def follow_up(self, problem: Problem, response: str, score: Score) -> str | dict[str, str] | None:
        """The message that answers a failed turn in a multi-turn episode (a user message, or a {role, content} dict
        such as a tool result), or None to end the episode. Runs in the trainer's process on the turn's `Score`,
        never on model code. The default ends every episode after one turn: single-turn environments
        (docs/multi_turn.md, sdpo/envs/episode.py)."""
        return None

    def failure_score(self, problem: Problem, reason: str) -> Score:
        """What a sample gets when its scorer timed out or crashed."""
        return Score(0.0, f"The attempt could not be evaluated: {reason}", {"status": "scorer_error"})


ENVIRONMENTS: Registry[type[Environment]] = Registry("environment")
