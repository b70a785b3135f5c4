"""Rollouts with transformers `generate` on the policy model itself (no second copy, no weight sync)."""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sdpo.batch import build_model_inputs
from sdpo.rollout.base import ENGINES, Completion, EngineSource, RolloutEngine, SamplingSettings


@ENGINES.register("hf")
class HFEngine(RolloutEngine):
    """transformers `generate` on the policy itself; `config`: rollout.*."""

    generates_with_policy = True

    @classmethod
    def build(cls, config: Any, source: EngineSource) -> HFEngine:
        return cls(source.model, source.tokenizer, config, autocast_dtype=source.autocast_dtype, synced=source.sharded)

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: Any,
        autocast_dtype: torch.dtype | None = None,
        synced: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = config.hf_batch_size
        self.autocast_dtype = autocast_dtype
        # FSDP2 / ZeRO-3 (parameters sharded over ranks): every forward pass is a collective, so all ranks must run
        # the same number of `generate` calls and of decoding steps (`synced_gpus`), however many prompts each holds.
        self.synced = synced

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Completion]:
        was_training = self.model.training
        self.model.eval()
        root = self.model if self.synced and isinstance(self.model, FSDPModule) else None
        if root is not None:
            # PEFT's generate enters below the FSDP2 root, whose own parameters would stay sharded: gather them.
            root.unshard()
        try:
            prompts_per_call = max(1, self.batch_size // sampling.n)
            starts = list(range(0, len(prompts), prompts_per_call))
            calls = len(starts)
            if self.synced:  # ranks with fewer prompts join the others' calls with stand-in ones, output discarded
                calls = _max_over_ranks(calls, next(self.model.parameters()).device)
            completions: list[Completion] = []
            for call in range(calls):
                if call < len(starts):
                    start = starts[call]
                    completions += self._generate_chunk(prompts[start : start + prompts_per_call], start, sampling)
                else:
                    self._generate_chunk([[self.tokenizer.eos_token_id]], 0, sampling)
            return completions
        finally:
            if root is not None:
                root.reshard()
            self.model.train(was_training)

    def _generate_chunk(self, prompts: Sequence[Sequence[int]], offset: int, sampling: SamplingSettings) -> list[Completion]:
        tok = self.tokenizer
        inputs = build_model_inputs(prompts, [[] for _ in prompts], tok.pad_token_id)
        width = inputs.prompt_width
        device = next(self.model.parameters()).device
        kwargs = dict(
            input_ids=inputs.input_ids[:, :width].to(device),
            attention_mask=inputs.attention_mask[:, :width].to(device),
            max_new_tokens=sampling.max_new_tokens,
            # Greedy decoding gives n identical samples: decode once, repeat below (generate refuses n > 1 there).
            num_return_sequences=1 if sampling.greedy else sampling.n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            synced_gpus=self.synced,
        )
        if sampling.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else None,
            )
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=tok)
        autocast = (
            torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        )
        with autocast:
            out = self.model.generate(**kwargs)
        rows = out[:, width:].tolist()
        if sampling.greedy:
            rows = [row for row in rows for _ in range(sampling.n)]
        completions = []
        for row, sequence in enumerate(rows):
            ids, finished = _cut_at_eos(sequence, tok.eos_token_id, tok.pad_token_id)
            text = tok.decode(ids, skip_special_tokens=True)
            stopped = any(s in text for s in sampling.stop)
            completions.append(
                Completion(
                    prompt_index=offset + row // sampling.n,
                    token_ids=ids,
                    text=text,
                    truncated=not (finished or stopped),
                )
            )
        return completions


def _max_over_ranks(value: int, device: torch.device) -> int:
    total = torch.tensor([value], device=device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    return int(total)


def _cut_at_eos(sequence: list[int], eos_id: int, pad_id: int) -> tuple[list[int], bool]:
    """The response up to and including the first EOS; whether an EOS ended it."""
    if eos_id in sequence:
        return sequence[: sequence.index(eos_id) + 1], True
    # Rows that stopped on a stop string are padded after it.
    while sequence and sequence[-1] == pad_id and pad_id != eos_id:
        sequence = sequence[:-1]
    return sequence, False
