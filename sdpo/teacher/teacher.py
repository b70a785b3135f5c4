"""The self-teacher: which weights re-score the rollouts under the reprompt (spec section 4), and that scoring.

One object with a `kind`, not four code paths through the trainer:
- live: the current policy weights (unstable in the paper, Table 4);
- frozen: the initial weights;
- ema: teacher <- (1 - tau) teacher + tau policy after each optimizer step with a finite grad norm;
- trust_region: teacher logits = lerp(reference logits, live logits, mix), i.e. q ~ exp((1-mix) log q_ref + mix log q).

Where the teacher's weights live depends on the policy:
- a plain model: frozen / ema / the trust-region reference are one full copy (`self.model`);
- a LoRA policy (PEFT): never a copy of the base weights. frozen and the trust-region reference are the policy with
  its adapter disabled (the base model: the initial weights, since a fresh LoRA adapter starts at zero); ema is a
  second adapter, "sdpo_ema", an EMA of the trainable adapter's weights, switched in for the teacher forward only.

The teacher returns hidden states and output heads instead of logits, so that the loss can project to the
vocabulary one sequence chunk at a time (`sdpo.losses.chunked_response_terms`). Every teacher forward runs in eval
mode (no dropout noise in the targets) under no_grad.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from sdpo.batch import ModelInputs
from sdpo.config import RepromptConfig, TeacherConfig
from sdpo.models import is_peft_model, output_head, render_chat, reshard, response_hidden_states
from sdpo.sharding import copy_whole_into, full_state_dict, lerp_, load_full_state_dict, whole
from sdpo.teacher.reprompt import Reprompt, fit_bodies

EMA_ADAPTER = "sdpo_ema"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def base_weights(policy: nn.Module) -> Iterator[nn.Module]:
    """The LoRA policy with its adapter disabled: the base model, without a copy."""
    with policy.disable_adapter():
        yield policy


@contextlib.contextmanager
def active_adapter(policy: nn.Module, name: str) -> Iterator[nn.Module]:
    """The LoRA policy with adapter `name` in place of the trainable one, for a no-grad forward."""
    trained = policy.active_adapter
    policy.set_adapter(name, inference_mode=True)
    try:
        yield policy
    finally:
        policy.set_adapter(trained)  # makes the trained adapter trainable again, `name` frozen


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


def add_ema_adapter(policy: nn.Module, name: str = EMA_ADAPTER) -> dict[str, tuple[Tensor, Tensor]]:
    """A frozen second adapter initialised as a copy of the trainable one: {name: (ema_param, trained_param)}."""
    trained = policy.active_adapter
    config = copy.deepcopy(policy.peft_config[trained])
    config.inference_mode = True
    trainable_before = [n for n, p in policy.named_parameters() if p.requires_grad]
    policy.add_adapter(name, config)
    pairs = ema_adapter_pairs(policy, name)
    for param, source in pairs.values():
        param.requires_grad_(False)
        with torch.no_grad():
            param.copy_(source)
    if not pairs or [n for n, p in policy.named_parameters() if p.requires_grad] != trainable_before:
        raise RuntimeError("adding the EMA teacher adapter changed which parameters train; check the PEFT version")
    return pairs


def ema_adapter_pairs(policy: nn.Module, name: str = EMA_ADAPTER) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (EMA adapter parameter, trained adapter parameter)}, looked up in the policy as it is now."""
    trained = policy.active_adapter
    params = dict(policy.named_parameters())
    return {key: (param, params[key.replace(f".{name}.", f".{trained}.")]) for key, param in params.items() if f".{name}." in key}


class Teacher:
    """`copy_policy`: how to take a frozen copy of the policy (`frozen_copy` unless the policy is partitioned at load
    time, as under DeepSpeed ZeRO-3, where the trainer loads the initial weights again)."""

    def __init__(self, config: TeacherConfig, policy: nn.Module,
                 copy_policy: Callable[[nn.Module], nn.Module] = frozen_copy) -> None:
        self.config = config
        self.kind = config.kind
        self.lora = is_peft_model(policy)
        self.model: nn.Module | None = None  # a full copy (plain policies only)
        self._ema_pairs: dict[str, tuple[Tensor, Tensor]] = {}  # LoRA ema: name -> (teacher param, trained param)
        if self.lora and self.kind == "ema":
            self._ema_pairs = add_ema_adapter(policy)
        elif not self.lora and self.kind in ("frozen", "ema", "trust_region"):
            self.model = copy_policy(policy)

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None:
        """After `Accelerator.prepare(policy)`: put the teacher where the prepared policy lives.

        The teacher is built from the policy before `prepare`, because a sharded module cannot be copied. Its own
        copy is prepared like the policy (`prepare_copy`: a device, FSDP2 shards, or a DeepSpeed ZeRO-3 engine); a
        LoRA EMA adapter is paired again with the policy's parameters, which FSDP2 replaced by shards. The EMA
        update then pairs shards with shards.
        """
        if self.model is not None:
            self.model = prepare_copy(self.model)
        if self._ema_pairs:
            self._ema_pairs = ema_adapter_pairs(policy)

    def release(self) -> None:
        """After the loss's backward: under FSDP2, free the teacher's gathered output head (`sdpo.models.reshard`)."""
        if self.model is not None:
            reshard(self.model)

    def owned_parameters(self) -> list[Tensor]:
        """The tensors this teacher holds besides the policy's own (a full copy, an adapter, or nothing)."""
        if self.model is not None:
            return list(self.model.parameters())
        return [teacher for teacher, _ in self._ema_pairs.values()]

    def _weights(self, policy: nn.Module, which: str) -> contextlib.AbstractContextManager[nn.Module]:
        """A context that yields the module to run for `which` in {live, reference, teacher}."""
        if which == "live":
            return contextlib.nullcontext(policy)
        if self.model is not None:
            return contextlib.nullcontext(self.model)
        assert self.lora, f"teacher kind {self.kind!r} has no weights of its own"
        if which == "teacher" and self.kind == "ema":
            return active_adapter(policy, EMA_ADAPTER)
        return base_weights(policy)

    def _sources(self) -> list[tuple[str, float]]:
        if self.kind == "live":
            return [("live", 1.0)]
        if self.kind == "trust_region":
            mix = self.config.trust_region_mix
            return [("reference", 1.0 - mix), ("live", mix)]
        return [("teacher" if self.kind == "ema" else "reference", 1.0)]

    @torch.no_grad()
    def hidden_states(self, policy: nn.Module, inputs: ModelInputs) -> TeacherHidden:
        hidden, heads, weights = [], [], []
        for which, weight in self._sources():
            if weight == 0.0:
                continue
            with self._weights(policy, which) as model, eval_mode(model):
                hidden.append(response_hidden_states(model, inputs).detach())
                # The output head is never adapted (LoRAConfig forbids it), so it is the same outside the context.
                heads.append(output_head(model))
            weights.append(weight)
        return TeacherHidden(hidden, heads, weights)

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """EMA step; call after each optimizer step whose grad norm was finite.

        Sharded teacher and policy are partitioned alike, so each rank lerps the part it holds (`local_part`).
        """
        if self.kind != "ema" or self.config.update_rate == 0.0:
            return
        tau = self.config.update_rate
        if self.lora:
            pairs = list(self._ema_pairs.values())
        else:
            assert self.model is not None
            pairs = list(zip(self.model.parameters(), policy.parameters(), strict=True))
        for teacher_param, policy_param in pairs:
            lerp_(teacher_param, policy_param, tau)

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint must keep: only the EMA teacher moves (frozen weights are the initial ones)."""
        if self.kind != "ema":
            return {}
        if self.lora:
            return {name: whole(t) for name, (t, _) in self._ema_pairs.items()}  # sharded: gathered, on every rank
        assert self.model is not None
        return full_state_dict(self.model)  # sharded: a collective, every rank calls it

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            return
        if self.lora:
            if set(state) != set(self._ema_pairs):
                mismatch = sorted(set(state) ^ set(self._ema_pairs))[:3]
                raise RuntimeError(f"the checkpoint's EMA adapter does not match the model's: {mismatch}")
            for name, (teacher_param, _) in self._ema_pairs.items():
                copy_whole_into(teacher_param, state[name])
        elif self.model is not None:
            load_full_state_dict(self.model, state)


def teacher_prompt_ids(
    reprompts: Sequence[Reprompt],
    student_prompt_ids: Sequence[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    config: RepromptConfig,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """Render each reprompt with the chat template (and `model.chat_template_kwargs`), fitting it into
    `max_reprompt_len` tokens.

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
        ids = render_chat(tokenizer, reprompt.messages(config), chat_template_kwargs)
        if len(ids) > config.max_reprompt_len:
            empty = {
                "solution": None if reprompt.solution is None else "",
                "feedback": None if reprompt.feedback is None else "",
            }
            empty_ids = render_chat(tokenizer, reprompt.messages(config, **empty), chat_template_kwargs)
            budget = config.max_reprompt_len - len(empty_ids)
            # Token boundaries can merge differently once the bodies are cut and re-rendered: tighten and retry.
            for _ in range(4):
                solution, feedback = fit_bodies(reprompt.solution, reprompt.feedback, budget, encode, decode)
                ids = render_chat(tokenizer, reprompt.messages(config, solution, feedback), chat_template_kwargs)
                if len(ids) <= config.max_reprompt_len:
                    break
                budget -= len(ids) - config.max_reprompt_len
        out.append(ids)
    return out
