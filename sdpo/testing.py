"""Deterministic stand-ins for tests and benchmarks: a scripted rollout engine and a synthetic tokenizer.

- `ScriptedEngine`: completions that depend only on the prompt tokens and the sample index, never on the rank, the
  seed or the weights. Two runs that see the same global batch then train on the same data whatever the number of
  processes (tests/test_distributed.py), and a benchmark measures the update without generation time in it.
- `synthetic_tokenizer`: a word-level tokenizer over `t0 ... t{V-1}` with a chat template, built locally, so that a
  random-init model of any vocabulary size runs through the trainer without downloading a tokenizer
  (benchmarks/gpu/scale_check.py).
- `launch_on_cpu_as`: in a process started by torchrun on a CPU-only machine, set Accelerate up the way `accelerate
  launch --config_file configs/accelerate/<fsdp2|deepspeed_zero3>.yaml` does on GPUs (tests/test_distributed.py,
  benchmarks/sharding_memory_cpu.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import hashlib
import os
from pathlib import Path
import random

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sdpo.rollout.base import Completion, RolloutEngine, SamplingSettings

Respond = Callable[[Sequence[int], int], list[int]]


def _prompt_rng(prompt: Sequence[int], index: int, salt: str) -> random.Random:
    digest = hashlib.sha256(f"{salt}:{index}:{','.join(map(str, prompt))}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


class ScriptedEngine(RolloutEngine):
    """n completions per prompt from `respond(prompt_ids, sample_index) -> token ids` (weights are ignored).

    The default response is pseudo-random: `min_len..max_len` ids drawn from `token_range`, ending with EOS
    (when `eos` is true), seeded by the prompt and the index only.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        respond: Respond | None = None,
        token_range: tuple[int, int] = (100, 1000),
        min_len: int = 2,
        max_len: int = 8,
        eos: bool = True,
        salt: str = "scripted",
    ) -> None:
        self.tokenizer = tokenizer
        self.token_range, self.min_len, self.max_len, self.eos, self.salt = token_range, min_len, max_len, eos, salt
        self.respond = respond or self._random_response
        self.calls = 0

    def _random_response(self, prompt: Sequence[int], index: int) -> list[int]:
        rng = _prompt_rng(prompt, index, self.salt)
        ids = [rng.randrange(*self.token_range) for _ in range(rng.randint(self.min_len, self.max_len))]
        return ids + ([self.tokenizer.eos_token_id] if self.eos else [])

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Completion]:
        self.calls += 1
        eos = self.tokenizer.eos_token_id
        out = []
        for i, prompt in enumerate(prompts):
            for j in range(sampling.n):
                ids = list(self.respond(prompt, j))[: sampling.max_new_tokens]
                finished = bool(ids) and ids[-1] == eos
                out.append(Completion(i, ids, self.tokenizer.decode(ids, skip_special_tokens=True), not finished))
        return out


CHAT_TEMPLATE = (
    "{% for m in messages %}<bos> {{ m['role'] }} {{ m['content'] }} <eot> {% endfor %}"
    "{% if add_generation_prompt %}<bos> assistant {% endif %}"
)
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<eot>", "system", "user", "assistant"]


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level: ids below len(SPECIAL) are the special words, the rest are `t<id>` (text "t5 t17" <-> [5, 17])."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(SPECIAL)}
    vocab |= {f"t{i}": i for i in range(len(SPECIAL), vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
# What `accelerate launch` exports for each key of a config file's deepspeed_config.
_DEEPSPEED_ENV = {"zero_stage": "ZERO_STAGE", "offload_optimizer_device": "OFFLOAD_OPTIMIZER_DEVICE",
                  "offload_param_device": "OFFLOAD_PARAM_DEVICE", "zero3_init_flag": "ZERO3_INIT"}


def launch_on_cpu_as(sharding: str) -> None:
    """Call before building the trainer, in each torchrun process: "ddp" (nothing to do), "fsdp2", "zero3", "zero2".

    Accelerate enables FSDP and DeepSpeed only with an accelerator: on the CPU it would run FSDP's processes as DDP,
    and count DeepSpeed's as one process each (it takes the count from the accelerator's backend). So the
    variables that `accelerate launch` derives from the config file are set here, and Accelerate's state is set
    as it would be on GPUs, over gloo, with the same plugin.
    """
    import accelerate.state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    import yaml

    if sharding == "ddp":
        return
    if sharding == "fsdp2":
        config = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp2.yaml").read_text())["fsdp_config"]
        for key, value in config.items():
            os.environ["FSDP_" + key.removeprefix("fsdp_").upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        init = accelerate.state.AcceleratorState.__init__

        def init_with_fsdp(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, FullyShardedDataParallelPlugin()

        accelerate.state.AcceleratorState.__init__ = init_with_fsdp
        return
    if sharding not in ("zero3", "zero2"):
        raise ValueError(f"unknown sharding {sharding!r}: ddp, fsdp2, zero3 or zero2")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    config = yaml.safe_load((ACCELERATE_CONFIGS / "deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    for key, value in config.items():
        os.environ["ACCELERATE_DEEPSPEED_" + _DEEPSPEED_ENV[key]] = str(value).lower()
    os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = sharding[-1]  # as `accelerate launch --zero_stage`
    accelerate.state.PartialState._prepare_backend = lambda self, *args, **kwargs: ("gloo", DistributedType.MULTI_CPU)
