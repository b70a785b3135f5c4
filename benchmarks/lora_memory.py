"""Memory of LoRA vs full fine-tuning in the SDPO trainer (EMA teacher), SmolLM2-135M-Instruct on the CPU.

Each mode runs in its own process (so that peak RSS is its own): a trainer with the EMA teacher, the rollouts from a
scripted engine (fixed-length responses: the update is what is measured, not generation), arithmetic with feedback
text so that every rollout is distilled, and two training steps. Reported per mode: parameters, trainable
parameters, the teacher's own tensors (a full copy for full fine-tuning, one adapter with LoRA), the optimizer
state, gradient bytes, the peak RSS of the process and the time of the second step.

    python benchmarks/lora_memory.py --results benchmarks/results/lora_memory.md
    python benchmarks/lora_memory.py --response-len 64 --modes lora    # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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

MODES = {
    "full": [],
    "lora": ["model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32"],
}
MiB = 2**20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def child(mode: str, args: argparse.Namespace) -> dict:
    import torch

    from sdpo import SDPOTrainer, load_config
    from sdpo.envs.arithmetic import ArithmeticEnv
    from sdpo.testing import ScriptedEngine

    torch.set_num_threads(args.threads)
    rss_start = peak_rss_mib()
    overrides = [
        "model=smollm2", "env=arithmetic", "env.feedback=true", "algorithm=sdpo", "algorithm.teacher.kind=ema",
        f"trainer.questions_per_step={args.questions}", f"trainer.mini_batch_questions={args.questions}",
        f"rollout.num_generations={args.generations}", f"trainer.micro_batch_size={args.micro_batch}",
        f"rollout.max_new_tokens={args.response_len}", "trainer.total_steps=2", "eval.every=0",
        "logging.wandb=disabled", "logging.progress_bar=false", "logging.samples_every=0",
        f"trainer.output_dir={tempfile.mkdtemp(prefix=f'lora-memory-{mode}-')}",
        *MODES[mode],
    ]
    config = load_config(overrides)
    env = ArithmeticEnv(config.env)
    env.scoring_mode = "inline"
    from sdpo.models import load_tokenizer, resolve_checkpoint

    tokenizer = load_tokenizer(resolve_checkpoint(config.model))
    # Digits only, never the right answer: every rollout fails with feedback, so every row is distilled.
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    engine = ScriptedEngine(tokenizer, min_len=args.response_len - 1, max_len=args.response_len - 1,
                            respond=lambda prompt, j: [digits[(j + i) % 10] for i in range(args.response_len - 1)]
                            + [tokenizer.eos_token_id])
    trainer = SDPOTrainer(config, env=env, engine=engine)
    rss_init = peak_rss_mib()
    # The policy's own weights: with LoRA the EMA teacher's adapter sits inside the policy module, count it once.
    teacher = {id(p) for p in trainer.learner.teacher.owned_parameters()}
    params = [p for p in trainer.learner.unwrapped.parameters() if id(p) not in teacher]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        metrics = trainer.training_step().metrics
        times.append(time.perf_counter() - start)
    optim_state = [v for s in trainer.learner.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "mode": mode,
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in trainer.dist.trainable),
        "param_bytes": tensor_bytes(params),
        "grad_bytes": tensor_bytes(trainer.dist.trainable),
        "optimizer_bytes": tensor_bytes(optim_state),
        "teacher_bytes": tensor_bytes(trainer.learner.teacher.owned_parameters()),
        "rss_start_mib": rss_start,
        "rss_after_init_mib": rss_init,
        "peak_rss_mib": peak_rss_mib(),
        "step_seconds": times[-1],
        "distilled_fraction": metrics.get("teacher/reprompt_fraction"),
    }


def state_bytes(r: dict) -> int:
    return r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] + r["teacher_bytes"]


def markdown(results: list[dict], args: argparse.Namespace, command: str) -> str:
    import torch

    rows = [
        ("policy parameters (base + trained adapter)", lambda r: f"{r['params'] / 1e6:.1f} M"),
        ("trainable parameters", lambda r: f"{r['trainable_params'] / 1e6:.2f} M"),
        ("policy weights (fp32)", lambda r: f"{r['param_bytes'] / MiB:.0f} MiB"),
        ("gradients", lambda r: f"{r['grad_bytes'] / MiB:.1f} MiB"),
        ("AdamW state", lambda r: f"{r['optimizer_bytes'] / MiB:.1f} MiB"),
        ("EMA teacher's own tensors", lambda r: f"{r['teacher_bytes'] / MiB:.1f} MiB"),
        ("weights + grads + AdamW + teacher", lambda r: f"{state_bytes(r) / MiB:.0f} MiB"),
        ("RSS after imports", lambda r: f"{r['rss_start_mib']:.0f} MiB"),
        ("peak RSS after trainer init", lambda r: f"{r['rss_after_init_mib']:.0f} MiB"),
        ("peak RSS over two steps", lambda r: f"{r['peak_rss_mib']:.0f} MiB"),
        ("second step (s)", lambda r: f"{r['step_seconds']:.1f}"),
    ]
    lines = [
        "# LoRA vs full fine-tuning: memory of an SDPO training step (CPU)",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Machine: {cpu_name()}, {os.cpu_count()} logical CPUs (shared with other jobs), "
        f"{args.threads} torch threads; Python {platform.python_version()}, torch {torch.__version__}",
        f"- Command: `{command}`",
        f"- Setup: SmolLM2-135M-Instruct (fp32 master weights, bf16 autocast), SDPO with the EMA teacher (rate 0.05), "
        f"top-100 distillation; {args.questions} questions x {args.generations} rollouts of {args.response_len} "
        f"tokens from a scripted engine, micro-batch {args.micro_batch}; LoRA r=16 on all attention and MLP "
        "projections. Every rollout is distilled (arithmetic with feedback, always wrong).",
        "",
        "| | " + " | ".join(r["mode"] for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    lines += [f"| {name} | " + " | ".join(fmt(r) for r in results) + " |" for name, fmt in rows]
    if {r["mode"] for r in results} == {"full", "lora"}:
        full, lora = (next(r for r in results if r["mode"] == m) for m in ("full", "lora"))
        lines += [
            "",
            f"LoRA trains {lora['trainable_params'] / full['trainable_params']:.1%} of the parameters. Weights, "
            f"gradients, optimizer state and teacher together: {state_bytes(lora) / MiB:.0f} MiB vs {state_bytes(full) / MiB:.0f} "
            f"MiB ({1 - state_bytes(lora) / state_bytes(full):.0%} less); peak RSS {lora['peak_rss_mib']:.0f} vs "
            f"{full['peak_rss_mib']:.0f} MiB ({1 - lora['peak_rss_mib'] / full['peak_rss_mib']:.0%} less). The rest of "
            "the peak is activations (the same in both: the base model still runs forward and backward), the "
            "vocabulary projection chunks and the Python/torch runtime. The EMA teacher is a full copy of the "
            "weights without LoRA and one adapter with it.",
            "",
            "Step times are not a speed comparison: on this shared 2-core machine they vary by 2x or more from run to "
            "run with other jobs' load.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, help="write the markdown table here")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return
    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(results[-1]))
    command = "python benchmarks/lora_memory.py " + " ".join(sys.argv[1:])
    text = markdown(results, args, command.strip())
    print(text)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)


if __name__ == "__main__":
    main()
