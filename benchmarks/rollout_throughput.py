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
import contextlib
from dataclasses import replace
import os
from pathlib import Path
import statistics
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from machine import describe  # noqa: E402  (benchmarks/machine.py)
from sdpo.batch import build_model_inputs, pad_right  # noqa: E402
from sdpo.config import ModelConfig, RolloutConfig, VLLMConfig  # noqa: E402
from sdpo.models import DTYPES, load_model, load_tokenizer, render_chat, resolve_checkpoint  # noqa: E402
from sdpo.precision import resolve_autocast  # noqa: E402
from sdpo.rollout.base import RolloutEngine, SamplingSettings  # noqa: E402
from sdpo.rollout.hf import HFEngine  # noqa: E402
from sdpo.rollout.mismatch import logprob_mismatch_metrics  # noqa: E402

PAIRS = [(7, 8), (3, 4), (6, 9), (2, 5), (8, 8), (4, 7), (9, 3), (5, 6)]


def time_generate(engine: RolloutEngine, prompts: list[list[int]], sampling: SamplingSettings, repeats: int) -> dict:
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


@torch.no_grad()
def measure_mismatch(engine, policy, prompts, sampling: SamplingSettings, autocast: torch.dtype | None) -> dict:
    """The engine's sampler log-probs against the trainer's recompute (float32 weights under its autocast)."""
    completions = engine.generate(prompts, replace(sampling, seed=7))
    responses = [c.token_ids for c in completions]
    inputs = build_model_inputs([prompts[c.prompt_index] for c in completions], responses, pad_id=0)
    context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with context:
        logits = policy(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                        position_ids=inputs.position_ids).logits
    logp = (logits[:, inputs.response_hidden_slice].float() / sampling.temperature).log_softmax(-1)
    trainer_BR = logp.gather(-1, inputs.input_ids[:, inputs.prompt_width :, None])[..., 0]
    sampler_BR = pad_right([c.logprobs for c in completions], 0.0, torch.float32, inputs.response_width)
    mask_BR = pad_right([[1] * len(r) for r in responses], 0, torch.bool, inputs.response_width)
    return logprob_mismatch_metrics(trainer_BR, sampler_BR, mask_BR, threshold=2.0, prefix="")


def cpu_snapshot() -> tuple[float, float, float]:
    """(seconds all cores were busy, seconds this process used, wall clock), for the contention line."""
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (sum(values) - values[3] - values[4]) / ticks
    own = os.times()
    return busy, own.user + own.system, time.perf_counter()


def others_share(start: tuple[float, float, float]) -> float:
    """Share of the machine's cores that other processes used since `start` (other engineers' jobs)."""
    busy, own, wall = cpu_snapshot()
    return max(0.0, (busy - start[0]) - (own - start[1])) / ((wall - start[2]) * (os.cpu_count() or 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--vllm-dtype", default="auto", help="vLLM weights dtype (auto: bf16 where the machine runs it natively, else float32)")
    parser.add_argument("--results", type=Path, help="write a markdown report here")
    args = parser.parse_args()

    before = cpu_snapshot()
    time.sleep(2.0)
    idle_share = others_share(before)  # other processes' load just before the run
    before = cpu_snapshot()
    model_config = ModelConfig(name_or_path=args.model)
    model_config.autocast_dtype = resolve_autocast(model_config.autocast_dtype)  # as the trainer resolves `auto`
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
    hf_engine = HFEngine(policy, tokenizer, rollout, autocast)
    hf_name = f"transformers generate, fp32 + {model_config.autocast_dtype} autocast"
    rows.append((hf_name, time_generate(hf_engine, prompts, sampling, args.repeats)))

    from sdpo.rollout.vllm import VLLMEngine

    vllm_rollout = RolloutConfig(engine="vllm", max_new_tokens=args.max_new_tokens, num_generations=args.samples,
                                 max_prompt_len=max(len(p) for p in prompts), vllm=VLLMConfig(dtype=args.vllm_dtype))
    print("vLLM start-up ...", flush=True)
    start = time.perf_counter()
    engine = VLLMEngine(path, tokenizer, vllm_rollout)
    startup = time.perf_counter() - start
    print("vLLM generate ...", flush=True)
    rows.append((f"vLLM {engine.engine_dtype} (colocated)", time_generate(engine, prompts, sampling, args.repeats)))
    mismatch = measure_mismatch(engine, policy, prompts, sampling, autocast)
    syncs = [engine.sync_weights(policy) for _ in range(args.syncs)]
    sync_s = statistics.median(s.seconds for s in syncs)
    sync_mb = syncs[0].bytes / 2**20
    print("transformers generate again, after vLLM start-up ...", flush=True)
    rows.append((f"{hf_name}, after vLLM started", time_generate(hf_engine, prompts, sampling, args.repeats)))
    engine.close()

    import vllm

    contention = others_share(before)
    hf_rate, vllm_rate = rows[0][1]["tok_s"], rows[1][1]["tok_s"]
    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    lines = [
        "# Rollout throughput: transformers generate vs colocated vLLM (CPU)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {describe()}; vllm {vllm.__version__}",
        f"- the machine is shared: other processes used {100 * idle_share:.0f}% of the cores just before the run and "
        f"{100 * contention:.0f}% during it{' (CONTENDED: numbers unreliable)' if contention > 0.15 else ''}",
        f"- command: `HF_HUB_OFFLINE=1 {command}`",
        f"- shape: {args.prompts} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens, "
        f"temperature {args.temperature}, {args.model}; median of {args.repeats} timed calls after a warm-up",
        "",
        "| engine | tokens/s (median) | min-max | s per batch | tokens per batch |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        spread = f"{r['tok_s_min']:.0f}-{r['tok_s_max']:.0f}"
        lines.append(f"| {name} | {r['tok_s']:.0f} | {spread} | {r['seconds']:.2f} | {r['tokens']:.0f} |")
    lines += [
        "",
        f"- vLLM / transformers throughput: {vllm_rate / hf_rate:.2f}x",
        f"- vLLM start-up (once per run): {startup:.1f} s",
        f"- weight sync (fp32 policy -> {engine.engine_dtype} engine, {sync_mb:.0f} MiB in "
        f"{syncs[0].extra.get('sync/buckets', 0):.0f} buckets of <= {vllm_rollout.vllm.sync_bucket_mb} MiB): "
        f"{sync_s * 1000:.0f} ms median of {args.syncs}",
        f"- sampler vs trainer log-probs ({engine.engine_dtype} engine vs fp32 policy under "
        f"{model_config.autocast_dtype} autocast, {mismatch['mismatch_tokens']:.0f} tokens): mean |delta| "
        f"{mismatch['logp_abs_diff_mean']:.4f}, max {mismatch['logp_abs_diff_max']:.3f}, TIS weight mean "
        f"{mismatch['tis_weight_mean']:.4f}, truncated at 2.0: {100 * mismatch['tis_truncated_fraction']:.2f}%",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(report)


if __name__ == "__main__":
    main()
