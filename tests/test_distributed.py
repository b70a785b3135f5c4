"""Two processes on the CPU (torchrun, gloo) take the same optimizer step as one process on the same global batch.

The rollouts come from a scripted engine (they depend on the prompt only, not on the rank's sampling seed), so both
runs train on exactly the same global batch; each rank holds half of the questions with all their rollouts. What
must match: the updated weights (loss normalised by the global token count, gradients summed over ranks), the
all-reduced metrics, and the EMA teacher, which must also be the same on every rank. The same for DDP, FSDP2 and
DeepSpeed ZeRO-3 / ZeRO-2, each set up on the CPU as its accelerate config file would on GPUs
(`sdpo.testing.launch_on_cpu_as`); and multi-turn episodes under DDP (each packed into one sequence, never split
across ranks).

Run by hand: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_distributed.py --worker OUT \
    --sharding {ddp,fsdp2,zero3,zero2} [--lora] [--multi-turn]
"""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # end-to-end: deselected by the quick check, pytest -m "not slow"

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
    # The output head runs once per 2-token chunk, on responses of different lengths on each rank.
    "trainer.logits_chunk_size=2",
]
METRICS = ["reward/mean", "response/length_mean", "policy/loss", "distill/loss", "distill/student_teacher_kl",
           "policy/entropy", "optim/grad_norm", "teacher/reprompt_fraction"]


DEEPSPEED = ("zero3", "zero2")  # the sharding names of sdpo.testing.launch_on_cpu_as
LORA = ["model.lora.enabled=true", "model.lora.r=4"]  # the EMA teacher is then a second adapter


MULTI_TURN = ["rollout.max_turns=3", "rollout.max_new_tokens=32", "rollout.max_prompt_len=512",
              "algorithm.reprompt.max_reprompt_len=1024"]  # episodes packed into one sequence each (the default)


def run_worker(out: Path, sharding: str = "ddp", resume: bool = False, lora: bool = False,
               multi_turn: bool = False) -> None:
    """One training step (or, with `resume`, the state restored from its checkpoint); every rank writes what it holds.
    `multi_turn`: episodes of up to 3 turns (tests/test_episodes.py's scripted guessing game)."""
    from sdpo.testing import launch_on_cpu_as

    launch_on_cpu_as(sharding)
    from conftest import TINY_OVERRIDES
    from toy_envs import ParityEnv, ParityEnvConfig

    class InlineParityEnv(ParityEnv):
        scoring_mode = "inline"  # no scoring worker processes per rank

    from sdpo import SDPOTrainer, load_config
    from sdpo.checkpoint import optimizer_state_dict
    from sdpo.sharding import whole
    from sdpo.config import ModelConfig
    from sdpo.models import load_tokenizer, resolve_checkpoint
    from sdpo.testing import ScriptedEngine

    config = load_config([*TINY_OVERRIDES, *OVERRIDES, *(LORA if lora else []), *(MULTI_TURN if multi_turn else []),
                          f"trainer.output_dir={out / 'run'}", f"trainer.resume={'auto' if resume else 'none'}"])
    tokenizer = load_tokenizer(resolve_checkpoint(ModelConfig(name_or_path="tiny")))
    if multi_turn:
        from test_episodes import GuessEnv, guessing_engine

        env, engine = GuessEnv(num_questions=4), guessing_engine(tokenizer)
    else:
        env, engine = InlineParityEnv(ParityEnvConfig()), ScriptedEngine(tokenizer, max_len=6)
    trainer = SDPOTrainer(config, env=env, engine=engine)
    dist = trainer.dist
    assert dist.sharded == (sharding in ("fsdp2", "zero3")) and dist.deepspeed == (sharding in DEEPSPEED)
    if dist.deepspeed:  # the learning-rate schedule drives the AdamW that DeepSpeed's ZeRO optimizer steps
        assert trainer.learner.scheduler.optimizer is trainer.learner.optimizer.optimizer.optimizer

    def moments() -> list[torch.Tensor]:
        """Adam's first moments: whole on rank 0, or under DeepSpeed this rank's partitions."""
        if dist.deepspeed:
            return [s["exp_avg"].clone() for s in trainer.learner.optimizer.optimizer.optimizer.state.values()]
        state = optimizer_state_dict(trainer.learner.unwrapped, trainer.learner.optimizer.optimizer)
        return [v["exp_avg"] for v in state.get("state", {}).values()]  # FSDP2: {} on rank 1

    def state() -> dict:
        return {
            "policy": {k: whole(v) for k, v in trainer.learner.unwrapped.state_dict(keep_vars=True).items()},  # gathered
            "teacher": [whole(p) for p in trainer.learner.teacher.owned_parameters()],
            "moments": moments(),
        }

    if resume:
        assert trainer.step == 1
        torch.save(state(), out / f"resumed-rank{dist.rank}-of-{dist.world}.pt")
        return
    result = trainer.training_step()
    metrics, batch = result.metrics, result.batch
    after_step = state()  # before the save, which under ZeRO-3 refreshes the whole copies of small parameters
    # What the vLLM weight sync would send (LoRA merged), gathered from the shards / partitions.
    from sdpo.rollout.vllm import engine_weights

    after_step["exported"] = {t.name: t.materialize(torch.float32, torch.device("cpu")) for t in engine_weights(trainer.learner.unwrapped)}
    assert trainer.step == 1
    trainer.save()  # every rank writes its RNG state into the checkpoint
    # The transformers engine on the (sharded) policy: rank 0 holds 3 prompts, rank 1 one, one prompt per generate
    # call. Under FSDP2 every call is a collective, so the ranks must decode in lockstep (stand-in calls included).
    from dataclasses import replace

    from sdpo.rollout import HFEngine, SamplingSettings

    prompts = [[trainer.tokenizer.bos_token_id or 1, 100 + 7 * i, 200 + i] for i in range(4)]
    mine = {0: prompts[:3], 1: prompts[3:]}[dist.rank] if dist.world == 2 else prompts
    engine = HFEngine(trainer.learner.unwrapped, trainer.tokenizer, replace(config.rollout, hf_batch_size=1), synced=dist.sharded)
    greedy = [c.token_ids for c in engine.generate(mine, SamplingSettings(n=1, temperature=0.0, max_new_tokens=6))]
    torch.save({
        "world": dist.world,
        "greedy": greedy,
        "metrics": metrics,
        "counts": vars(trainer.learner.step_counts(batch)),
        "groups": sorted({(pid, int(g)) for pid, g in zip(batch.problem_ids, batch.group_ids_B)}),
        "samples_per_problem": {pid: batch.problem_ids.count(pid) for pid in set(batch.problem_ids)},
        "episodes": {pid: len({int(e) for p, e in zip(batch.problem_ids, batch.episodes()[2]) if p == pid})
                     for pid in set(batch.problem_ids)},
        "packed": trainer.learner.planner.packs(batch) and len(batch.chains()) < len(batch),
        **after_step,
    }, out / f"rank{dist.rank}-of-{dist.world}.pt")


@pytest.mark.parametrize("sharding, lora, multi_turn",
                         [("ddp", False, False), ("fsdp2", False, False), ("fsdp2", True, False), ("zero3", False, False),
                          ("zero3", True, False), ("zero2", False, False), ("ddp", False, True)],
                         ids=["ddp", "fsdp2", "fsdp2-lora", "deepspeed-zero3", "deepspeed-zero3-lora", "deepspeed-zero2",
                              "ddp-multi-turn"])
def test_two_processes_take_the_same_step_as_one(tmp_path, sharding, lora, multi_turn):
    if sharding in DEEPSPEED:
        pytest.importorskip("deepspeed", reason="the deepspeed extra (pip install -e '.[deepspeed]')")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    flags = ["--sharding", sharding, *(["--lora"] if lora else []), *(["--multi-turn"] if multi_turn else [])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--worker", str(tmp_path), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    assert {p.name for p in checkpoint.glob("rank-*.pt")} == {"rank-0.pt", "rank-1.pt"}
    assert (checkpoint / "COMPLETE").exists()
    # The same processes restart from that checkpoint (under FSDP2: whole tensors loaded into this rank's shards).
    proc = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(2):
        trained = torch.load(tmp_path / f"rank{rank}-of-2.pt", weights_only=False)
        resumed = torch.load(tmp_path / f"resumed-rank{rank}-of-2.pt", weights_only=False)
        for name, value in trained["policy"].items():
            assert torch.equal(resumed["policy"][name], value), name
        for a, b in zip(resumed["teacher"], trained["teacher"], strict=True):
            assert torch.equal(a, b)
    # Adam's moments: whole on rank 0 (DDP, FSDP2), each rank's partitions (DeepSpeed).
    for rank in range(2) if sharding in DEEPSPEED else [0]:
        trained, resumed = (torch.load(tmp_path / f"{prefix}rank{rank}-of-2.pt", weights_only=False) for prefix in ("", "resumed-"))
        assert len(resumed["moments"]) == len(trained["moments"]) > 0
        for a, b in zip(resumed["moments"], trained["moments"]):
            assert torch.equal(a, b)
    run_worker(tmp_path, lora=lora, multi_turn=multi_turn)  # the single-process reference, in this process

    single = torch.load(tmp_path / "rank0-of-1.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"rank{r}-of-2.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]

    # Groups stay whole: every question's 4 rollouts sit on one rank, the ranks split the 4 questions.
    per_rank = [{pid for pid, _ in r["groups"]} for r in ranks]
    assert not per_rank[0] & per_rank[1] and len(per_rank[0]) == len(per_rank[1]) == 2
    assert per_rank[0] | per_rank[1] == {pid for pid, _ in single["groups"]}
    assert all(n == 4 for r in ranks for n in r["episodes"].values())  # a problem's episodes on one rank
    if multi_turn:  # episodes of several turns, each packed into one sequence
        assert all(r["packed"] for r in ranks) and single["packed"]
        assert any(n > 4 for r in ranks for n in r["samples_per_problem"].values())
    else:
        assert all(n == 4 for r in ranks for n in r["samples_per_problem"].values())

    # Greedy rollouts from the updated policy: the same per prompt, however the prompts were spread over ranks.
    assert ranks[0]["greedy"] + ranks[1]["greedy"] == single["greedy"]
    assert all(len(ids) > 0 for ids in single["greedy"])

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
        if lora:  # the trained adapter's B matrices start at zero
            moved = max(moved, float(value.abs().max()) if ".lora_B.default." in name else 0.0)
        else:
            moved = max(moved, float((value - initial[name]).abs().max()))
        for r in ranks:
            torch.testing.assert_close(r["policy"][name], value, rtol=1e-5, atol=1e-8, msg=name)
    assert moved > 1e-4
    # The weights the vLLM engine would receive: whole, and the single process's.
    assert single["exported"].keys() == ranks[0]["exported"].keys() == ranks[1]["exported"].keys()
    for name, value in single["exported"].items():
        for r in ranks:
            torch.testing.assert_close(r["exported"][name], value, rtol=1e-5, atol=1e-8, msg=name)
    # The EMA teacher: identical on both ranks, and equal to the single process's.
    for a, b, c in zip(ranks[0]["teacher"], ranks[1]["teacher"], single["teacher"], strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-8)


if __name__ == "__main__" and "--worker" in sys.argv:
    os.environ.setdefault("WANDB_MODE", "disabled")
    run_worker(Path(sys.argv[sys.argv.index("--worker") + 1]), sharding=sys.argv[sys.argv.index("--sharding") + 1],
               resume="--resume" in sys.argv, lora="--lora" in sys.argv, multi_turn="--multi-turn" in sys.argv)


def test_reduce_mean_leaves_undefined_values_out(monkeypatch):
    """A metric NaN on one rank is the mean over the ranks that have it; NaN on every rank, it is not logged."""
    import math

    from sdpo.config import TrainerConfig
    from sdpo.distributed import Distributed

    dist = Distributed(TrainerConfig())
    assert dist.reduce_mean({"a": 1.0, "b": math.nan, "c": math.inf}) == {"a": 1.0, "c": math.inf}
    # Two ranks: a stand-in all-reduce adds rank 1's local [values; counts] to rank 0's.
    sent = {}
    monkeypatch.setattr(dist, "reduce", lambda value, op: sent.setdefault("rank1", value))
    dist.reduce_mean({"a": 3.0, "b": 5.0, "c": math.nan})
    monkeypatch.setattr(dist, "reduce", lambda value, op: value + sent["rank1"])
    assert dist.reduce_mean({"a": 1.0, "b": math.nan, "c": math.nan}) == {"a": 2.0, "b": 5.0}
