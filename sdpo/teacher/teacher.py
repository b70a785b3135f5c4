"""The self-teacher: which weights re-score the rollouts under the reprompt (docs/algorithm.md §4), and that scoring.

One object with a `kind`, not four code paths through the trainer. A kind names the weights whose logits the teacher
mixes (`TEACHER_KINDS`, a registry: a new kind is one entry):
- live: the current policy weights (unstable in the paper, Table 4);
- frozen: the initial weights;
- ema: teacher <- (1 - tau) teacher + tau policy after each optimizer step with a finite grad norm;
- trust_region: teacher logits = lerp(initial logits, live logits, mix), i.e. q ~ exp((1-mix) log q_ref + mix log q).

Where the weights live depends on the policy:
- a plain model: the initial weights (`InitialWeights`) and the EMA weights (`EMAWeights`) are full copies;
- a LoRA policy (PEFT): never a copy of the base weights. The initial weights are the policy with its adapter
  disabled (a fresh LoRA adapter starts at zero); the EMA weights are a second adapter, "sdpo_ema", switched in for
  the teacher forward only. The KL reference of the policy loss is an `InitialWeights` too.

Who scores (`algorithm.teacher.scorer`, a type in `TEACHER_SCORERS`): "trainer", a forward pass inside the update
(`micro_batch_features`), or "engine" (`EngineScorer`), the rollout engine's prompt log-probs once per generation
batch, for engines that declare the capability (`RolloutEngine.scores_teacher`).

GRPO has no teacher: `build_teacher` gives a `NoTeacher`, whose every call is a no-op, so that the step has no
"is there a teacher?" branch.

The teacher returns features and heads instead of logits (`sdpo.models.ResponseFeatures`), so that the loss can
project to the vocabulary one sequence chunk at a time (`sdpo.losses.chunked_response_terms`). Every teacher forward
runs in eval mode (no dropout noise in the targets) under no_grad.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from sdpo.batch import ModelInputs, RolloutBatch, SharedPromptInputs, any_shared, build_prompt_inputs
from sdpo.config import RepromptConfig, SDPOConfig, TeacherConfig
from sdpo.models import PromptPass, ResponseFeatures, is_peft_model, reshard, response_features, unwrap
from sdpo.sharding import copy_whole_into, full_state_dict, lerp_, load_full_state_dict, whole
from sdpo.teacher.choices import TEACHER_KINDS, TEACHER_SCORERS, TeacherScorer
from sdpo.teacher.reprompt import Reprompt, teacher_prompt_ids

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

    def use(self, policy: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        return contextlib.nullcontext(self.model) if self.model is not None else base_weights(policy)

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters()) if self.model is not None else []

    def release(self) -> None:
        """Under FSDP2, free the output head a no-grad forward left gathered (`sdpo.models.reshard`)."""
        if self.model is not None:
            reshard(self.model)


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

    def use(self, policy: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        return contextlib.nullcontext(self.model) if self.model is not None else active_adapter(policy, EMA_ADAPTER)

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

    def use(self, policy: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        return contextlib.nullcontext(policy)

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None:
        pass

    def parameters(self) -> list[Tensor]:
        return []

    def release(self) -> None:
        pass


@dataclass
class TeacherFeatures:
    """Teacher logits = sum_i weights[i] * features[i].head(features[i].values_BRX), detached; for the micro-batch's
    rows `rows` only (None: every row), so that rows without a signal cost no vocabulary projection either."""

    features: list[ResponseFeatures]
    weights: list[float]
    rows: Tensor | None = None

    def chunk_kwargs(self) -> dict[str, Any]:
        """The teacher arguments of `sdpo.losses.chunked_response_terms`."""
        return {"teacher_features": [f.values_BRX for f in self.features], "teacher_rows": self.rows,
                "teacher_heads": [f.head for f in self.features], "teacher_weights": self.weights}

    def of_rows(self, rows: Tensor, width: int) -> TeacherFeatures:
        """These features (of a row selection) as the rows `rows` of a batch `width` positions wide: right-padded
        with zeros to that width, rows kept compact."""
        out = []
        for f in self.features:
            values = f.values_BRX
            padded = torch.nn.functional.pad(values, (0, 0, 0, width - values.shape[1])) if values.shape[1] < width else values
            out.append(ResponseFeatures(padded, f.head, f.are_logits))
        return TeacherFeatures(out, self.weights, rows.to(out[0].values_BRX.device) if out else rows)


class Teacher:
    """`copy_policy`: how to take a frozen copy of the policy before it is prepared (`frozen_copy` unless the policy is
    partitioned at load time, as under DeepSpeed ZeRO-3; see `sdpo.distributed.Distributed.frozen_copy`).
    `reprompt_len`: the longest reprompt in tokens (`reprompt_limit`)."""

    def __init__(self, config: TeacherConfig, policy: nn.Module,
                 copy_policy: Callable[[nn.Module], nn.Module] = frozen_copy, reprompt_len: int = 2**31) -> None:
        self.config, self.kind = config, config.kind
        sources = TEACHER_KINDS.get(config.kind)(config)
        needed = {source for source, _ in sources}
        self.initial = InitialWeights(policy, copy_policy) if "initial" in needed else None
        self.ema = EMAWeights(policy, copy_policy, config.update_rate) if "ema" in needed else None
        stores = {"live": LiveWeights(), "initial": self.initial, "ema": self.ema}
        self.sources = [(stores[source], weight) for source, weight in sources if weight != 0.0]
        self.scorer: TeacherScorer = TEACHER_SCORERS.get(config.scorer)()
        self.reprompt_len = reprompt_len

    @property
    def model(self) -> nn.Module | None:
        """The teacher's own full copy of the weights (EMA or initial), or None (live, LoRA)."""
        stores = [s for s in (self.ema, self.initial) if s is not None and s.model is not None]
        return stores[0].model if stores else None

    def _stores(self) -> list[InitialWeights | EMAWeights]:
        return [s for s in (self.initial, self.ema) if s is not None]

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None:
        """After the policy is prepared: put the teacher's weights where the prepared policy lives (`prepare_copy`:
        a device, FSDP2 shards, or a DeepSpeed ZeRO-3 engine). Copies are taken before, since a sharded module
        cannot be copied."""
        for store in self._stores():
            store.place(policy, prepare_copy)

    def release(self) -> None:
        """After the loss's backward: under FSDP2, free the teacher's gathered output head."""
        for store in self._stores():
            store.release()

    @contextlib.contextmanager
    def cacheable_casts(self) -> Iterator[None]:
        """Inside an autocast region around an optimizer step (`sdpo.learner.Learner._step_autocast`): let autocast
        cache its 16-bit casts of the teacher's own full copies (EMA, initial) for the whole region, as it does the
        policy's.

        Autocast caches only casts of leaf tensors that require a gradient, so the copies' parameters say they do
        for the region only. No gradient can reach them: every teacher forward runs under no_grad. Without this,
        every teacher forward (a block's reprompt pass, each micro-batch, the head once per logits chunk) cast the
        whole copy again. Nothing to do for a live teacher (the policy's casts are cached already) or a LoRA one
        (its base weights are frozen in the policy, where a gradient flag would make the backward compute them)."""
        copies = [p for store in self._stores() if store.model is not None for p in store.model.parameters()]
        for param in copies:
            param.requires_grad_(True)
        try:
            yield
        finally:
            for param in copies:
                param.requires_grad_(False)

    def owned_parameters(self) -> list[Tensor]:
        """The tensors this teacher holds besides the policy's own (a full copy, an adapter, or nothing)."""
        return [p for store in self._stores() for p in store.parameters()]

    @torch.no_grad()
    def features(self, policy: nn.Module, inputs: ModelInputs | SharedPromptInputs,
                 passes: list[PromptPass] | None = None) -> TeacherFeatures:
        """The teacher's features of the response tokens under the reprompt (`inputs`), one entry per source.
        `passes`: the sources' `prompt_passes`, which `inputs` (SharedPromptInputs) continue."""
        features, weights = [], []
        for k, (source, weight) in enumerate(self.sources):
            with source.use(policy) as model, eval_mode(model):
                features.append(response_features(model, inputs, passes[k] if passes else None).detach())
            weights.append(weight)
        return TeacherFeatures(features, weights)

    @torch.no_grad()
    def prompt_passes(self, policy: nn.Module, block: RolloutBatch, pad_id: int, device: torch.device,
                      branch: bool = False) -> list[PromptPass] | None:
        """scorer=trainer: the distinct reprompts of a block's rows with a signal through each source once (one
        `PromptPass` per source), for `micro_batch_features` to continue; None where no two rows share a reprompt.

        The failed rollouts of a group whose successful sibling they all draw as demonstration share a reprompt,
        but length-sorted micro-batches scatter them. The passes keep only key/value caches (no gradient, so no
        activations): for a block of at most `micro_batch_size` questions that is G x 2 x kv_width numbers per
        reprompt token and layer, a fraction of what the block's student activations hold."""
        reprompts = [block.teacher_prompt_ids[i] for i in block.distill_rows]
        if not self.scorer.forward_in_update or not any_shared(reprompts) or branch:  # branches share otherwise
            return None
        prompts = build_prompt_inputs(reprompts, pad_id).to(device)
        passes = []
        for source, _ in self.sources:
            with source.use(policy) as model, eval_mode(model):
                passes.append(PromptPass(model, prompts))
        return passes

    def update(self, policy: nn.Module) -> None:
        """EMA step; call after each optimizer step whose grad norm was finite."""
        if self.ema is not None:
            self.ema.update(policy)

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint must keep: only the EMA teacher moves (frozen weights are the initial ones)."""
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state and self.ema is not None:
            self.ema.load_state_dict(state)

    # -- scoring

    def check_engine(self, engine: Any) -> None:
        self.scorer.check(engine)

    def engine_context_len(self, max_new_tokens: int) -> int:
        """The longest sequence the rollout engine reads for the teacher (0: it reads none)."""
        return self.reprompt_len + max_new_tokens if not self.scorer.forward_in_update else 0

    def attach(self, batch: RolloutBatch, reprompts: list[Reprompt], tokenizer: Any, config: RepromptConfig,
               chat_template_kwargs: Any, engine: Any) -> None:
        """The teacher's context on the batch: each row's rendered reprompt (within `reprompt_len`) and whether it
        carries a signal (the distillation mask); scorer=engine also scores it now, before the update."""
        within_window = replace(config, max_reprompt_len=self.reprompt_len)
        batch.teacher_prompt_ids = teacher_prompt_ids(reprompts, batch.prompt_ids, tokenizer, within_window,
                                                     chat_template_kwargs)
        batch.distill_mask_B = torch.tensor([r.has_signal for r in reprompts])
        batch.teacher_logp_BR = self.scorer.score(batch.teacher_prompt_ids, batch.response_ids, batch.distill_rows,
                                                  batch.response_width, engine)

    def micro_batch_features(self, policy: nn.Module, micro: RolloutBatch, pad_id: int, device: torch.device,
                             any_rank: Callable[[bool], bool], share_prompts: bool = False,
                             passes: list[PromptPass] | None = None, branch: bool = False) -> TeacherFeatures | None:
        """scorer=trainer: the teacher forward for the micro-batch's rows with a distillation signal (the others are
        masked: their teacher terms are zeros), or None when no rank needs one (`any_rank`: sharded, the forward is
        a collective). `share_prompts`: rows with the same reprompt run it once (`RolloutBatch.teacher_inputs`);
        `passes`: the block's `prompt_passes`, whose reprompts the rows continue; `branch`: a multi-turn episode's
        reprompts continue its conversation's cache (`sdpo.layout.BranchInputs`)."""
        if not self.scorer.forward_in_update or not any_rank(bool(micro.distill_mask_B.any())):
            return None
        rows = torch.tensor(micro.distill_rows, dtype=torch.long)
        if len(rows) == 0:  # sharded, another rank needs the teacher: join its forward with a stand-in row (masked)
            rows = torch.zeros(1, dtype=torch.long)
        inputs = micro.select(rows).teacher_inputs(pad_id, share_prompts, passes[0].prompts if passes else None, branch)
        return self.features(policy, inputs.to(device), passes).of_rows(rows, micro.response_width)

    @staticmethod
    def token_logp(micro: RolloutBatch, terms: dict[str, Tensor], distill_mask_BR: Tensor | None) -> Tensor | None:
        """log q(y_t): from the trainer's teacher forward (`terms`) or the engine's scores; None: nothing scored."""
        if distill_mask_BR is None:
            return None
        if "teacher_logp" in terms:
            return terms["teacher_logp"].float()
        if micro.teacher_logp_BR is not None and distill_mask_BR.any():
            return micro.teacher_logp_BR.to(distill_mask_BR.device)[:, : distill_mask_BR.shape[1]]
        return None


class NoTeacher:
    """GRPO (algorithm.grpo_weight = 1): nothing re-scores the rollouts. Every teacher call of a step is a no-op, so
    that the algorithm without a teacher is a case of the same step, not a branch through it."""

    model = None

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None:
        pass

    def check_engine(self, engine: Any) -> None:
        pass

    def engine_context_len(self, max_new_tokens: int) -> int:
        return 0

    def attach(self, batch: RolloutBatch, reprompts: list[Reprompt], *args: Any) -> None:
        """No teacher prompts and no distillation mask: the batch's rows carry the policy loss only."""

    def cacheable_casts(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def prompt_passes(self, *args: Any, **kwargs: Any) -> None:
        return None

    def micro_batch_features(self, *args: Any, **kwargs: Any) -> None:
        return None

    token_logp = staticmethod(Teacher.token_logp)

    def release(self) -> None:
        pass

    def update(self, policy: nn.Module) -> None:
        pass

    def owned_parameters(self) -> list[Tensor]:
        return []

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


def reprompt_limit(config: SDPOConfig, model: nn.Module) -> int:
    """algorithm.reprompt.max_reprompt_len within the model's context window: the teacher reads a reprompt and a
    response, and positions past the window are undefined (vLLM refuses them: the paper's 10240 exceeds SmolLM2's
    8192)."""
    limit = config.algorithm.reprompt.max_reprompt_len
    window = getattr(unwrap(model).config, "max_position_embeddings", None)
    return min(limit, window - config.rollout.max_new_tokens) if window else limit


def build_teacher(config: SDPOConfig, policy: nn.Module,
                  copy_policy: Callable[[nn.Module], nn.Module] = frozen_copy) -> Teacher | NoTeacher:
    """The algorithm's teacher: none for GRPO (grpo_weight = 1), else `algorithm.teacher`'s kind and scorer."""
    if not config.algorithm.uses_teacher:
        return NoTeacher()
    return Teacher(config.algorithm.teacher, policy, copy_policy, reprompt_limit(config, policy))
