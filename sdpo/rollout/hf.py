"""Rollouts with transformers `generate` on the policy model itself (no second copy, no weight sync)."""

from __future__ import annotations

from collections.abc import Sequence
import contextlib

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sdpo.batch import build_model_inputs
from sdpo.config import RolloutConfig
from sdpo.rollout.base import ENGINES, Completion, RolloutEngine, SamplingSettings


@ENGINES.register("hf")
class HFEngine(RolloutEngine):
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: RolloutConfig,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = config.hf_batch_size
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Completion]:
        was_training = self.model.training
        self.model.eval()
        try:
            prompts_per_call = max(1, self.batch_size // sampling.n)
            completions: list[Completion] = []
            for start in range(0, len(prompts), prompts_per_call):
                chunk = prompts[start : start + prompts_per_call]
                completions += self._generate_chunk(chunk, start, sampling)
            return completions
        finally:
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


def _cut_at_eos(sequence: list[int], eos_id: int, pad_id: int) -> tuple[list[int], bool]:
    """The response up to and including the first EOS; whether an EOS ended it."""
    if eos_id in sequence:
        return sequence[: sequence.index(eos_id) + 1], True
    # Rows that stopped on a stop string are padded after it.
    while sequence and sequence[-1] == pad_id and pad_id != eos_id:
        sequence = sequence[:-1]
    return sequence, False
