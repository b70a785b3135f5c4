"""What each rank stores under DDP, FSDP2 and DeepSpeed ZeRO-3: SDPO with the EMA teacher, 2 processes on the CPU.

Each mode runs as 2 torchrun processes (gloo), set up as `accelerate launch --config_file
configs/accelerate/<ddp|fsdp2|deepspeed_zero3>.yaml` would on GPUs (`sdpo.testing.launch_on_cpu_as`), with
SmolLM2-135M-Instruct trained in full (the EMA teacher is then a full copy), scripted fixed-length rollouts on
arithmetic with feedback (every rollout is distilled), and two training steps. Reported per rank (both ranks agree to
within one partition's padding): the bytes of the policy weights, the AdamW state (with DeepSpeed's fp32 master
copy) and the EMA teacher that the rank stores after the steps, the peak RSS of the process, and the time of
the second step.

    python benchmarks/sharding_memory_cpu.py --results benchmarks/results/sharding_memory_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from machine import cpu_name, peak_rss_mib  # noqa: E402  (benchmarks/machine.py)

MODES = ["ddp", "fsdp2", "zero3"]  # as sdpo.testing.launch_on_cpu_as names them
MiB = 2**20


def stored_bytes(tensors, seen: set) -> int:
    """Bytes this rank holds for `tensors`: an FSDP2 shard, a ZeRO-3 partition (plus the whole copy that ZeRO-3 keeps
    of small "persistent" parameters), or the tensor. Views already counted (tied weights) are skipped."""
    from torch.distributed.tensor import DTensor

    from sdpo.sharding import is_zero3_param

    total = 0
    for t in tensors:
        parts = [t.to_local()] if isinstance(t, DTensor) else [t]
        if is_zero3_param(t):
            parts = [t.ds_tensor] + ([t.data] if t.numel() > 0 else [])
        for part in parts:
            key = (part.data_ptr(), part.numel())
            if part.numel() and key not in seen:
                seen.add(key)
                total += part.numel() * part.element_size()
    return total


def worker(mode: str, args: argparse.Namespace, out: Path) -> None:
    import torch

    from sdpo.testing import launch_on_cpu_as

    launch_on_cpu_as(mode)
    from sdpo import SDPOTrainer, load_config
    from sdpo.envs.arithmetic import ArithmeticEnv
    from sdpo.models import load_tokenizer, resolve_checkpoint
    from sdpo.testing import ScriptedEngine

    rss_start = peak_rss_mib()
    config = load_config([
        "model=smollm2", "env=arithmetic", "env.feedback=true", "algorithm=sdpo", "algorithm.teacher.kind=ema",
        f"trainer.questions_per_step={args.questions}", f"trainer.mini_batch_questions={args.questions}",
        f"rollout.num_generations={args.generations}", f"trainer.micro_batch_size={args.micro_batch}",
        f"rollout.max_new_tokens={args.response_len}", "trainer.total_steps=2", "eval.every=0",
        "logging.wandb=disabled", "logging.progress_bar=false", "logging.samples_every=0",
        f"trainer.output_dir={out / 'run'}",
    ])
    env = ArithmeticEnv(config.env)
    env.scoring_mode = "inline"
    tokenizer = load_tokenizer(resolve_checkpoint(config.model))
    # Digits only, never the right answer: every rollout fails with feedback, so every row is distilled.
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    engine = ScriptedEngine(tokenizer, respond=lambda prompt, j: [digits[(j + i) % 10] for i in range(args.response_len - 1)]
                            + [tokenizer.eos_token_id])
    trainer = SDPOTrainer(config, env=env, engine=engine)
    rss_init = peak_rss_mib()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        trainer.training_step()
        times.append(time.perf_counter() - start)
    seen: set = set()
    policy = stored_bytes(trainer.learner.unwrapped.parameters(), seen)
    optimizer, masters = trainer.learner.optimizer.optimizer, []
    if trainer.dist.deepspeed:
        # DeepSpeed's ZeRO optimizer keeps an fp32 master copy of this rank's partition, whatever the parameters'
        # dtype, and steps the AdamW inside it on that copy.
        masters = list(optimizer.fp32_partitioned_groups_flat)
        optimizer = optimizer.optimizer
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    optim_bytes = stored_bytes(masters, seen) + stored_bytes(state, seen)
    teacher = stored_bytes(trainer.learner.teacher.owned_parameters(), seen)
    result = {
        "mode": mode, "rank": trainer.dist.rank, "world": trainer.dist.world,
        "policy_bytes": policy, "optimizer_bytes": optim_bytes, "teacher_bytes": teacher,
        "rss_start_mib": rss_start, "rss_after_init_mib": rss_init, "peak_rss_mib": peak_rss_mib(),
        "step_seconds": times[-1],
    }
    (out / f"{mode}-rank{trainer.dist.rank}.json").write_text(json.dumps(result))


def markdown(results: list[dict], args: argparse.Namespace, command: str) -> str:
    def mib(n: float) -> str:
        return f"{n / MiB:.0f} MiB"

    rows = [
        ("policy weights stored", lambda r: mib(r["policy_bytes"])),
        ("AdamW state (+ DeepSpeed's fp32 master copy)", lambda r: mib(r["optimizer_bytes"])),
        ("EMA teacher stored", lambda r: mib(r["teacher_bytes"])),
        ("total of the three", lambda r: mib(r["policy_bytes"] + r["optimizer_bytes"] + r["teacher_bytes"])),
        ("RSS after imports", lambda r: f"{r['rss_start_mib']:.0f} MiB"),
        ("peak RSS after trainer init", lambda r: f"{r['rss_after_init_mib']:.0f} MiB"),
        ("peak RSS over two steps", lambda r: f"{r['peak_rss_mib']:.0f} MiB"),
        ("second step", lambda r: f"{r['step_seconds']:.1f} s"),
    ]
    rank0 = [r for r in results if r["rank"] == 0]
    lines = [
        "# Per-rank memory: DDP vs FSDP2 vs DeepSpeed ZeRO-3 (CPU, 2 processes)",
        "",
        f"- Date: {datetime.date.today().isoformat()}; machine: {cpu_name()}, {os.cpu_count()} cores, no GPU; "
        f"torch {__import__('torch').__version__}, deepspeed {_version('deepspeed')}, accelerate {_version('accelerate')}.",
        f"- Command: `{command}`",
        f"- SmolLM2-135M-Instruct, full fine-tuning in fp32, SDPO with the EMA teacher; {args.questions} questions x "
        f"{args.generations} rollouts of {args.response_len} tokens per step, micro-batch {args.micro_batch}; 2 "
        "processes over gloo, one thread each. Rank 0 shown (rank 1 agrees to within padding).",
        "",
        "| | " + " | ".join(r["mode"] for r in rank0) + " |",
        "|---|" + "---|" * len(rank0),
    ]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(cell(r) for r in rank0) + " |")
    by_mode = {r["mode"]: r for r in rank0}
    if set(by_mode) == set(MODES):
        def total(mode: str) -> int:
            r = by_mode[mode]
            return r["policy_bytes"] + r["optimizer_bytes"] + r["teacher_bytes"]

        ddp, fsdp2, zero3 = (by_mode[m]["peak_rss_mib"] for m in ("ddp", "fsdp2", "zero3"))
        lines += [
            "",
            f"With 2 ranks, FSDP2 stores {total('fsdp2') / total('ddp'):.2f} of DDP's weights + AdamW state + EMA "
            f"teacher per rank, ZeRO-3 {total('zero3') / total('ddp'):.2f}: DeepSpeed keeps an fp32 master copy of "
            "each partition besides the parameters' own fp32 partition (with bf16 parameters that copy is the usual "
            "mixed-precision master). The peak RSS drops less (FSDP2 "
            f"{1 - fsdp2 / ddp:.0%}, ZeRO-3 {1 - zero3 / ddp:.0%} below DDP): at 135M parameters the step's transient "
            "memory (activations, gathered layers, communication buffers, and under ZeRO-3 a micro-batch's whole "
            "[B, R, V] logits) and the process itself weigh as much as the stored state. On this CPU sharding costs "
            "time, since every forward and backward gathers each layer over gloo; step times on this shared 2-core "
            "machine vary from run to run and are not a GPU speed comparison.",
        ]
    return "\n".join(lines) + "\n"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--results", type=Path, help="write the markdown table here")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args, Path(args.worker[1]))
        return
    results = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sizes = ["--questions", str(args.questions), "--generations", str(args.generations),
             "--response-len", str(args.response_len), "--micro-batch", str(args.micro_batch)]
    for mode in args.modes:
        out = Path(tempfile.mkdtemp(prefix=f"sharding-memory-{mode}-"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", mode, str(out), *sizes]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        for rank in range(2):
            results.append(json.loads((out / f"{mode}-rank{rank}.json").read_text()))
            print(json.dumps(results[-1]))
    command = "python benchmarks/sharding_memory_cpu.py " + " ".join(sys.argv[1:])
    text = markdown(results, args, command.strip())
    print(text)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)


if __name__ == "__main__":
    main()
