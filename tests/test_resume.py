"""Checkpoints resume exactly, and a kill in the middle of a save leaves the previous checkpoint usable.

The runs sample with transformers generate (torch's global RNG), so an exact resume needs the RNG states, the data
position, the optimizer, the scheduler and the EMA teacher all restored.
"""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import TINY_OVERRIDES  # noqa: E402
from toy_envs import ParityEnv, ParityEnvConfig  # noqa: E402

from sdpo import SDPOTrainer, load_config  # noqa: E402
from sdpo import checkpoint as ckpt  # noqa: E402
from sdpo.tracking import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: deselected by the quick check, pytest -m "not slow"

RUN = [
    "trainer.total_steps=3",
    "trainer.save_every=2",
    "algorithm.teacher.kind=ema",
    "algorithm.teacher.update_rate=0.5",
    "eval.every=2",
    "eval.num_questions=2",
    "eval.samples_per_question=2",
    "eval.at_start=false",
    "logging.samples_every=0",
]
COMPARED = ["reward/mean", "response/length_mean", "distill/loss", "distill/student_teacher_kl", "policy/entropy",
            "optim/grad_norm", "eval/avg@2"]


def make_trainer(run_dir, *overrides):
    config = load_config([*TINY_OVERRIDES, *RUN, f"trainer.output_dir={run_dir}", *overrides])
    return SDPOTrainer(config, env=InlineParityEnv(ParityEnvConfig()))


class InlineParityEnv(ParityEnv):
    scoring_mode = "inline"  # no scoring worker processes to start: these tests build several trainers


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch, lora):
    # LoRA: the trained adapter, its AdamW state and the EMA adapter come back (no evaluation, to keep it short).
    extra = ["model.lora.enabled=true", "model.lora.r=4", "eval.every=0"] if lora else []
    straight = make_trainer(tmp_path / "straight", *extra)
    straight.train()

    # The same run, killed in the middle of step 3 (after its rollouts), then resumed from the step-2 checkpoint
    # (which was written after the step-2 evaluation had drawn from the RNG).
    interrupted = make_trainer(tmp_path / "resumed", *extra)
    original_context = SDPOTrainer.teacher_context

    def rollouts_then_die(self, batch, problems_B):
        if self.step == 2:
            raise Interrupted
        return original_context(self, batch, problems_B)

    monkeypatch.setattr(SDPOTrainer, "teacher_context", rollouts_then_die)
    with pytest.raises(Interrupted):
        interrupted.train()
    monkeypatch.setattr(SDPOTrainer, "teacher_context", original_context)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "resumed" / "checkpoints")] == ["step-000002"]

    resumed = make_trainer(tmp_path / "resumed", *extra, "trainer.resume=auto")
    assert resumed.step == 2
    resumed.train()

    expected, got = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3]
    for want, have in zip(expected, got):
        for key in COMPARED:
            if key in want:
                assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)
    for (name, a), b in zip(straight.learner.unwrapped.named_parameters(), resumed.learner.unwrapped.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    for a, b in zip(straight.learner.teacher.owned_parameters(), resumed.learner.teacher.owned_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def run_worker(run_dir: Path) -> None:
    trainer = make_trainer(run_dir, "trainer.total_steps=3", "trainer.save_every=1", "eval.every=0")
    trainer.train()


def test_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", ckpt.PAUSE_ENV: "2"}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(run_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    staging = ckpt.staging_dir(run_dir / "checkpoints", 2)
    try:
        deadline = time.monotonic() + 240
        while not (staging / "PAUSED").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the worker never reached the save of step 2"
            time.sleep(0.2)
        # The step-2 checkpoint is fully written except for its marker: kill the process now.
        assert (staging / ckpt.STATE_FILE).exists() and not (staging / ckpt.COMPLETE).exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    root = run_dir / "checkpoints"
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-000001"]
    assert ckpt.latest_checkpoint(root).name == "step-000001"

    resumed = make_trainer(run_dir, "trainer.total_steps=3", "trainer.save_every=1", "eval.every=0",
                           "trainer.resume=auto", "trainer.keep_last=2")
    assert resumed.step == 1
    resumed.train()
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-000002", "step-000003"]  # keep-last-2
    assert not staging.exists(), "the re-save of step 2 replaces the killed save's staging directory"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"]


if __name__ == "__main__" and "--worker" in sys.argv:
    run_worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
