"""Rollout throughput: transformers `generate` (HFEngine) vs colocated vLLM (VLLMEngine), side by side in one run.

The default CPU batch shape: 8 arithmetic prompts rendered with the chat template x 4 samples, up to 48 new tokens,
temperature 1.0, on SmolLM2-135M-Instruct. Also times the vLLM weight sync (trainer float32 -> engine dtype) and
the engine's start-up, and re-times the transformers engine after vLLM started (vLLM binds this process's OpenMP
threads on the CPU backend; the trainer shares them).

    python benchmarks/rollout_throughput.py --repeats 3 --results benchmarks/results/rollout_throughput.md

Throughput counts generated tokens (EOS included) per wall-clock second of `engine.generate`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import os
import platform
from pathlib import Path
import statistics
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from sdpo.config import ModelConfig, RolloutConfig, VLLMConfig  # noqa: E402
from sdpo.models import DTYPES, load_model, load_tokenizer, render_chat, resolve_checkpoint  # noqa: E402
from sdpo.rollout.base import RolloutEngine, SamplingSettings  # noqa: E402
from sdpo.rollout.hf import HFEngine  # noqa: E402

PAIRS = [(7, 8), (3, 4), (6, 9), (2, 5), (8, 8), (4, 7), (9, 3), (5, 6)]


def time_generate(engine: RolloutEngine, prompts: list[list[int]], sampling: SamplingSettings, repeats: int) -> dict[str, float]:
    engine.generate(prompts[:1], SamplingSettings(n=1, temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
    rates, seconds, tokens = [], [], []
    for r in range(repeats):
        start = time.perf_counter()
        completions = engine.generate(prompts, replace(sampling, seed=1000 + r))
        elapsed = time.perf_counter() - start
        n_tokens = sum(len(c.token_ids) for c in completions)
        rates.append(n_tokens / elapsed)
        seconds.append(elapsed)
        tokens.append(n_tokens)
    return {
        "tok_s": statistics.median(rates),
        "tok_s_min": min(rates),
        "tok_s_max": max(rates),
        "seconds": statistics.median(seconds),
        "tokens": statistics.mean(tokens),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--vllm-dtype", default="auto", help="vLLM weights dtype (auto: the checkpoint's, bf16 for SmolLM2)")
    parser.add_argument("--results", type=Path, help="write a markdown report here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    model_config = ModelConfig(name_or_path=args.model)
    path = resolve_checkpoint(model_config)
    tokenizer = load_tokenizer(path)
    prompts = [
        render_chat(tokenizer, [{"role": "user", "content": f"What is {a} * {b}? Answer with just the number."}])
        for a, b in (PAIRS * (args.prompts // len(PAIRS) + 1))[: args.prompts]
    ]
    sampling = SamplingSettings(n=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    rollout = RolloutConfig(max_new_tokens=args.max_new_tokens, num_generations=args.samples)

    # The policy as the trainer holds it: float32 master weights, forward under the configured autocast dtype.
    policy = load_model(model_config, path).eval()
    autocast = DTYPES.get(model_config.autocast_dtype)
    rows: list[tuple[str, dict[str, float]]] = []
    print(f"transformers generate (fp32 weights, autocast {model_config.autocast_dtype}) ...", flush=True)
    rows.append((f"transformers generate, fp32 + {model_config.autocast_dtype} autocast", time_generate(HFEngine(policy, tokenizer, rollout, autocast), prompts, sampling, args.repeats)))

    from sdpo.rollout.vllm import VLLMEngine

    vllm_rollout = RolloutConfig(engine="vllm", max_new_tokens=args.max_new_tokens, num_generations=args.samples,
                                 max_prompt_len=max(len(p) for p in prompts), vllm=VLLMConfig(dtype=args.vllm_dtype))
    print("vLLM start-up ...", flush=True)
    start = time.perf_counter()
    engine = VLLMEngine(path, tokenizer, vllm_rollout)
    startup = time.perf_counter() - start
    print("vLLM generate ...", flush=True)
    rows.append((f"vLLM {engine.engine_dtype} (colocated, in-process)", time_generate(engine, prompts, sampling, args.repeats)))
    syncs = [engine.sync_weights(policy) for _ in range(args.syncs)]
    sync_s = statistics.median(s.seconds for s in syncs)
    sync_mb = syncs[0].bytes / 2**20
    print("transformers generate again, after vLLM start-up ...", flush=True)
    rows.append(("transformers generate, after vLLM started", time_generate(HFEngine(policy, tokenizer, rollout, autocast), prompts, sampling, args.repeats)))
    engine.close()

    import vllm

    hf_rate, vllm_rate = rows[0][1]["tok_s"], rows[1][1]["tok_s"]
    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    lines = [
        "# Rollout throughput: transformers generate vs colocated vLLM (CPU)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {machine()}; vllm {vllm.__version__}",
        f"- load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} (the machine is shared)",
        f"- command: `HF_HUB_OFFLINE=1 {command}`",
        f"- shape: {args.prompts} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens, temperature "
        f"{args.temperature}, {args.model}; median of {args.repeats} timed calls after a warm-up",
        "",
        "| engine | tokens/s (median) | min-max | s per batch | tokens per batch |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['tok_s']:.0f} | {r['tok_s_min']:.0f}-{r['tok_s_max']:.0f} | {r['seconds']:.2f} | {r['tokens']:.0f} |")
    lines += [
        "",
        f"- vLLM / transformers throughput: {vllm_rate / hf_rate:.2f}x",
        f"- vLLM start-up (once per run): {startup:.1f} s",
        f"- weight sync (fp32 policy -> {engine.engine_dtype} engine, {sync_mb:.0f} MiB in "
        f"{syncs[0].extra.get('sync/buckets', 0):.0f} buckets of <= {vllm_rollout.vllm.sync_bucket_mb} MiB): "
        f"{sync_s * 1000:.0f} ms median of {args.syncs}",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(report)


if __name__ == "__main__":
    main()
