"""The rollout-engine interface: token prompts in, n sampled completions per prompt out.

Engines: `hf` (transformers `generate` on the policy itself, so weight sync is free), `vllm` (a colocated vLLM
`LLM`, synced after every optimizer step) and `vllm_server` (a vLLM server in its own process, synced through a
process group). The trainer calls `generate` and `sync_weights`; an engine that declares `scores_teacher` also offers
`score_teacher` (algorithm.teacher.scorer=engine).

Code outside sdpo/rollout/ asks an engine class what it can do (its capability flags and class methods, e.g.
`ENGINES.get(config.rollout.engine).loads_checkpoint(config.rollout)`), never what it is called. This module and the
engines' modules import nothing of the config, so that the config can validate `rollout.engine` against `ENGINES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from sdpo.registry import Registry


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> SamplingSettings:
        """`config`: the rollout.* config; `overrides` that are not None replace its values."""
        settings = cls(
            n=config.num_generations,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_new_tokens=config.max_new_tokens,
            stop=tuple(config.stop),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]  # the response, ending with EOS unless truncated
    text: str  # decoded without special tokens
    truncated: bool  # stopped by max_new_tokens, not by EOS or a stop string
    logprobs: list[float] | None = None  # the sampler's log-probs of token_ids (processed, at the temperature)
    # The version of the weights that sampled it, as the engine reports it (the server: the trainer's step at its
    # last sync); None where the engine reports none (it then serves the weights of the last sync).
    weights_version: int | None = None


@dataclass
class SyncStats:
    seconds: float = 0.0
    bytes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class TeacherScores:
    """Log-probs of each response token under its reprompt, from the engine (right-padded, `mask_BR` marks tokens)."""

    token_logp_BR: Tensor  # float32; log q(y_t), 0 at padding
    topk_ids_BRK: Tensor  # long; the teacher's own top-k tokens by rank (K = topk; empty when topk = 0)
    topk_logp_BRK: Tensor  # float32; their log-probs, -inf at padding
    mask_BR: Tensor  # bool


@dataclass(frozen=True)
class EngineSource:
    """What an engine may be built from (`RolloutEngine.build`): the policy object and its checkpoint directory."""

    model: Any  # the policy (unwrapped), which an engine that generates with it samples from
    tokenizer: Any
    model_path: Any  # the policy's checkpoint directory, for engines that load their own copy
    max_model_len: int  # the longest sequence the engine must hold (rollouts, and the teacher's reads)
    autocast_dtype: torch.dtype | None = None
    sharded: bool = False  # the policy's parameters are split over ranks (FSDP2, ZeRO-3): generating is a collective


class RolloutEngine(ABC):
    # An optional capability: True where `score_teacher` works (the vLLM engines).
    scores_teacher: bool = False
    # True where the engine generates in another process, so that generation may overlap the update
    # (rollout.async_steps); such an engine may also hold other weights than the policy's when the run starts.
    out_of_process: bool = False
    # True where the engine samples from the policy object itself (no copy of its own, so weight sync is free; a
    # LoRA policy is used as is; it generates in calls of rollout.hf_batch_size sequences).
    generates_with_policy: bool = False
    # True where the engine computes in its own precision, rollout.vllm.dtype (else the trainer's autocast).
    own_dtype: bool = False

    @classmethod
    def build(cls, config: Any, source: EngineSource) -> RolloutEngine:
        """The engine for the rollout.* `config`: by default one that loads the policy's checkpoint itself."""
        return cls(source.model_path, source.tokenizer, config, max_model_len=source.max_model_len)  # type: ignore[call-arg]

    @classmethod
    def loads_checkpoint(cls, config: Any) -> bool:
        """Whether the engine reads the policy from a checkpoint directory (so a model object needs one)."""
        return not cls.generates_with_policy

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Completion]:
        """n completions per prompt, prompt-major: completions[i * n + j] belongs to prompts[i]."""

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> SyncStats:
        """Make the next `generate` use `model`'s current weights. `version`: the optimizer steps in them (the
        trainer's step), which an engine that reports versions serves with them (`Completion.weights_version`)."""
        return SyncStats()

    def score_teacher(self, teacher_prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      topk: int = 0) -> TeacherScores:
        """Log-probs of each response token under its teacher prompt (engines with `scores_teacher` only)."""
        raise NotImplementedError(f"the {type(self).__name__} engine cannot score the teacher")

    def close(self) -> None:
        """Free the engine's memory."""


ENGINES: Registry[type[RolloutEngine]] = Registry("rollout engine")
