"""The step's rollouts, collected when the step needs them (rollout.async_steps=0) or k steps ahead.

With `async_steps=k` the batch of step t + k is collected in a background thread while step t updates, by the
weights the engine holds then (those of step t): one generation overlaps one update, and batch s is used k steps
after the weights that sampled it (the first k batches: fewer). The schedule, per step t:

    take(t): launch the batches up to t + k (in order; each draws its questions and seed as step s would), wait
             for batch t, return it                            -> teacher context, update (batch t + k generates)
    drain(): wait for the launched batches                     -> then the weight sync (version t + 1)

so a generation never spans a weight sync and every batch is sampled by exactly one version: which one depends on
the schedule, never on timing, so an async run reproduces. Staleness is logged per step (`rollout/staleness`: the
step minus the version that sampled the batch, as the engine reports it where it does), and the learner's truncated
IS against the sampler's log-probs (`sampler_logp_BR`) corrects the update for it.

Only an engine that generates in another process (`RolloutEngine.out_of_process`: the vLLM server) can overlap; the
config refuses async_steps > 0 otherwise. A checkpoint keeps the question sampler as of the batches already used, so
a resumed run collects the pending batches again, from the same questions and seeds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sdpo.batch import RolloutBatch
from sdpo.envs import Problem
from sdpo.envs.sampler import QuestionSampler
from sdpo.rollout.collector import Collector
from sdpo.tracking import StageTimer

Collected = tuple[RolloutBatch, list[Problem], dict[str, float]]


@dataclass
class Pending:
    step: int  # the step that will use the batch
    version: int  # the step whose weights the engine held at launch (the trainer's side of the version)
    sampler_state: dict[str, int]  # the question sampler before the batch drew its questions
    future: Future


class RolloutsAhead:
    """`take(step)` the step's rollouts; `drain()` before every weight sync. `state_dict` stands for the question
    sampler in checkpoints (its state before the pending batches)."""

    def __init__(self, collector: Collector, sampler: QuestionSampler, draw: Callable[[], list[Problem]],
                 async_steps: int, total_steps: int, timer: StageTimer) -> None:
        self.collector, self.sampler, self.draw = collector, sampler, draw
        self.async_steps, self.total_steps, self.timer = async_steps, total_steps, timer
        self.pending: deque[Pending] = deque()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdpo-rollouts-ahead") if async_steps else None

    def take(self, step: int) -> Collected:
        if not self.async_steps:  # the synchronous loop: generate, then update
            batch, problems_B, metrics = self.collector.collect(self.draw(), step)
            return batch, problems_B, metrics | self._versions(metrics, step, step)
        launched = self.pending[-1].step + 1 if self.pending else step
        for ahead in range(launched, min(step + self.async_steps, self.total_steps - 1) + 1):
            self._launch(ahead, step)
        pending = self.pending.popleft()
        assert pending.step == step, f"rollouts ahead out of order: batch of step {pending.step} at step {step}"
        with self.timer("rollout_wait"):  # what the overlap did not hide
            batch, problems_B, metrics = pending.future.result()
        return batch, problems_B, metrics | self._versions(metrics, step, pending.version)

    def _launch(self, step: int, version: int) -> None:
        state = self.sampler.state_dict()
        problems = self.draw()
        assert self._worker is not None
        self.pending.append(Pending(step, version, state, self._worker.submit(self._collect, problems, step)))

    def _collect(self, problems: list[Problem], step: int) -> Collected:
        timer = StageTimer()  # the background's own stages, apart from the step's (which add up to its wall time)
        batch, problems_B, metrics = self.collector.collect(problems, step, timer)
        return batch, problems_B, metrics | {f"ahead/{k.removeprefix('time/')}_seconds": v for k, v in timer.pop().items()}

    @staticmethod
    def _versions(metrics: dict[str, float], step: int, launched_with: int) -> dict[str, float]:
        """The version that sampled the batch (as the engine reports it, else as launched) and its staleness."""
        version = metrics.get("rollout/weights_version", float(launched_with))
        return {"rollout/weights_version": version, "rollout/staleness": step - version}

    def drain(self) -> None:
        """Wait until every launched batch is generated: the weights may then change. A failed batch raises here."""
        for pending in self.pending:
            pending.future.result()

    def state_dict(self) -> dict[str, int]:
        return self.pending[0].sampler_state if self.pending else self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pending.clear()
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
