"""Two processes on the CPU (torchrun, gloo) take the same optimizer step as one process on the same global batch.

The rollouts come from a scripted engine (they depend on the prompt only, not on the rank's sampling seed), so both
runs train on exactly the same global batch; each rank holds half of the questions with all their rollouts. What
must match: the updated weights (loss normalised by the global token count, gradients summed over ranks), the
all-reduced metrics, and the EMA teacher, which must also be the same on every rank.

Run by hand: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_distributed.py --worker OUT
"""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

# Adam's first step is lr * g / (|g| + eps): with the default eps the update is lr * sign(g), and a gradient that is
# zero up to float noise could flip sign between the runs. eps=1 makes the step smooth in g, so "the same step up to
# float tolerance" is a fair test.
OVERRIDES = [
    "trainer.questions_per_step=4",
    "trainer.mini_batch_questions=4",
    "trainer.micro_batch_size=3",  # several micro-batches per rank: no_sync accumulation, then one all-reduce
    "trainer.optim.eps=1.0",
    "trainer.optim.lr=1e-2",
    "algorithm.grpo_weight=0.5",  # both the policy-gradient and the distillation loss
    "algorithm.policy.kl_coef=0.1",  # and the reference forward
    "algorithm.teacher.kind=ema",
    "algorithm.teacher.update_rate=0.5",
]
METRICS = ["reward/mean", "response/length_mean", "policy/loss", "distill/loss", "distill/student_teacher_kl",
           "policy/entropy", "optim/grad_norm", "teacher/reprompt_fraction"]


def run_worker(out: Path) -> None:
    """One training step; every rank writes what it holds."""
    from conftest import TINY_OVERRIDES
    from toy_envs import ParityEnv, ParityEnvConfig

    class InlineParityEnv(ParityEnv):
        scoring_mode = "inline"  # no scoring worker processes per rank

    from sdpo import SDPOTrainer, load_config
    from sdpo.config import ModelConfig
    from sdpo.models import load_tokenizer, resolve_checkpoint
    from sdpo.testing import ScriptedEngine

    config = load_config([*TINY_OVERRIDES, *OVERRIDES, f"trainer.output_dir={out / 'run'}"])
    engine = ScriptedEngine(load_tokenizer(resolve_checkpoint(ModelConfig(name_or_path="tiny"))), max_len=6)
    trainer = SDPOTrainer(config, env=InlineParityEnv(ParityEnvConfig()), engine=engine)
    metrics = trainer.training_step()
    batch = trainer._last_batch
    trainer.step = 1
    trainer.save()  # every rank writes its RNG state into the checkpoint
    torch.save({
        "world": trainer.world,
        "metrics": metrics,
        "counts": trainer._global_counts(batch),
        "groups": sorted({(pid, int(g)) for pid, g in zip(batch.problem_ids, batch.group_ids_B)}),
        "samples_per_problem": {pid: batch.problem_ids.count(pid) for pid in set(batch.problem_ids)},
        "policy": {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()},
        "teacher": [p.detach().clone() for p in trainer.teacher.owned_parameters()],
    }, out / f"rank{trainer.rank}-of-{trainer.world}.pt")


def test_two_processes_take_the_same_step_as_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--worker", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    assert {p.name for p in checkpoint.glob("rank-*.pt")} == {"rank-0.pt", "rank-1.pt"}
    assert (checkpoint / "COMPLETE").exists()
    run_worker(tmp_path)  # the single-process reference, in this process

    single = torch.load(tmp_path / "rank0-of-1.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"rank{r}-of-2.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]

    # Groups stay whole: every question's 4 rollouts sit on one rank, the ranks split the 4 questions.
    per_rank = [{pid for pid, _ in r["groups"]} for r in ranks]
    assert not per_rank[0] & per_rank[1] and len(per_rank[0]) == len(per_rank[1]) == 2
    assert per_rank[0] | per_rank[1] == {pid for pid, _ in single["groups"]}
    assert all(n == 4 for r in ranks for n in r["samples_per_problem"].values())

    # The loss normalisers are the global counts on every rank, equal to the single process's.
    for r in ranks:
        assert r["counts"] == single["counts"]

    # Same metrics after the all-reduce.
    assert single["metrics"]["teacher/reprompt_fraction"] > 0 and single["metrics"]["distill/loss"] > 0
    for key in METRICS:
        for r in ranks:
            assert abs(r["metrics"][key] - single["metrics"][key]) <= 1e-5 * max(1.0, abs(single["metrics"][key])), key

    # Same updated weights, and the step did move them.
    from sdpo.config import ModelConfig
    from sdpo.models import load_model

    initial = load_model(ModelConfig(name_or_path="tiny")).state_dict()
    moved = 0.0
    for name, value in single["policy"].items():
        moved = max(moved, float((value - initial[name]).abs().max()))
        for r in ranks:
            torch.testing.assert_close(r["policy"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert moved > 1e-4
    # The EMA teacher: identical on both ranks, and equal to the single process's.
    for a, b, c in zip(ranks[0]["teacher"], ranks[1]["teacher"], single["teacher"], strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


if __name__ == "__main__" and "--worker" in sys.argv:
    os.environ.setdefault("WANDB_MODE", "disabled")
    run_worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
