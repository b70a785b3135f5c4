"""Where the teacher's weights come from (docs/algorithm.md §4), apart from how they score (`sdpo.teacher.teacher`).

Each source is registered by name in `WEIGHT_SOURCES` (`sdpo.teacher.choices`), and a teacher kind mixes the logits
of one or more sources:
- "live": the current policy weights (nothing of its own to hold, place or save);
- "initial": the policy's initial weights (frozen; also the KL reference);
- "ema": teacher <- (1 - tau) teacher + tau policy after each optimizer step with a finite grad norm.

Where the weights live depends on the policy:
- a plain model: the initial weights (`InitialWeights`) and the EMA weights (`EMAWeights`) are full copies;
- a LoRA policy (PEFT): never a copy of the base weights. The initial weights are the policy with its adapter
  disabled (a fresh LoRA adapter starts at zero); the EMA weights are a second adapter, "sdpo_ema", switched in for
  the teacher forward only.

Every source answers the same calls: `use(policy, route)` (a context giving the module to run; `route`: which of
several models, for a source that holds several), `check_tokenizer` (at start: whether the weights read the policy's
tokens), `place`, `parameters`, `release`, `update`, `state_dict` / `load_state_dict`. A model other than the policy
is the "external" source (`sdpo.teacher.external`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import copy

import torch
from torch import Tensor, nn

from sdpo.models import is_peft_model, reshard
from sdpo.sharding import copy_whole_into, full_state_dict, lerp_, load_full_state_dict, whole
from sdpo.teacher.choices import WEIGHT_SOURCES

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


class InitialWeights:
    """The policy's initial weights (frozen and trust-region teachers, the KL reference): a frozen full copy, or for
    a LoRA policy the policy itself with its adapter disabled."""

    def __init__(self, policy: nn.Module, copy_policy: Callable[[nn.Module], nn.Module] = frozen_copy) -> None:
        self.model: nn.Module | None = None if is_peft_model(policy) else copy_policy(policy)

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None:
        if self.model is not None:
            self.model = prepare_copy(self.model)

    def use(self, policy: nn.Module, route: int = 0) -> contextlib.AbstractContextManager[nn.Module]:
        return contextlib.nullcontext(self.model) if self.model is not None else base_weights(policy)

    def check_tokenizer(self, tokenizer: object) -> None:
        """The policy's own weights read the policy's tokens."""

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters()) if self.model is not None else []

    def release(self) -> None:
        """Under FSDP2, free the output head a no-grad forward left gathered (`sdpo.models.reshard`)."""
        if self.model is not None:
            reshard(self.model)

    def update(self, policy: nn.Module) -> None:
        """Frozen: the initial weights never move."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}  # the initial weights are the policy's own at the start: nothing to keep

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class EMAWeights:
    """The EMA teacher's weights: a full copy, or for a LoRA policy a second adapter (never the base weights)."""

    def __init__(self, policy: nn.Module, copy_policy: Callable[[nn.Module], nn.Module], rate: float) -> None:
        self.rate, self.lora = rate, is_peft_model(policy)
        self.model: nn.Module | None = None if self.lora else copy_policy(policy)
        self._pairs = add_ema_adapter(policy) if self.lora else {}  # name -> (EMA param, trained param)

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None:
        """A full copy is placed like the policy; an adapter is paired again with the policy's parameters, which
        FSDP2 replaced by shards (the update then pairs shards with shards)."""
        if self.model is not None:
            self.model = prepare_copy(self.model)
        if self._pairs:
            self._pairs = ema_adapter_pairs(policy)

    def use(self, policy: nn.Module, route: int = 0) -> contextlib.AbstractContextManager[nn.Module]:
        return contextlib.nullcontext(self.model) if self.model is not None else active_adapter(policy, EMA_ADAPTER)

    def check_tokenizer(self, tokenizer: object) -> None:
        """The policy's own weights read the policy's tokens."""

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters()) if self.model is not None else [t for t, _ in self._pairs.values()]

    def release(self) -> None:
        if self.model is not None:
            reshard(self.model)

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """Sharded teacher and policy are partitioned alike, so each rank lerps the part it holds (`lerp_`)."""
        if self.rate == 0.0:
            return
        pairs = list(self._pairs.values()) if self.lora else list(zip(self.parameters(), policy.parameters(), strict=True))
        for teacher_param, policy_param in pairs:
            lerp_(teacher_param, policy_param, self.rate)

    def state_dict(self) -> dict[str, Tensor]:
        if self.lora:
            return {name: whole(t) for name, (t, _) in self._pairs.items()}  # sharded: gathered, on every rank
        return full_state_dict(self.model)  # sharded: a collective, every rank calls it

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not self.lora:
            load_full_state_dict(self.model, state)
            return
        if set(state) != set(self._pairs):
            raise RuntimeError(f"the checkpoint's EMA adapter does not match the model's: {sorted(set(state) ^ set(self._pairs))[:3]}")
        for name, (teacher_param, _) in self._pairs.items():
            copy_whole_into(teacher_param, state[name])


class LiveWeights:
    """The current policy weights (live and trust-region teachers): nothing of its own to hold, place or save."""

    model = None

    def use(self, policy: nn.Module, route: int = 0) -> contextlib.AbstractContextManager[nn.Module]:
        return contextlib.nullcontext(policy)

    def check_tokenizer(self, tokenizer: object) -> None:
        """The policy's own weights read the policy's tokens."""

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None:
        pass

    def parameters(self) -> list[Tensor]:
        return []

    def release(self) -> None:
        pass

    def update(self, policy: nn.Module) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


# source name -> (policy, copy_policy, algorithm.teacher config) -> the weights
WEIGHT_SOURCES.register("live")(lambda policy, copy_policy, config: LiveWeights())
WEIGHT_SOURCES.register("initial")(lambda policy, copy_policy, config: InitialWeights(policy, copy_policy))
WEIGHT_SOURCES.register("ema")(lambda policy, copy_policy, config: EMAWeights(policy, copy_policy, config.update_rate))
