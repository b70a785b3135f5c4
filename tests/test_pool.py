"""The scoring pool: per-sample timeouts, crashing workers, the inline/thread paths, and envs that pickle."""

from __future__ import annotations

from dataclasses import dataclass
import os
import pickle
import signal
import time

import pytest

from sdpo.config import EnvConfig
from sdpo.envs import ENVIRONMENTS
from sdpo.envs.base import Environment, Problem, Score
from sdpo.envs.pool import WorkerPool, score_in_pool


@dataclass
class ScriptedConfig(EnvConfig):
    _target_: str = "test_pool.ScriptedEnv"
    name: str = "scripted"
    score_timeout_s: float = 1.5


class ScriptedEnv(Environment):
    """Does what the response says: sleep, crash the worker, segfault, raise, or score 1 (with its pid)."""

    config_class = ScriptedConfig

    def load(self, split):
        return []

    def score(self, problem, response, truncated=False):
        if response == "sleep":
            time.sleep(1000)
        if response == "nap":  # threads cannot be killed: a stuck one would hold up interpreter exit
            time.sleep(2)
        if response == "exit":
            os._exit(3)
        if response == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if response == "raise":
            raise RuntimeError("scorer bug")
        return Score(1.0, "", {"pid": os.getpid()})


class ThreadScriptedEnv(ScriptedEnv):
    scoring_mode = "thread"


class InlineScriptedEnv(ScriptedEnv):
    scoring_mode = "inline"


PROBLEM = Problem("p", [{"role": "user", "content": "q"}])


def score(env, responses):
    return env.score_batch([PROBLEM] * len(responses), responses, [False] * len(responses))


def test_slow_and_crashing_samples_get_failure_scores_and_the_batch_goes_on():
    env = ScriptedEnv(ScriptedConfig(score_workers=2))
    responses = ["ok", "sleep", "ok", "exit", "segfault", "raise", "ok", "ok"]
    score(env, ["ok"])  # start the workers outside the timed part
    start = time.monotonic()
    scores = score(env, responses)
    elapsed = time.monotonic() - start
    assert [s.reward for s in scores] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert "timed out after 1.5 s" in scores[1].feedback
    assert "worker died (exit code 3)" in scores[3].feedback
    assert "worker died (exit code -11)" in scores[4].feedback
    assert "RuntimeError: scorer bug" in scores[5].feedback and "Traceback" not in scores[5].feedback
    assert all(s.info["status"] == "scorer_error" for s in scores if s.reward == 0.0)
    assert all("score_s" in s.info for s in scores)
    # One 1.5 s timeout plus replacement workers starting; far from "stalled".
    assert elapsed < 1.5 + 8.0
    again = score(env, ["ok"] * 4)
    assert [s.reward for s in again] == [1.0] * 4
    assert all(s.info["pid"] != os.getpid() for s in again)  # scored in worker processes


def test_pool_kills_the_timed_out_workers_process_group():
    env = ScriptedEnv(ScriptedConfig(score_workers=1))
    pool = WorkerPool(env, 1)
    pid = pool._workers[0].process.pid
    [result] = pool.score([(PROBLEM, "sleep", False)], 1.0, env.failure_score)
    assert result.reward == 0.0
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    pool.close()


@pytest.mark.parametrize("env_class", [ThreadScriptedEnv, InlineScriptedEnv])
def test_thread_and_inline_paths(env_class):
    env = env_class(ScriptedConfig(score_workers=2, score_timeout_s=0.5))
    responses = ["ok", "raise"] + (["nap"] if env_class is ThreadScriptedEnv else [])
    start = time.monotonic()
    scores = score(env, responses)
    assert [s.reward for s in scores] == [1.0] + [0.0] * (len(responses) - 1)
    assert scores[0].info["pid"] == os.getpid()
    assert time.monotonic() - start < 2.0
    if env_class is ThreadScriptedEnv:
        assert "timed out" in scores[2].feedback


def test_unknown_scoring_mode_is_rejected():
    env = ScriptedEnv(ScriptedConfig())
    env.scoring_mode = "gpu"
    with pytest.raises(ValueError, match="valid: process, thread, inline"):
        score_in_pool(env, [PROBLEM], ["ok"], [False])


@pytest.mark.parametrize("name", [n for n in ENVIRONMENTS.names()])
def test_every_registered_environment_pickles(name):
    cls = ENVIRONMENTS.get(name)
    env = cls(cls.config_class())
    clone = pickle.loads(pickle.dumps(env))
    assert type(clone) is cls and clone.config == env.config
