"""The self-teacher: which weights re-score the rollouts under the reprompt (spec section 4), and that scoring.

One object with a `kind`, not four code paths through the trainer:
- live: the current policy weights (unstable in the paper, Table 4);
- frozen: the initial weights;
- ema: teacher <- (1 - tau) teacher + tau policy after each optimizer step with a finite grad norm;
- trust_region: teacher logits = lerp(reference logits, live logits, mix), i.e. q ~ exp((1-mix) log q_ref + mix log q).
The teacher returns hidden states and output heads instead of logits, so that the loss can project to the
vocabulary one sequence chunk at a time (`sdpo.losses.chunked_response_terms`). Every teacher forward runs in eval
mode (no dropout noise in the targets) under no_grad.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from sdpo.batch import ModelInputs
from sdpo.config import RepromptConfig, TeacherConfig
from sdpo.models import render_chat, response_hidden_states
from sdpo.teacher.reprompt import Reprompt, fit_bodies


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class TeacherHidden:
    """Teacher logits = sum_i weights[i] * heads[i](hidden[i]); one entry except for the trust-region teacher."""

    hidden: list[Tensor]  # each [B, R, H], detached
    heads: list[Callable[[Tensor], Tensor]]
    weights: list[float]


def frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone.eval()


class Teacher:
    def __init__(self, config: TeacherConfig, policy: nn.Module) -> None:
        self.config = config
        self.kind = config.kind
        # live uses the policy itself; the others keep their own weights.
        self.model = frozen_copy(policy) if self.kind in ("frozen", "ema", "trust_region") else None

    def _sources(self, policy: nn.Module) -> list[tuple[nn.Module, float]]:
        if self.kind == "live":
            return [(policy, 1.0)]
        assert self.model is not None
        if self.kind == "trust_region":
            mix = self.config.trust_region_mix
            return [(self.model, 1.0 - mix), (policy, mix)]
        return [(self.model, 1.0)]

    @torch.no_grad()
    def hidden_states(self, policy: nn.Module, inputs: ModelInputs) -> TeacherHidden:
        hidden, heads, weights = [], [], []
        for model, weight in self._sources(policy):
            if weight == 0.0:
                continue
            with eval_mode(model):
                hidden.append(response_hidden_states(model, inputs).detach())
            heads.append(model.get_output_embeddings())
            weights.append(weight)
        return TeacherHidden(hidden, heads, weights)

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """EMA step; call after each optimizer step whose grad norm was finite."""
        if self.kind != "ema" or self.config.update_rate == 0.0:
            return
        assert self.model is not None
        tau = self.config.update_rate
        for teacher_param, policy_param in zip(self.model.parameters(), policy.parameters(), strict=True):
            teacher_param.lerp_(policy_param.detach().to(teacher_param.dtype), tau)

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict() if self.model is not None else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.model is not None and state:
            self.model.load_state_dict(state)


def teacher_prompt_ids(
    reprompts: Sequence[Reprompt],
    student_prompt_ids: Sequence[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    config: RepromptConfig,
) -> list[list[int]]:
    """Render each reprompt with the chat template, fitting it into `max_reprompt_len` tokens.

    Only the demonstration and the feedback are shortened; the question, the instruction and the assistant header
    stay intact. Rollouts without a signal keep their student prompt (their distillation loss is masked anyway).
    """

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids)

    out = []
    for reprompt, student_ids in zip(reprompts, student_prompt_ids, strict=True):
        if not reprompt.has_signal:
            out.append(list(student_ids))
            continue
        ids = render_chat(tokenizer, reprompt.messages(config))
        if len(ids) > config.max_reprompt_len:
            empty = {
                "solution": None if reprompt.solution is None else "",
                "feedback": None if reprompt.feedback is None else "",
            }
            budget = config.max_reprompt_len - len(render_chat(tokenizer, reprompt.messages(config, **empty)))
            # Token boundaries can merge differently once the bodies are cut and re-rendered: tighten and retry.
            for _ in range(4):
                solution, feedback = fit_bodies(reprompt.solution, reprompt.feedback, budget, encode, decode)
                ids = render_chat(tokenizer, reprompt.messages(config, solution, feedback))
                if len(ids) <= config.max_reprompt_len:
                    break
                budget -= len(ids) - config.max_reprompt_len
        out.append(ids)
    return out
