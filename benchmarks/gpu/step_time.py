"""SDPO step time and peak memory for a random-init model of Qwen3-0.6B's shape, transformers rollout engine.

For a lent GPU host (torch, transformers, accelerate, peft; no vLLM, no network). Needs nothing outside this
repository: the model is random-init from a `Qwen3Config` with Qwen3-0.6B's shape, the tokenizer is a byte-level
stand-in built here (Qwen3's vocabulary size, ChatML template), both saved to a temporary checkpoint directory that
`SDPOTrainer` loads like any local model. The task is `env=arithmetic` with feedback text on, so that every sample
is reprompted and the teacher forward and distillation loss run on the whole batch (a random model never answers
correctly; its responses run to max_new_tokens, which fixes the shape).

    python benchmarks/gpu/step_time.py                           # the default row only
    python benchmarks/gpu/step_time.py --grad-checkpointing --lora   # + a row with each, and one with both
    python benchmarks/gpu/step_time.py --small                   # a tiny model on the CPU: checks the script runs

Each row builds a fresh trainer, runs one warm-up step, then times --steps steps (median) and reads the peak GPU
memory (torch.cuda.max_memory_allocated) over the timed steps. Stage columns come from the trainer's own timers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen3-0.6B (config.json of Qwen/Qwen3-0.6B), and a tiny stand-in for --small.
QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
                 rope_theta=1000000.0, rms_norm_eps=1e-6)
SMALL = dict(QWEN3_06B, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=32, intermediate_size=128, vocab_size=4096)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokens (no merges) plus ChatML specials: enough to render prompts and decode responses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in SPECIALS:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def write_checkpoint(directory: Path, shape: dict, dtype: torch.dtype) -> Path:
    tokenizer = byte_tokenizer()
    config = Qwen3Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return directory


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_row(name: str, checkpoint: Path, overrides: list[str], steps: int, out_dir: Path) -> dict:
    from sdpo.hydra_config import load_config
    from sdpo.trainer import SDPOTrainer

    config = load_config([
        f"model.name_or_path='{checkpoint}'",
        "env=arithmetic",
        "env.feedback=true",
        "rollout=hf",
        "eval.every=0",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
        "logging.samples_every=0",
        f"trainer.output_dir='{out_dir / ''.join(c if c.isalnum() else '_' for c in name)}'",
        *overrides,
    ])
    trainer = SDPOTrainer(config)
    trainer.training_step()  # warm-up: allocator, kernels, optimizer state
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, stages = [], []
    for _ in range(steps):
        start = time.perf_counter()
        metrics = trainer.training_step().metrics
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        stages.append({k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")})
    row = {
        "row": name,
        "step_s": statistics.median(seconds),
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
        "rss_gb": peak_rss_gb(),
        "response_len": metrics.get("response/length_mean", float("nan")),
        "reprompted": metrics.get("teacher/reprompt_fraction", float("nan")),
        "stages": {k: statistics.median(s[k] for s in stages if k in s) for k in stages[-1]},
        "trainable_m": sum(p.numel() for p in trainer.dist.trainable) / 1e6,
    }
    with contextlib.suppress(Exception):
        trainer.run.tracker.close()
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny model and batch (CPU check of the script)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="add a row with gradient checkpointing")
    parser.add_argument("--lora", action="store_true", help="add a row with LoRA (r=16) instead of full fine-tuning")
    parser.add_argument("--questions", type=int, default=8, help="questions per step (one optimizer step)")
    parser.add_argument("--generations", type=int, default=8, help="rollouts per question")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every row")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.small:
        args.questions, args.generations, args.max_new_tokens, args.micro_batch, args.steps = 2, 2, 8, 4, 1

    on_gpu = torch.cuda.is_available()
    shape = SMALL if args.small else QWEN3_06B
    common = [
        f"trainer.questions_per_step={args.questions}",
        f"trainer.mini_batch_questions={args.questions}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"rollout.num_generations={args.generations}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "model.dtype=float32",
        f"model.autocast_dtype={'bfloat16' if on_gpu or not args.small else 'none'}",
        *args.extra,
    ]
    rows_wanted = [("full fine-tuning", [])]
    if args.grad_checkpointing:
        rows_wanted.append(("grad checkpointing", ["model.gradient_checkpointing=true"]))
    if args.lora:
        rows_wanted.append(("LoRA r=16", ["model.lora.enabled=true"]))
    if args.grad_checkpointing and args.lora:
        rows_wanted.append(("LoRA + grad ckpt", ["model.lora.enabled=true", "model.gradient_checkpointing=true"]))

    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"device: {device}; torch {torch.__version__}; model: {'tiny Qwen3' if args.small else 'Qwen3-0.6B shape'}, "
          f"random init; {args.questions} questions x {args.generations} rollouts, {args.max_new_tokens} new tokens",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdpo-step-time-") as tmp:
        started = time.perf_counter()
        checkpoint = write_checkpoint(Path(tmp) / "model", shape, torch.bfloat16)
        print(f"checkpoint written in {time.perf_counter() - started:.1f} s", flush=True)
        for name, overrides in rows_wanted:
            started = time.perf_counter()
            rows.append(run_row(name, checkpoint, common + overrides, args.steps, Path(tmp) / "runs"))
            print(f"{name}: done in {time.perf_counter() - started:.1f} s", flush=True)

    stage_names = sorted({k for r in rows for k in r["stages"]})
    header = ["row", "trainable (M)", "step (s)", "peak GPU mem (GiB)", "peak RSS (GiB)", "response len", "reprompted",
              *[f"{s} (s)" for s in stage_names]]
    print("\n(peak RSS: of the process so far; peak GPU memory: over each row's timed steps)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["row"], f"{r['trainable_m']:.1f}", f"{r['step_s']:.2f}", f"{r['peak_gb']:.2f}", f"{r['rss_gb']:.2f}",
                 f"{r['response_len']:.0f}", f"{r['reprompted']:.2f}",
                 *[f"{r['stages'].get(s, float('nan')):.2f}" for s in stage_names]]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        report = {"device": device, "args": vars(args) | {"json": str(args.json)}, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
