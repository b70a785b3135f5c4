"""The self-teacher: how the teacher's weights score the rollouts under the reprompt (docs/algorithm.md §2, §4).

One object with a `kind`, not four code paths through the trainer. A kind (`TEACHER_KINDS`, a registry in
`sdpo.teacher.choices`: a new kind is one entry) names the weights whose logits the teacher mixes, each a source
of `WEIGHT_SOURCES` (`sdpo.teacher.weights`: where the weights come from and how they move):
- live: the current policy weights (unstable in the paper, Table 4);
- frozen: the initial weights;
- ema: teacher <- (1 - tau) teacher + tau policy after each optimizer step with a finite grad norm;
- trust_region: teacher logits = lerp(initial logits, live logits, mix), i.e. q ~ exp((1-mix) log q_ref + mix log q);
- external: a model other than the policy, frozen (`sdpo.teacher.external`, docs/algorithm.md §11), or several, each
  row scored by the one its data column names (`TeacherRouter`).

What it reads before the response (`algorithm.teacher.context`, `TEACHER_CONTEXTS`): the reprompt, or the student's
own prompt (plain on-policy distillation: every row distilled).

Who scores (`algorithm.teacher.scorer`, a type in `TEACHER_SCORERS`): "trainer", a forward pass inside the update,
"engine" (`EngineScorer`), the rollout engine's prompt log-probs once per generation batch, for engines that
declare the capability (`RolloutEngine.scores_teacher`), or "server" (`ServerScorer`), a vLLM server of the external
teacher's own, likewise.

The learner sees one interface, `TeacherLike`, and calls it once per micro-batch (`targets`, a `TeacherTargets`
record of what the loss needs) and once after each applied optimizer step (`update`); before the update the trainer
asks it once for the batch's teacher context (`context`, a `TeacherContext` record). GRPO has no teacher:
`build_teacher` gives a `NoTeacher`, which answers the same calls with empty records, so that no step branches on
whether there is a teacher.

The teacher returns features and heads instead of logits (`sdpo.models.ResponseFeatures`), so that the loss can
project to the vocabulary one sequence chunk at a time (`sdpo.losses.chunked_response_terms`). Every teacher forward
runs in eval mode (no dropout noise in the targets) under no_grad.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from sdpo.batch import ModelInputs, RolloutBatch, SharedPromptInputs, any_shared, build_prompt_inputs
from sdpo.config import RepromptConfig, SDPOConfig, TeacherConfig
from sdpo.models import PromptPass, ResponseFeatures, response_features, unwrap
from sdpo.plan import Block, Forward, MicroBatch
from sdpo.teacher.choices import TEACHER_CONTEXTS, TEACHER_KINDS, TEACHER_SCORERS, WEIGHT_SOURCES, TeacherScorer
from sdpo.teacher.external import RoutedHead, TeacherRouter
from sdpo.teacher.reprompt import Reprompt, teacher_prompt_ids
from sdpo.teacher.weights import eval_mode, frozen_copy


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

    @staticmethod
    def routed(parts: list[TeacherFeatures]) -> TeacherFeatures:
        """Several teachers' features (one source each, `of_rows` of their own rows) as one: the rows joined, the
        features padded to the widest teacher's, and a head that gives each row its own teacher's logits."""
        values = [part.features[0].values_BRX for part in parts]
        widths = [v.shape[-1] for v in values]
        dtype = values[0].dtype if all(v.dtype == values[0].dtype for v in values) else torch.float32
        joined = torch.cat([torch.nn.functional.pad(v.to(dtype), (0, max(widths) - v.shape[-1])) for v in values])
        ends = torch.tensor([len(v) for v in values]).cumsum(0).tolist()
        head = RoutedHead([part.features[0].head for part in parts],
                          [slice(end - len(v), end) for end, v in zip(ends, values)], widths)
        return TeacherFeatures([ResponseFeatures(joined, head, parts[0].features[0].are_logits)], [1.0],
                               torch.cat([part.rows for part in parts]))


@dataclass(frozen=True)
class TeacherContext:
    """What the teacher adds to a generation batch before the update (`RolloutBatch.with_teacher` takes it)."""

    prompt_ids: list[list[int]] | None = None  # each row's rendered reprompt (its own prompt where it has no signal)
    distill_mask_B: Tensor | None = None  # bool; the row's reprompt carries a signal; None: no teacher
    logp_BR: Tensor | None = None  # log q(y_t) scored before the update (scorer=engine), else None
    route_B: Tensor | None = None  # long; each row's teacher among several (algorithm.teacher.key); None: one


@dataclass
class TeacherTargets:
    """What one micro-batch's loss needs of the teacher: which tokens are distilled, the teacher's features for the
    chunked vocabulary projection (a trainer-side forward) or its log-probs scored before the update; `release`
    after the micro-batch's backward."""

    distill_mask_BR: Tensor | None = None  # None: no teacher (the objective then has no distillation term)
    features: TeacherFeatures | None = None
    scored_logp_BR: Tensor | None = None
    done: Callable[[], None] = field(default=lambda: None, repr=False)

    def chunk_kwargs(self, distill_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """The teacher's arguments of `sdpo.losses.chunked_response_terms` (`distill_kwargs`: a logit-level mode's);
        none without a teacher forward."""
        if self.features is None:
            return {}
        return self.features.chunk_kwargs() | {"distill_kwargs": distill_kwargs}

    def token_logp(self, terms: dict[str, Tensor]) -> Tensor | None:
        """log q(y_t): from the teacher forward's chunked terms or the engine's scores; None: nothing scored."""
        if self.distill_mask_BR is None:
            return None
        if "teacher_logp" in terms:
            return terms["teacher_logp"].float()
        if self.scored_logp_BR is not None and self.distill_mask_BR.any():
            return self.scored_logp_BR.to(self.distill_mask_BR.device)[:, : self.distill_mask_BR.shape[1]]
        return None

    def release(self) -> None:
        self.done()


class TeacherLike(Protocol):
    """What the trainer and the learner ask of a teacher (`Teacher`, `NoTeacher`, or one of a researcher's own)."""

    model: nn.Module | None  # its own full copy of the weights, if it holds one
    engine_context_len: int  # the longest sequence the rollout engine reads for it (0: none)

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None: ...
    def check_engine(self, engine: Any) -> None: ...
    def context(self, batch: RolloutBatch, reprompts: list[Reprompt], tokenizer: Any, config: RepromptConfig,
                chat_template_kwargs: Any, engine: Any) -> TeacherContext: ...
    def cacheable_casts(self) -> contextlib.AbstractContextManager[None]: ...
    def targets(self, policy: nn.Module, micro: MicroBatch, forward: Forward) -> TeacherTargets: ...
    def update(self, policy: nn.Module) -> None: ...
    def owned_parameters(self) -> list[Tensor]: ...
    def state_dict(self) -> dict[str, Tensor]: ...
    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class Teacher:
    """`copy_policy`: how to take a frozen copy of the policy before it is prepared (`frozen_copy` unless the policy is
    partitioned at load time, as under DeepSpeed ZeRO-3; see `sdpo.distributed.Distributed.frozen_copy`).
    `reprompt_len`: the longest reprompt in tokens (`reprompt_limit`); `max_new_tokens`: the longest response.
    `tokenizer`: the policy's, which weights of their own (kind=external) are checked against; `rollout_config`:
    rollout.*, which a scorer that starts a server of its own reads (scorer=server)."""

    def __init__(self, config: TeacherConfig, policy: nn.Module,
                 copy_policy: Callable[[nn.Module], nn.Module] = frozen_copy, reprompt_len: int = 2**31,
                 max_new_tokens: int = 0, tokenizer: Any = None, rollout_config: Any = None) -> None:
        self.config, self.kind = config, config.kind
        mixed = TEACHER_KINDS.get(config.kind)(config)
        stores = {name: WEIGHT_SOURCES.get(name)(policy, copy_policy, config) for name, _ in mixed}
        self.stores = list(stores.values())  # each source's weights once
        for store in self.stores:
            store.check_tokenizer(tokenizer)
        self.sources = [(stores[name], weight) for name, weight in mixed if weight != 0.0]
        self.context_rule = TEACHER_CONTEXTS.get(config.context)
        self.router = TeacherRouter(config.key, list(config.models)) if config.key else None
        self.routes = len(self.router) if self.router is not None else 1
        self.scorer: TeacherScorer = TEACHER_SCORERS.get(config.scorer)()
        self.reprompt_len = reprompt_len
        self.engine_context_len = reprompt_len + max_new_tokens if self.scorer.reads_rollout_engine else 0
        self.scorer.setup(self, tokenizer, rollout_config, reprompt_len + max_new_tokens)
        self._block: Block | None = None  # the block whose distinct reprompts `_passes` ran
        self._passes: list[PromptPass] | None = None

    @property
    def model(self) -> nn.Module | None:
        """The teacher's own full copy of the weights (EMA or initial), or None (live, LoRA)."""
        return next((store.model for store in self.stores if store.model is not None), None)

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None:
        """After the policy is prepared: put the teacher's weights where the prepared policy lives (`prepare_copy`:
        a device, FSDP2 shards, or a DeepSpeed ZeRO-3 engine). Copies are taken before, since a sharded module
        cannot be copied."""
        for store in self.stores:
            store.place(policy, prepare_copy)

    def check_engine(self, engine: Any) -> None:
        """At start: whether the rollout engine can do what the scorer asks of it."""
        self.scorer.check(engine)

    def context(self, batch: RolloutBatch, reprompts: list[Reprompt], tokenizer: Any, config: RepromptConfig,
                chat_template_kwargs: Any, engine: Any) -> TeacherContext:
        """The batch's teacher context: each row's teacher prompt (algorithm.teacher.context: its rendered reprompt
        within `reprompt_len`, or its own prompt), whether it is distilled (the distillation mask) and, with several
        teachers, which one scores it; scorer=engine also scores it now, before the update."""
        within_window = replace(config, max_reprompt_len=self.reprompt_len)
        prompt_ids, signal = self.context_rule(reprompts, batch.prompt_ids, lambda: teacher_prompt_ids(
            reprompts, batch.prompt_ids, tokenizer, within_window, chat_template_kwargs))
        distill_mask_B = torch.tensor(signal, dtype=torch.bool)
        route_B = self.router.routes([r.problem for r in reprompts]) if self.router is not None else None
        rows = distill_mask_B.nonzero().flatten().tolist()
        logp_BR = self.scorer.score(prompt_ids, batch.response_ids, rows, batch.response_width, engine)
        return TeacherContext(prompt_ids, distill_mask_B, logp_BR, route_B)

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
        copies = [p for store in self.stores if store.model is not None for p in store.parameters()]
        for param in copies:
            param.requires_grad_(True)
        try:
            yield
        finally:
            for param in copies:
                param.requires_grad_(False)

    def targets(self, policy: nn.Module, micro: MicroBatch, forward: Forward) -> TeacherTargets:
        """What the micro-batch's loss needs: the distillation mask, and scorer=trainer's forward of the rows with a
        signal (the others are masked: their teacher terms are zeros), or the log-probs the engine scored."""
        rows = micro.rows
        distill_mask_BR = rows.response_mask_BR.to(forward.device) & rows.distill_mask_B.to(forward.device)[:, None]
        return TeacherTargets(distill_mask_BR, self._micro_features(policy, micro, forward), rows.teacher_logp_BR,
                              done=lambda: self._release(micro))

    def update(self, policy: nn.Module) -> None:
        """After each optimizer step whose grad norm was finite: the weights that move (EMA) move."""
        for store in self.stores:
            store.update(policy)

    def owned_parameters(self) -> list[Tensor]:
        """The tensors this teacher holds besides the policy's own (a full copy, an adapter, or nothing)."""
        return [p for store in self.stores for p in store.parameters()]

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint must keep: only weights that move (EMA); frozen weights are the initial ones."""
        return {key: value for store in self.stores for key, value in store.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            for store in self.stores:
                store.load_state_dict(state)

    @torch.no_grad()
    def features(self, policy: nn.Module, inputs: ModelInputs | SharedPromptInputs,
                 passes: list[PromptPass] | None = None, route: int = 0) -> TeacherFeatures:
        """The teacher's features of the response tokens under the reprompt (`inputs`), one entry per source.
        `passes`: the sources' passes over a block's distinct reprompts, which `inputs` (SharedPromptInputs)
        continue; `route`: which of several teachers (algorithm.teacher.key) scores these rows."""
        features, weights = [], []
        for k, (source, weight) in enumerate(self.sources):
            with source.use(policy, route) as model, eval_mode(model):
                features.append(response_features(model, inputs, passes[k] if passes else None).detach())
            weights.append(weight)
        return TeacherFeatures(features, weights)

    # -- one micro-batch

    def _micro_features(self, policy: nn.Module, micro: MicroBatch, forward: Forward) -> TeacherFeatures | None:
        """scorer=trainer: the teacher forward of the micro-batch's rows with a signal, continuing its block's
        reprompt passes where they run (several teachers: one forward per teacher, of its rows); None when no rank
        needs one (`any_rank`: sharded, the forward is a collective)."""
        if not self.scorer.forward_in_update or not forward.any_rank(bool(micro.rows.distill_mask_B.any())):
            return None
        passes = self._block_passes(policy, micro, forward)
        route_B, width = micro.rows.teacher_route_B, micro.rows.response_width
        parts, stand_in = [], None
        for route in range(self.routes):
            mine = [i for i in micro.rows.distill_rows if route_B is None or int(route_B[i]) == route]
            if self.routes > 1 and not forward.any_rank(bool(mine)):
                continue
            # Sharded, another rank needs this teacher: join its forward with a stand-in row (masked, or dropped).
            rows = torch.tensor(mine or [0], dtype=torch.long)
            inputs = micro.teacher_inputs(rows, forward.pad_id, passes[0].prompts if passes else None)
            features = self.features(policy, inputs.to(forward.device), passes, route).of_rows(rows, width)
            parts, stand_in = (parts + [features], stand_in) if mine else (parts, features)
        if not parts:
            return stand_in
        return parts[0] if len(parts) == 1 else TeacherFeatures.routed(parts)

    def _block_passes(self, policy: nn.Module, micro: MicroBatch, forward: Forward) -> list[PromptPass] | None:
        """The micro-batch's block's passes, run at its first teacher forward and kept until its last micro-batch."""
        if self._block is not micro.block:
            self._block, self._passes = micro.block, None  # the previous block's passes are freed first
            if micro.block.shared and not micro.branch:  # a branching reprompt shares its episode's sequence instead
                self._passes = self._prompt_passes(policy, micro.block.rows, forward.pad_id, forward.device)
        return self._passes

    @torch.no_grad()
    def _prompt_passes(self, policy: nn.Module, block: RolloutBatch, pad_id: int, device: torch.device
                       ) -> list[PromptPass] | None:
        """The distinct reprompts of a block's rows with a signal through each source once (one `PromptPass` per
        source), for the block's micro-batches to continue; None where no two rows share a reprompt.

        The failed rollouts of a group whose successful sibling they all draw as demonstration share a reprompt,
        but length-sorted micro-batches scatter them. The passes keep only key/value caches (no gradient, so no
        activations): for a block of at most `micro_batch_size` questions that is G x 2 x kv_width numbers per
        reprompt token and layer, a fraction of what the block's student activations hold."""
        reprompts = [block.teacher_prompt_ids[i] for i in block.distill_rows]
        # Several teachers each forward their own rows' prompts.
        if not self.scorer.forward_in_update or not any_shared(reprompts) or self.routes > 1:
            return None
        prompts = build_prompt_inputs(reprompts, pad_id).to(device)
        passes = []
        for source, _ in self.sources:
            with source.use(policy) as model, eval_mode(model):
                passes.append(PromptPass(model, prompts))
        return passes

    def _release(self, micro: MicroBatch) -> None:
        """After the micro-batch's backward: under FSDP2, free the gathered output heads; after its block's last,
        the block's reprompt passes."""
        for store in self.stores:
            store.release()
        if micro.last_in_block:
            self._block, self._passes = None, None


class NoTeacher:
    """GRPO (algorithm.grpo_weight = 1): nothing re-scores the rollouts. It answers every call of the step with an
    empty record, so that the algorithm without a teacher is a case of the same step, not a branch through it."""

    model = None
    engine_context_len = 0

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None:
        pass

    def check_engine(self, engine: Any) -> None:
        pass

    def context(self, batch: RolloutBatch, reprompts: list[Reprompt], *args: Any) -> TeacherContext:
        """No teacher prompts and no distillation mask: the batch's rows carry the policy loss only."""
        return TeacherContext()

    def cacheable_casts(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def targets(self, policy: nn.Module, micro: MicroBatch, forward: Forward) -> TeacherTargets:
        return TeacherTargets()

    def update(self, policy: nn.Module) -> None:
        pass

    def owned_parameters(self) -> list[Tensor]:
        return []

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


def reprompt_limit(config: SDPOConfig, model: nn.Module) -> int:
    """algorithm.reprompt.max_reprompt_len within the model's context window (`reprompt_window`)."""
    return reprompt_window(config.algorithm.reprompt.max_reprompt_len, config.rollout.max_new_tokens, model)


def reprompt_window(max_reprompt_len: int, max_new_tokens: int, model: nn.Module) -> int:
    """The longest reprompt within the model's context window: the teacher reads a reprompt and a response, and
    positions past the window are undefined (vLLM refuses them: the paper's 10240 exceeds SmolLM2's 8192)."""
    window = getattr(unwrap(model).config, "max_position_embeddings", None)
    return min(max_reprompt_len, window - max_new_tokens) if window else max_reprompt_len


def build_teacher(config: SDPOConfig, policy: nn.Module,
                  copy_policy: Callable[[nn.Module], nn.Module] = frozen_copy, tokenizer: Any = None) -> TeacherLike:
    """The algorithm's teacher: none for GRPO (grpo_weight = 1), else `algorithm.teacher`'s kind, context and
    scorer (`tokenizer`: the policy's, which a teacher model of its own must share)."""
    if not config.algorithm.uses_teacher:
        return NoTeacher()
    return Teacher(config.algorithm.teacher, policy, copy_policy, reprompt_limit(config, policy),
                   config.rollout.max_new_tokens, tokenizer, config.rollout)
