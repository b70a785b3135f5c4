"""Scoring with a per-sample timeout: one slow or crashing sample never stalls or kills the trainer.

`score_in_pool` is what `Environment.score_batch` calls. How it runs depends on the environment's
`scoring_mode` class attribute (default "process"):

- "process": a persistent pool of `env.config.score_workers` worker processes (spawned, so that nothing of the
  trainer's CUDA or thread state is forked). Each sample has `env.config.score_timeout_s` from the moment a worker
  picks it up. A worker that overruns is killed with its whole process group (and so its sandboxes) and replaced;
  a worker that dies (segfault, os._exit, OOM kill) is replaced too. Either way the sample gets
  `env.failure_score(...)` and the rest of the batch goes on.
- "thread": threads in this process; the trainer stops waiting after the timeout, but the stuck call cannot be
  stopped (and holds up interpreter exit until it returns). For scorers that may be slow but cannot hang for good.
- "inline": in the calling thread, exceptions turned into failure scores. For scorers that are pure, bounded
  string parsing (no timeout can apply).

Every returned Score carries `info["score_s"]`, the seconds its scoring took; one whose scorer raised carries the
exception as `info["raised"]`. A batch where the scorer raised on some samples logs one warning (the tracebacks go
to the log file); a batch where it raised on every sample is a `ScoringError`: a reward function or scorer that
fails on everything is broken, and training on all-zero rewards would only hide it.
"""

from __future__ import annotations

import atexit
import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
import multiprocessing as mp
from multiprocessing.connection import Connection, wait
import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any, Protocol
import weakref

from sdpo.config import EnvConfig
from sdpo.envs.problem import Problem, Score

SCORING_MODES = ("process", "thread", "inline")
_STARTUP_TIMEOUT_S = 120.0
log = logging.getLogger(__name__)
FILE_ONLY = {"terminal": False}  # sdpo.console.FILE_ONLY: tracebacks for the log file only
_pools: weakref.WeakKeyDictionary[Any, WorkerPool] = weakref.WeakKeyDictionary()


class Scorer(Protocol):
    """What the pool uses of an `sdpo.envs.base.Environment` (not imported here: base imports this module), besides
    the optional class attribute `scoring_mode`."""

    config: EnvConfig

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score: ...

    def failure_score(self, problem: Problem, reason: str) -> Score: ...


def score_in_pool(env: Scorer, problems: Sequence[Problem], responses: Sequence[str], truncated: Sequence[bool]) -> list[Score]:
    tasks = list(zip(problems, responses, truncated, strict=True))
    mode = getattr(env, "scoring_mode", "process")
    if mode not in SCORING_MODES:
        raise ValueError(f"{type(env).__name__}.scoring_mode={mode!r}; valid: {', '.join(SCORING_MODES)}")
    if not tasks:
        return []
    if mode == "inline":
        scores = [_score_here(env, *task) for task in tasks]
    elif mode == "thread":
        scores = _score_in_threads(env, tasks)
    else:
        pool = _pools.get(env)
        if pool is None:
            pool = _pools[env] = WorkerPool(env, env.config.score_workers)
        scores = pool.score(tasks, env.config.score_timeout_s, env.failure_score)
    _check_raised(env, scores)
    return scores


class ScoringError(RuntimeError):
    """The scorer (a reward function, an environment's `score`) raised on every sample of a batch."""


def _check_raised(env: Scorer, scores: list[Score]) -> None:
    raised = [s.info["raised"] for s in scores if "raised" in s.info]
    if not raised:
        return
    what = getattr(getattr(env, "rewards", None), "names", None)
    scorer = f"reward function(s) {', '.join(what)}" if what else f"{type(env).__name__}.score"
    if len(raised) == len(scores):
        raise ScoringError(f"{scorer} raised on all {len(scores)} completions of the batch, the first with {raised[0]}: "
                           "fix it (the tracebacks are in the run's log file); a completion it cannot score should "
                           "get 0 or None, not an exception")
    log.warning("%s raised on %d of %d completions (reward 0 each), the first with %s; tracebacks in the log file",
                scorer, len(raised), len(scores), raised[0])


def _score_here(env: Scorer, problem: Problem, response: str, truncated: bool) -> Score:
    start = time.monotonic()
    try:
        score = env.score(problem, response, truncated)
    except Exception as exc:  # noqa: BLE001 - one broken sample must not kill training (a broken batch does)
        log.warning("scoring %s raised:\n%s", problem.id, traceback.format_exc(limit=-5), extra=FILE_ONLY)
        score = env.failure_score(problem, f"{type(exc).__name__}: {exc}")
        score.info["raised"] = f"{type(exc).__name__}: {exc}"
    score.info["score_s"] = time.monotonic() - start
    return score


def _score_in_threads(env: Scorer, tasks: list[tuple]) -> list[Score]:
    timeout = env.config.score_timeout_s
    executor = ThreadPoolExecutor(max_workers=env.config.score_workers)
    try:
        futures = [executor.submit(_score_here, env, *task) for task in tasks]
        scores = []
        for (problem, _, _), future in zip(tasks, futures):
            try:
                # Waited for in order: each sample gets at least `timeout` once the ones before it are settled.
                scores.append(future.result(timeout=timeout))
            except FutureTimeout:
                scores.append(_failure(env.failure_score, problem, f"scoring timed out after {timeout:g} s", timeout))
        return scores
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _failure(failure_score, problem: Problem, reason: str, seconds: float) -> Score:
    score = failure_score(problem, reason)
    score.info["score_s"] = seconds
    return score


# ---------------------------------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, context: Any, env_bytes: bytes) -> None:
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn, env_bytes), daemon=True)
        self.process.start()
        child_conn.close()
        self.task: int | None = None  # index of the sample it is scoring
        self.started = 0.0
        self.ready = False  # set once it has imported and unpickled the environment

    def wait_ready(self, timeout: float = _STARTUP_TIMEOUT_S) -> None:
        """Startup (imports, unpickling) is not charged to the first sample's timeout."""
        if not self.ready and self.conn.poll(timeout):
            try:
                self.conn.recv()
            except (EOFError, OSError):
                pass  # it died while starting: the task sent next fails as a dead worker
        self.ready = True

    def kill(self) -> None:
        # The worker leads its own process group (see _worker_main): this also ends the programs it started.
        for kill in (lambda: os.killpg(self.process.pid, signal.SIGKILL), self.process.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError, OSError):
                pass
        self.process.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """Worker processes holding one unpickled copy of the environment each; restarted when killed or dead."""

    def __init__(self, env: Scorer, workers: int, start_method: str = "spawn") -> None:
        self._env_bytes = pickle.dumps(env)  # fails here, clearly, for an environment that does not pickle
        self._context = mp.get_context(start_method)
        self._workers = [_Worker(self._context, self._env_bytes) for _ in range(workers)]
        weakref.finalize(self, WorkerPool._close_all, self._workers)

    def score(self, tasks: list[tuple], timeout: float, failure_score) -> list[Score]:
        results: list[Score | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        while pending or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.task is None and pending:
                    self._assign(worker, pending.popleft(), tasks)
            busy = [w for w in self._workers if w.task is not None]
            next_deadline = min(w.started + timeout for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
            for worker in busy:
                index = worker.task
                problem = tasks[index][0]
                if worker.conn in ready:
                    results[index] = self._receive(worker, problem, failure_score)
                elif time.monotonic() >= worker.started + timeout:
                    reason = f"scoring timed out after {timeout:g} s"
                    results[index] = _failure(failure_score, problem, reason, time.monotonic() - worker.started)
                    self._replace(worker)
        return results  # type: ignore[return-value]

    def _assign(self, worker: _Worker, index: int, tasks: list[tuple]) -> None:
        worker.wait_ready()
        worker.task, worker.started = index, time.monotonic()
        try:
            worker.conn.send((index, *tasks[index]))
        except (OSError, ValueError):  # died while idle: replace it and try once more
            self._replace(worker)
            worker = next(w for w in self._workers if w.task is None)
            worker.wait_ready()
            worker.task, worker.started = index, time.monotonic()
            worker.conn.send((index, *tasks[index]))

    def _receive(self, worker: _Worker, problem: Problem, failure_score) -> Score:
        elapsed = time.monotonic() - worker.started
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=1)
            code = worker.process.exitcode
            self._replace(worker)
            return _failure(failure_score, problem, f"the scoring worker died (exit code {code})", elapsed)
        worker.task = None
        if kind == "error":
            reason, trace = payload
            log.warning("scoring %s raised:\n%s", problem.id, trace, extra=FILE_ONLY)
            score = _failure(failure_score, problem, reason, elapsed)
            score.info["raised"] = reason
            return score
        payload.info["score_s"] = elapsed
        return payload

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._context, self._env_bytes)

    def close(self) -> None:
        WorkerPool._close_all(self._workers)

    @staticmethod
    def _close_all(workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.process.is_alive():
                try:
                    worker.conn.send(None)
                except (OSError, ValueError):
                    pass
        for worker in workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.kill()


def _exit_with_parent(parent: int) -> None:
    """A worker whose trainer died (killed, crashed) ends itself and its sandboxes instead of waiting forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.killpg(0, signal.SIGKILL)


def _worker_main(conn: Connection, env_bytes: bytes) -> None:
    parent = os.getppid()
    os.setsid()  # its own process group, so that a kill reaches whatever it started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    env = pickle.loads(env_bytes)
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, problem, response, truncated = message
        try:
            reply = ("ok", env.score(problem, response, truncated))
        except Exception as exc:  # noqa: BLE001 - reported as this sample's failure
            reply = ("error", (f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=-5)))
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send(("error", (f"the score could not be sent back: {exc}", "")))


@atexit.register
def _close_pools() -> None:
    for pool in list(_pools.values()):
        pool.close()
