"""`env.*`: the fields every environment has; each environment module registers a subclass with its own."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from sdpo.config.checks import check_range


@dataclass
class EnvConfig:
    """Fields every environment has; each environment subclasses this with its own."""

    # The Environment class; a researcher's own class works without editing the library.
    _target_: str = MISSING
    name: str = MISSING
    # Local data root; relative paths resolve against the repository root (default: the repository's data/ folder).
    data_dir: str = "data"
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
