"""Scoring with a per-sample timeout in a pool of workers.

A worker that exceeds `score_timeout_s` or raises gives that sample `Environment.failure_score`; the trainer
never waits longer than the timeout for any sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdpo.envs.base import Environment, Problem, Score


def score_in_pool(env: Environment, problems: Sequence[Problem], responses: Sequence[str], truncated: Sequence[bool]) -> list[Score]:
    timeout = env.config.score_timeout_s
    pool = ThreadPoolExecutor(max_workers=env.config.score_workers)
    try:
        futures = [pool.submit(env.score, p, r, t) for p, r, t in zip(problems, responses, truncated, strict=True)]
        deadline = time.monotonic() + timeout
        scores = []
        for problem, future in zip(problems, futures):
            try:
                scores.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                scores.append(env.failure_score(problem, f"scoring timed out after {timeout:g} s"))
            except Exception as exc:  # noqa: BLE001 - a broken scorer must not kill training
                scores.append(env.failure_score(problem, f"{type(exc).__name__}: {exc}"))
        return scores
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
