"""What both vLLM engines (colocated, sdpo/rollout/vllm.py; server, sdpo/rollout/server.py) ask of vLLM, in one
place: the engine's arguments, each prompt's sampling fields, length checks, and teacher scores from prompt
log-probs. Imports no vLLM: the colocated engine builds `SamplingParams` from these fields, the server engine sends
them as JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sdpo.hardware import auto_dtype, probe
from sdpo.rollout.base import SamplingSettings, TeacherScores

GiB = 1 << 30
# The CPU backend sizes its KV cache from `gpu_memory_utilization` as a fraction of *host* memory and refuses to
# start when other processes hold that much; an explicit size avoids both (VLLMConfig.kv_cache_gb).
CPU_DEFAULT_KV_CACHE_GB = 1.0


def engine_args(cfg: Any, max_model_len: int, on_cpu: bool) -> dict[str, Any]:
    """vLLM engine arguments from rollout.vllm.*, for the colocated `LLM` and for a server's command line alike."""
    args: dict[str, Any] = dict(
        dtype=cfg.dtype if cfg.dtype != "auto" else auto_dtype(probe()),  # the trainer resolves it earlier
        seed=cfg.seed,
        enforce_eager=cfg.enforce_eager,
        max_model_len=max_model_len,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enable_prefix_caching=True,
        logprobs_mode="processed_logprobs",  # the sampled token's log-prob after temperature (module docstring)
        max_logprobs=max(cfg.max_logprobs, 1),
    )
    if on_cpu:
        # A prefill split over two scheduler steps makes vLLM rewind the seeded request's generator, which the
        # CPU generator cannot do ("CPU Generator does not use offset"): schedule every prefill whole.
        args["enable_chunked_prefill"] = False
    kv_gb = cfg.kv_cache_gb if cfg.kv_cache_gb is not None else (CPU_DEFAULT_KV_CACHE_GB if on_cpu else None)
    if kv_gb is not None:
        args["kv_cache_memory_bytes"] = int(kv_gb * GiB)
    return args


# ---------------------------------------------------------------------------------------------------------------
# requests: what the colocated engine and the server engine (sdpo/rollout/server.py) ask of vLLM alike


def sampling_fields(sampling: SamplingSettings, prompt_index: int) -> dict[str, Any]:
    """vLLM `SamplingParams` fields for one prompt's request. Each prompt gets its own seed (`seed + prompt_index *
    n`; vLLM adds the sample index), so a seeded call reproduces and prompts do not share random streams. Greedy
    requests are single samples (vLLM refuses n > 1 greedy; `request_copies` repeats them)."""
    seed = None if sampling.seed is None else sampling.seed + prompt_index * sampling.n  # children add 0..n-1
    return dict(
        n=1 if sampling.greedy else sampling.n,
        temperature=0.0 if sampling.greedy else sampling.temperature,
        top_p=sampling.top_p,
        top_k=max(0, sampling.top_k),
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop) or None,
        include_stop_str_in_output=True,
        seed=seed,
        logprobs=0,  # only the sampled token's log-prob
        skip_special_tokens=True,
    )


def request_copies(sampling: SamplingSettings) -> int:
    """Requests per prompt: n single greedy samples (all identical), or one request for n samples."""
    return sampling.n if sampling.greedy else 1


def check_lengths(prompts: Sequence[Sequence[int]], extra: int, what: str, max_model_len: int) -> None:
    longest = max((len(p) for p in prompts), default=0)
    if longest + extra > max_model_len:
        raise ValueError(
            f"{what} of {longest} + {extra} tokens exceed the engine's max_model_len={max_model_len}; raise "
            "rollout.vllm.max_model_len (or rollout.max_prompt_len / max_new_tokens that size it by default)"
        )


def check_teacher_request(teacher_prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], topk: int,
                          max_logprobs: int) -> None:
    if len(teacher_prompts) != len(responses):
        raise ValueError(f"{len(teacher_prompts)} teacher prompts for {len(responses)} responses")
    if topk > max_logprobs:
        raise ValueError(f"topk={topk} exceeds rollout.vllm.max_logprobs={max_logprobs}")
    if any(len(p) == 0 for p in teacher_prompts):
        raise ValueError("a teacher prompt is empty: the first response token needs a context")


# One scored position: token id -> (log-prob, rank), as vLLM's prompt_logprobs give it.
Position = dict[int, tuple[float, int | None]]


def teacher_scores(teacher_prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], topk: int,
                   prompt_logprobs: Sequence[Sequence[Position | None]]) -> TeacherScores:
    """`TeacherScores` from each full sequence's prompt log-probs (entry i scores token i given tokens < i)."""
    width = max(max((len(r) for r in responses), default=0), 1)
    B = len(responses)
    token_logp = torch.zeros(B, width)
    topk_ids = torch.zeros(B, width, topk, dtype=torch.long)
    topk_logp = torch.full((B, width, topk), float("-inf"))
    mask = torch.zeros(B, width, dtype=torch.bool)
    for b, (prompt, response, positions) in enumerate(zip(teacher_prompts, responses, prompt_logprobs, strict=True)):
        for t, token in enumerate(response):
            position = positions[len(prompt) + t]
            token_logp[b, t] = position[token][0]
            mask[b, t] = True
            ranked = sorted((rank, tok, logprob) for tok, (logprob, rank) in position.items() if 0 < (rank or 0) <= topk)
            for k, (_, tok, logprob) in enumerate(ranked[:topk]):
                topk_ids[b, t, k] = tok
                topk_logp[b, t, k] = logprob
    return TeacherScores(token_logp, topk_ids, topk_logp, mask)
