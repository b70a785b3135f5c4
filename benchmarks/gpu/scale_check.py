"""Trainer-level scale check for a lent GPU: a few SDPO steps of a random-init model of Qwen3-0.6B's shape, with
step time and peak GPU memory for four variants: plain, gradient checkpointing, LoRA, both.

    python benchmarks/gpu/scale_check.py                   # on the GPU: one call, about 2-4 minutes
    python benchmarks/gpu/scale_check.py --small           # the same code path on the CPU with a tiny model

Nothing is downloaded: the model is built from a Qwen3Config (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim
128, intermediate 3072, vocabulary 151936, tied embeddings) with random weights, the tokenizer is a synthetic
word-level one (`sdpo.testing.synthetic_tokenizer`), the rollouts come from a scripted engine (fixed-length random
responses: the trainer's update is what is measured, not generation) and a word-parity environment gives every
group successes and failures with feedback, so every rollout is distilled. The trainer is the real one: EMA teacher,
top-100 distillation, bf16 autocast over fp32 master weights, chunked vocabulary projection.

The device image has torch, transformers, accelerate and peft but not hydra-core / omegaconf, which sdpo's config
needs: copy them into the repository's ignored .cache/pydeps and carry that path, e.g.
    mkdir -p .cache/pydeps && cp -r $(python -c "import omegaconf,hydra,antlr4,os;print(' '.join(os.path.dirname(m.__file__) for m in (omegaconf,hydra,antlr4)))") .cache/pydeps/
    run(command="python benchmarks/gpu/scale_check.py --json $OUT/scale_check.json", carry=[".cache/pydeps"])
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path
import resource
import sys
import tempfile
import time

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / ".cache" / "pydeps")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=4096)
VARIANTS = {
    "plain": [],
    "grad-ckpt": ["model.gradient_checkpointing=true"],
    "lora": ["model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32"],
    "grad-ckpt+lora": ["model.gradient_checkpointing=true", "model.lora.enabled=true", "model.lora.r=16",
                       "model.lora.alpha=32"],
}


def build_checkpoint(shape: dict, out: Path, device: str) -> Path:
    """A random-init Qwen3 and a synthetic tokenizer, saved where the trainer loads models from."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sdpo.testing import synthetic_tokenizer

    tokenizer = synthetic_tokenizer(shape["vocab_size"])
    config = Qwen3Config(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)  # bf16 on disk; the trainer loads fp32 master weights
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def word_env(config, vocab_size: int, prompt_words: int, feedback_words: int):
    """Questions of random words; reward 1 when a response's first word has an even id, else feedback words."""
    import random

    from sdpo.envs.base import Environment, Problem, Score

    class WordParityEnv(Environment):
        scoring_mode = "inline"

        def load(self, split: str) -> list[Problem]:
            rng = random.Random(split)
            return [Problem(id=f"{split}-{i}", messages=[{"role": "user", "content": " ".join(
                f"t{rng.randrange(8, vocab_size)}" for _ in range(prompt_words))}]) for i in range(64)]

        def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
            words = response.split()
            if words and int(words[0][1:]) % 2 == 0:
                return Score(1.0)
            rng = random.Random(response)
            return Score(0.0, " ".join(f"t{rng.randrange(8, vocab_size)}" for _ in range(feedback_words)))

    return WordParityEnv(config.env)


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak RSS (KiB -> GiB)


def run_variant(name: str, model_dir: Path, args: argparse.Namespace) -> dict:
    from sdpo import SDPOTrainer, load_config
    from sdpo.models import load_tokenizer
    from sdpo.testing import SPECIAL, ScriptedEngine

    overrides = [
        f"model.name_or_path={model_dir}", "model.dtype=float32",
        f"model.autocast_dtype={'bfloat16' if torch.cuda.is_available() else 'none'}",
        "algorithm=sdpo", "algorithm.teacher.kind=ema",
        f"trainer.questions_per_step={args.questions}", f"trainer.mini_batch_questions={args.questions}",
        f"rollout.num_generations={args.generations}", f"trainer.micro_batch_size={args.micro_batch}",
        f"rollout.max_new_tokens={args.response_len}", f"rollout.max_prompt_len={args.prompt_words + 16}",
        f"algorithm.reprompt.max_reprompt_len={args.prompt_words + args.response_len + args.feedback_words + 64}",
        "trainer.optim.warmup_steps=0", f"trainer.total_steps={args.steps + 1}", "eval.every=0",
        "logging.wandb=disabled", "logging.progress_bar=false", "logging.samples_every=0",
        f"trainer.output_dir={tempfile.mkdtemp(prefix=f'scale-{name}-')}", *VARIANTS[name],
    ]
    config = load_config(overrides)
    tokenizer = load_tokenizer(model_dir)
    engine = ScriptedEngine(tokenizer, token_range=(len(SPECIAL), args.vocab_size), min_len=args.response_len - 1,
                            max_len=args.response_len - 1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = SDPOTrainer(config, env=word_env(config, args.vocab_size, args.prompt_words, args.feedback_words),
                          engine=engine)
    init_s, init_mem = time.perf_counter() - start, peak_memory_gib()
    times, stages = [], {}
    for i in range(args.steps + 1):  # the first step warms up (allocator, kernels) and is not timed
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = trainer.training_step().metrics
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
            for key in ("time/teacher_context", "time/teacher_forward", "time/update"):
                stages[key] = stages.get(key, 0.0) + metrics.get(key, 0.0) / args.steps
    result = {
        "variant": name,
        "trainable_params_M": sum(p.numel() for p in trainer.dist.trainable) / 1e6,
        "teacher_own_params_M": sum(p.numel() for p in trainer.learner.teacher.owned_parameters()) / 1e6,
        "init_s": init_s,
        "memory_after_init_GiB": init_mem,
        "step_s": sum(times) / len(times),
        "teacher_s": stages.get("time/teacher_context", 0.0) + stages.get("time/teacher_forward", 0.0),
        "update_s": stages.get("time/update", 0.0),
        "peak_memory_GiB": peak_memory_gib(),
        "tokens_per_step": args.questions * args.generations * args.response_len,
        "distill_loss": metrics.get("distill/loss"),
        "reprompt_fraction": metrics.get("teacher/reprompt_fraction"),
    }
    trainer.dist.accelerator.free_memory()  # the Accelerator keeps references to what it prepared
    del trainer, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        result["leftover_GiB"] = torch.cuda.memory_allocated() / 2**30  # should be ~0: the next variant starts clean
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny Qwen3 on the CPU: checks the code path")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--questions", type=int, help="questions per step (default 8; 2 with --small)")
    parser.add_argument("--generations", type=int, help="rollouts per question (default 8; 4 with --small)")
    parser.add_argument("--response-len", type=int, help="response tokens (default 512; 16 with --small)")
    parser.add_argument("--prompt-words", type=int, default=128)
    parser.add_argument("--feedback-words", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int,
                        help="timed steps per variant, after one warm-up (default 2; 1 with --small)")
    parser.add_argument("--budget-s", type=float, default=240, help="skip the remaining variants past this time")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    shape = SMALL if args.small else QWEN3_06B
    args.questions = args.questions or (2 if args.small else 8)
    args.generations = args.generations or (4 if args.small else 8)
    args.steps = args.steps or (1 if args.small else 2)
    args.response_len = args.response_len or (16 if args.small else 512)
    if args.small:
        args.prompt_words, args.feedback_words = min(args.prompt_words, 16), min(args.feedback_words, 8)
    args.vocab_size = shape["vocab_size"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.small:
        sys.exit("no GPU: run with --small on the CPU")
    began = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{args.questions} questions x {args.generations} rollouts x {args.response_len} tokens, "
          f"micro-batch {args.micro_batch}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scale-check-") as tmp:
        model_dir = build_checkpoint(shape, Path(tmp) / "qwen3-shape", device)
        print(f"random-init checkpoint written in {time.perf_counter() - began:.0f} s", flush=True)
        results = []
        for name in args.variants:
            if time.perf_counter() - began > args.budget_s:
                print(f"{name}: skipped (past --budget-s {args.budget_s:.0f})", flush=True)
                continue
            try:
                results.append(run_variant(name, model_dir, args))
            except torch.OutOfMemoryError as exc:
                results.append({"variant": name, "error": f"out of memory: {str(exc)[:200]}"})
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(results[-1]), flush=True)
    memory = "peak GPU memory" if device == "cuda" else "peak RSS"
    print(f"\n| variant | trainable M | teacher's own M | step s | teacher s | update s | {memory} GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} |")
        else:
            print(f"| {r['variant']} | {r['trainable_params_M']:.3g} | {r['teacher_own_params_M']:.3g} "
                  f"| {r['step_s']:.2f} "
                  f"| {r['teacher_s']:.2f} | {r['update_s']:.2f} | {r['peak_memory_GiB']:.2f} |")
    print(f"total {time.perf_counter() - began:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
