"""Rollout engines behind one interface: `hf` (transformers generate), `vllm` (colocated vLLM), `vllm_server`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sdpo.config import RolloutConfig
from sdpo.rollout.base import ENGINES, Completion, RolloutEngine, SamplingSettings, SyncStats, TeacherScores
from sdpo.rollout.hf import HFEngine


def build_engine(
    config: RolloutConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str | Path,
    max_model_len: int,
    autocast_dtype: torch.dtype | None = None,
    sharded: bool = False,
) -> RolloutEngine:
    """`sharded`: the policy's parameters are split over ranks (FSDP2, ZeRO-3), so generating with it is a collective."""
    if config.engine == "hf":
        return HFEngine(model, tokenizer, config, autocast_dtype=autocast_dtype, synced=sharded)
    if config.engine == "vllm":
        from sdpo.rollout.vllm import VLLMEngine  # imports vllm lazily; a clear error says how to install it

        return VLLMEngine(model_path, tokenizer, config, max_model_len=max_model_len)
    if config.engine == "vllm_server":
        from sdpo.rollout.server import ServerEngine  # a server process; the trainer's process needs no vLLM

        return ServerEngine(model_path, tokenizer, config, max_model_len=max_model_len)
    return ENGINES.get(config.engine)(model_path, tokenizer, config, max_model_len=max_model_len)  # type: ignore[call-arg]


__all__ = ["ENGINES", "Completion", "HFEngine", "RolloutEngine", "SamplingSettings", "SyncStats", "TeacherScores", "build_engine"]
