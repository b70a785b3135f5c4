"""`env.*`: the fields every environment has; each environment module registers a subclass with its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from sdpo.config.checks import ConfigError, check_range


@dataclass
class HubDatasetConfig:
    """`env.hub.*`: read the environment's rows from a Hugging Face dataset instead of the files under `env.data_dir`.

    For the full public data sets this repository does not ship (LiveCodeBench v6, SDPO's tool-use train split):
    `id` is a hub id, read through `datasets.load_dataset` and the hub's cache (so it also works offline once
    cached), or a local folder in the hub's layout (the repository's files, or a `save_to_disk` folder). The rows
    must have the fields the environment reads from its own files (docs/environments.md).
    """

    id: str | None = None
    # A commit, tag or branch of the hub repository: pin it for reproducible runs.
    revision: str | None = None
    # The data set's configuration (subset), e.g. "main" for openai/gsm8k.
    name: str | None = None
    # Files inside the repository, as `load_dataset(data_files=...)` takes them: a path, a list, or {split: paths}.
    data_files: Any = None
    # The split to read where the environment reads one file for all its splits (the code environments, which
    # split by themselves); None: the data set's only split. Environments with a file per split read theirs.
    split: str | None = None


@dataclass
class EnvConfig:
    """Fields every environment has; each environment subclasses this with its own."""

    # The Environment class; a researcher's own class works without editing the library.
    _target_: str = MISSING
    name: str = MISSING
    # Local data root; relative paths resolve against the repository root (default: the repository's data/ folder).
    data_dir: str = "data"
    hub: HubDatasetConfig = field(default_factory=HubDatasetConfig)
    train_split: str = "train"
    eval_split: str = "test"
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    # Scoring runs in a worker pool; one slow sample gets a failure result after this many seconds.
    score_workers: int = 2
    score_timeout_s: float = 30.0
    seed: int = 0
    # The environment's own correct response (its `reference_response`: arithmetic, convention, math, code datasets)
    # as each training question's teacher context (algorithm.reprompt.data_context); never shown to the student,
    # and held-out questions are never reprompted.
    reference_as_teacher_context: bool = False

    def __post_init__(self) -> None:
        check_range("env.score_workers", self.score_workers, 1)
        check_range("env.score_timeout_s", self.score_timeout_s, 0.0)
        if self.hub.id is None and any(v is not None for v in (self.hub.revision, self.hub.name, self.hub.data_files, self.hub.split)):
            raise ConfigError("env.hub.revision / name / data_files / split need env.hub.id (the data set to read)")
