"""The run around the training step, none of it the paper's: the evaluation schedule, keep-best and the collapse stop,
checkpoints and resume, the metrics log, sample tables and the progress bar.

    [evaluate at step 0] -> for each step: trainer.training_step() -> samples -> [evaluate -> keep best / collapse]
                         -> log -> [save] -> ... -> save -> plot

A SIGINT or SIGTERM stops the loop after the step in progress and its checkpoint (sdpo/interrupt.py); a resumed run
drops the log rows past its checkpoint (sdpo/resume.py).

A checkpoint is the policy's weights and optimizer state (written by the launch: `Distributed.policy_state`) plus
every object of `RunLoop.state_objects`, each saved and restored through its own `state_dict` / `load_state_dict`.
"""

from __future__ import annotations

import logging
from pathlib import Path
import signal
from typing import Any

from omegaconf import OmegaConf
import torch
from tqdm.auto import tqdm

from sdpo import checkpoint as ckpt
from sdpo.batch import RolloutBatch
from sdpo.config import SDPOConfig
from sdpo.console import progress_postfix
from sdpo.distributed import Distributed
from sdpo.guards import BEST_DIR, BestCheckpoint
from sdpo.interrupt import RunStopped, StopRequests
from sdpo.resume import continue_command, drop_rows_after
from sdpo.tracking import CURVES, Tracker, plot_curves

log = logging.getLogger(__name__)


def run_directory(config: SDPOConfig, dist: Distributed) -> Path:
    """trainer.output_dir, the same directory on every process (rank 0's value: a timestamped name may differ)."""
    if not config.trainer.output_dir:
        raise ValueError("trainer.output_dir is not set: name the run directory (configs/config.yaml sets a "
                         "timestamped runs/<algorithm>-<env>-<time> one)")
    return Path(dist.shared_value(config.trainer.output_dir))


class RunLoop:
    """Built by the trainer (`sdpo.trainer.SDPOTrainer`, typed loosely here so that the step's module alone imports
    this one) at the end of its set-up: resumes (trainer.resume), then opens the metrics log.

    It owns the step counter (`step`: steps taken, which a checkpoint records and a resume restores); the trainer
    reads it and reports each step taken (`advance`)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.step = 0
        config, dist = trainer.config, trainer.dist
        tcfg = config.trainer
        self.best = BestCheckpoint(tcfg.keep_best, tcfg.collapse_drop, trainer.run_dir / "checkpoints")
        self.saved_step: int | None = None  # the step of the newest checkpoint this run holds
        self.stop = StopRequests()
        if tcfg.resume != "none":
            self.resume(tcfg.resume)
            if dist.is_main:  # each step logged once: the rows past the checkpoint are logged again
                drop_rows_after(trainer.run_dir, self.step if self.step > 0 else -1)
        structured = OmegaConf.structured(config)
        self.tracker = Tracker(config.logging, trainer.run_dir, OmegaConf.to_container(structured),
                               enabled=dist.is_main)
        if dist.is_main:
            OmegaConf.save(structured, trainer.run_dir / "config.yaml")

    def advance(self) -> None:
        """A step was taken: the next one samples with the next seed, and the engine serves its weights as the next
        version."""
        self.step += 1

    def state_objects(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the step, the weights and optimizer state, by name in its trainer_state:
        the parts the trainer names (`SDPOTrainer.stateful_parts`) and the loop's own keep-best record."""
        return {**self.trainer.stateful_parts(), "best": self.best}

    def train(self) -> dict[str, float]:
        """The loop; a SIGINT / SIGTERM stops it after the step in progress and its checkpoint (`RunStopped`)."""
        with self.stop:
            metrics = self._train()
        t = self.trainer
        if self.stop_requested() and self.step < t.config.trainer.total_steps:
            raise RunStopped(self.stop.requested or signal.SIGTERM, self.step, t.config.trainer.total_steps,
                             ckpt.latest_checkpoint(t.run_dir / "checkpoints"), continue_command(t.run_dir))
        return metrics

    def _train(self) -> dict[str, float]:
        t, cfg = self.trainer, self.trainer.config
        bar = tqdm(total=cfg.trainer.total_steps, initial=self.step, desc=cfg.algorithm.name,
                   disable=not (t.dist.is_main and cfg.logging.progress_bar))
        if cfg.eval.every and cfg.eval.at_start and self.step == 0:
            at_start = t.evaluate()
            self.keep_best(at_start)
            self.tracker.log(at_start, self.step)
        metrics: dict[str, float] = {}
        shown: dict[str, str] = {}  # the progress bar's fields
        while self.step < cfg.trainer.total_steps and not self.stop_requested():
            result = t.training_step()
            metrics, collapsed = result.metrics, False
            self.log_samples(result.batch)
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                metrics.update(t.evaluate())
                collapsed = self.keep_best(metrics)
            self.tracker.log(metrics, self.step)
            bar.update(1)
            bar.set_postfix(progress_postfix(metrics, shown))
            if cfg.trainer.save_every and self.step % cfg.trainer.save_every == 0:
                self.save()
            if collapsed:
                break
        bar.close()
        if self.saved_step != self.step and self.step > 0:
            self.save()
        if t.dist.is_main:
            # Diversity (pass@1 against pass@n: a narrowing policy closes the gap) and forgetting (other envs).
            n = cfg.eval.samples_per_question
            extra = ["eval/pass@1", f"eval/pass@{n}"] if n > 1 else []
            extra += [f"eval_{other.label}/avg@{n}" for other in cfg.eval.other_env_specs]
            plot_curves([t.run_dir], CURVES + extra, t.run_dir / "reward_curve.png")
        self.tracker.close()
        return metrics

    def stop_requested(self) -> bool:
        """Whether a signal asked the run to stop, on any process (they stop together, after the same step)."""
        asked, dist = self.stop.requested is not None, self.trainer.dist
        return bool(dist.reduce(torch.tensor(float(asked)), "max")) if dist.world > 1 else asked

    def keep_best(self, metrics: dict[str, float]) -> bool:
        """After an evaluation: save checkpoints/best/ on a better held-out value (trainer.keep_best); True when the
        value fell trainer.collapse_drop below the best (sdpo/guards.py)."""
        step = self.step
        verdict = self.best.observe(metrics, step)
        if verdict.improved:
            self.save(BEST_DIR)
        if verdict.collapsed:
            best = self.best.best
            log.warning("step %d: %s=%.4f fell %.4f or more below its best %.4f (step %d): stopping "
                        "(trainer.collapse_drop)", step, best.metric, metrics[best.metric],
                        self.trainer.config.trainer.collapse_drop, best.value, best.step)
            metrics["guard/collapse_stop"] = 1.0
        return verdict.collapsed

    def save(self, name: str | None = None) -> Path | None:
        """A checkpoint of everything the next step depends on (sdpo/checkpoint.py); every process takes part.
        `name`: a fixed directory instead of step-<step> (`best`), which rotation and resume leave alone."""
        t = self.trainer
        root, step, dist = t.run_dir / "checkpoints", self.step, t.dist
        dist.wait()
        if dist.is_main:
            ckpt.start(root, step, name)
        dist.wait()
        staging = ckpt.staging_dir(root, step, name)
        dist.write_rng_state(staging)
        dist.wait()
        weights, optimizer = dist.policy_state(staging)  # whole weights (None: held whole already) and optimizer state
        objects = {key: obj.state_dict() for key, obj in self.state_objects().items()}  # collectives: every process
        path = None
        if dist.is_main:
            ckpt.save_model(t.learner.unwrapped, t.tokenizer, staging, state_dict=weights)
            state = {"step": step, "world_size": dist.world, "optimizer": optimizer, **objects}
            if name == BEST_DIR:
                self.best.write_record(staging)
            path = ckpt.finish(root, staging, step, state, t.config.trainer.keep_last, name)
        dist.wait()
        if name is None:
            self.saved_step = step
        return path

    def resume(self, resume: str) -> None:
        t = self.trainer
        path = ckpt.latest_checkpoint(t.run_dir / "checkpoints") if resume == "auto" else Path(resume)
        if path is None:
            log.info("trainer.resume=auto: no complete checkpoint in %s, starting fresh", t.run_dir)
            return
        state = ckpt.load_trainer_state(path)
        t.dist.load_policy_state(path, state)
        for key, obj in self.state_objects().items():
            if key not in state:
                raise ValueError(f"the checkpoint {path} has no {key!r} state: it was written by another version of "
                                 "sdpo; start a fresh run (trainer.resume=none)")
            obj.load_state_dict(state[key])
        t.dist.restore_rng_state(path, state["world_size"])
        self.step = state["step"]
        if path.parent == t.run_dir / "checkpoints":  # this run's own: no need to save the step again
            self.saved_step = self.step
        log.info("resumed from %s at step %d", path, self.step)

    def log_samples(self, batch: RolloutBatch) -> None:
        """Every `logging.samples_every` steps: a table of completions with their reward and feedback (main process)."""
        lcfg, step = self.trainer.config.logging, self.step
        if not lcfg.samples_every or step % lcfg.samples_every:
            return
        rows = [
            {"problem": batch.problem_ids[i], "response": batch.response_text[i],
             "reward": float(batch.rewards_B[i]), "feedback": batch.feedback[i]}
            for i in range(min(lcfg.num_samples, len(batch)))
        ]
        self.tracker.log_samples(rows, step)
