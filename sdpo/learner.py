"""`Learner`: the policy's side of a training step. `update(batch, step) -> metrics` turns a scored batch with its
teacher context and advantages into optimizer steps:

    old / reference log-probs (when needed) -> for each mini-batch of whole groups: one optimizer step
        -> the planner's micro-batches (`sdpo.plan`: blocks of shared prompts, whole episodes as one sequence):
           the teacher's targets (one call), student forward, chunked vocabulary projection, `objective` -> backward
        -> clip, step, schedule, the teacher's update (EMA)

It owns the policy, the optimizer and its schedule, the self-teacher's weights, the KL reference, autocast and
prompt sharing. Where the processes are and how the weights are spread over them is `sdpo.distributed`'s business:
the learner asks it (whole weights here or not, how many weights) and never names a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import logging
from typing import Any

import torch
from torch import Tensor

from sdpo.batch import RolloutBatch, build_prompt_inputs
from sdpo.config import SDPOConfig
from sdpo.diagnostics import too_small_to_move
from sdpo.distributed import Distributed
from sdpo.losses import DISTILL_MODES, MIXES, chunked_response_terms
from sdpo.losses.objective import MetricSums, StepCounts, TokenInputs, objective
from sdpo.models import DTYPES, PromptPass, reshard, response_features, response_logprobs, supports_prompt_pass, unwrap
from sdpo.schedules import SCHEDULES
from sdpo.plan import Forward, MicroBatch, MicroBatchPlanner
from sdpo.teacher import InitialWeights, TeacherTargets, build_teacher
from sdpo.tracking import StageTimer

log = logging.getLogger(__name__)


def _on(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    return tensor.to(device) if tensor is not None else None


class Learner:
    """`reload`: a fresh load of the initial policy, for the frozen copies of a launch that partitions weights while
    loading (`Distributed.frozen_copy`). `tokenizer`: the policy's (its pad id; a teacher model of its own is
    checked against it). `timer`: the trainer's stage timer (the teacher
    forward is timed apart from the update)."""

    def __init__(self, config: SDPOConfig, dist: Distributed, model: torch.nn.Module,
                 reload: Callable[[], torch.nn.Module], tokenizer: Any, timer: StageTimer) -> None:
        self.config, self.dist, self.pad_id, self.timer = config, dist, tokenizer.pad_token_id, timer
        acfg = config.algorithm
        # Copies of the policy (teacher, KL reference; with LoRA: the adapter disabled, never a copy) are taken before
        # the policy is prepared (a prepared module may be split), then placed alike.
        copy_policy = lambda policy: dist.frozen_copy(policy, reload)  # noqa: E731
        self.teacher = build_teacher(config, model, copy_policy, tokenizer)  # `NoTeacher` for GRPO
        kl_penalty = acfg.uses_policy_loss and acfg.policy.kl_coef > 0
        self.reference = InitialWeights(model, copy_policy) if kl_penalty else None
        self.policy, self.optimizer = dist.prepare(model, self._optimizer(model))
        self.num_weights = dist.num_weights()
        self.teacher.place(self.unwrapped, dist.place_copy)
        if self.reference is not None:
            self.reference.place(self.unwrapped, dist.place_copy)
        self.forward = Forward(self.pad_id, dist.device, dist.any_rank)
        self.autocast_dtype = DTYPES.get(config.model.autocast_dtype)
        checkpointing = config.model.gradient_checkpointing
        # One forward per distinct prompt (trainer.share_prompts, sdpo.models.PromptPass): transformers turns the
        # key/value cache off under gradient checkpointing, and split weights must not be called again before their
        # backward.
        share_prompts = (config.trainer.share_prompts and not checkpointing and dist.whole_weights
                         and supports_prompt_pass(model))
        # One autocast region per optimizer step (`_step_autocast`), so that each float32 weight is cast once per
        # step, not once per forward. The cached casts live for the whole step: not for split weights (every gathered
        # weight would stay) nor under gradient checkpointing (where a forward keeps no weights for its backward, so
        # the cache would add a 16-bit copy of the model).
        self.cast_weights_once = dist.whole_weights and not checkpointing
        # How the step's rows run as forwards (blocks of shared prompts, micro-batches, episodes packed into one
        # sequence: trainer.pack_episodes, one forward per episode, not one per turn over the conversation so far).
        self.planner = MicroBatchPlanner(config.trainer.micro_batch_size, share_prompts, config.trainer.pack_episodes)
        # Logit-level distillation (full / top-k) needs both models' logits, so it is computed chunk by chunk in the
        # forward; the sampled-token forms need only log q(y_t) and live in the objective.
        self.distill_logits = MIXES.get(acfg.mix).distill_term and DISTILL_MODES.get(acfg.distill.mode).needs_logits
        self.teacher_entropy = acfg.distill.entropy_beta is not None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return unwrap(self.policy)

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters, and its schedule (`self.scheduler`)."""
        optim = self.config.trainer.optim
        trainable = [p for p in model.parameters() if p.requires_grad]
        # torch's fused AdamW kernel: one pass over all parameters instead of a Python loop over them (0.11 s against
        # 0.62 s per step for SmolLM2-135M on a 2-core CPU). Split or flattened weights keep the default.
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        fused = self.dist.whole_weights and all(p.device.type in ("cpu", "cuda") and p.dtype in dtypes
                                                for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                      weight_decay=optim.weight_decay, fused=fused or None)
        self.scheduler = SCHEDULES.get(optim.schedule)(optimizer, self.config.trainer)
        return optimizer

    # ------------------------------------------------------------------------------------------------------------
    # one generation batch, one optimizer step, one micro-batch

    def update(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """Optimizer steps over mini-batches of whole groups. A batch that feeds more than one optimizer step is
        off-policy after the first: its log-probs under the weights that sampled it are taken first."""
        tcfg = self.config.trainer
        per_step = self.dist.local_count(tcfg.mini_batch_questions)
        old_logp_BR = ref_logp_BR = None
        if batch.num_groups > per_step or tcfg.epochs_per_step > 1:
            old_logp_BR = self.sampled_logprobs(self.policy, batch)
        if self.reference is not None:
            with self.reference.use(self.unwrapped) as model:
                ref_logp_BR = self.sampled_logprobs(model, batch)
        batch = batch.with_logprobs(old_logp_BR, ref_logp_BR)
        sums = MetricSums()
        generator = torch.Generator().manual_seed(tcfg.seed + step)
        for _ in range(tcfg.epochs_per_step):
            for minibatch in batch.group_minibatches(per_step, generator):
                self.optimizer_step(minibatch, sums, step)
        means = sums.means(lambda t: self.dist.reduce(t, "sum"), lambda t: self.dist.reduce(t, "max"))
        return means | {"optim/lr": self.scheduler.get_last_lr()[0]}

    def optimizer_step(self, minibatch: RolloutBatch, sums: MetricSums, step: int) -> None:
        counts = self.step_counts(minibatch)
        with self._step_autocast():
            for micro in self.planner.micro_batches(minibatch, self.prompt_pass):
                self.micro_batch_step(micro, counts, sums)
        applied, grad_norm = self.dist.optimizer_step()
        if applied:
            self.scheduler.step()
            self.teacher.update(self.unwrapped)
            sums.add("optim/grad_norm", grad_norm, 1)
        else:
            log.warning("step %d: non-finite grad norm, optimizer step skipped", step)
        sums.add("optim/skipped_steps", float(not applied), 1)
        small = applied and too_small_to_move(grad_norm, self.num_weights, self.config.trainer.optim.eps)
        sums.add("diagnostics/small_grad_fraction", float(small), 1)

    def micro_batch_step(self, micro: MicroBatch, counts: StepCounts, sums: MetricSums) -> None:
        """Forward and backward of one micro-batch; gradients are synchronised with the step's last."""
        with self.dist.micro_batch(last=micro.last_in_step):
            with self.timer("teacher_forward"), self._autocast():  # counted apart from time/update
                targets = self.teacher.targets(self.unwrapped, micro, self.forward)
            loss = self.micro_batch_loss(micro, targets, counts, sums)
            with torch.autocast(self.dist.device.type, enabled=False):  # keeps `_step_autocast`'s cache
                prompts_grad = micro.prompts.pending() if micro.prompts is not None and micro.last_in_block else None
                self.dist.backward(loss, prompts_grad)
        targets.release()

    def prompt_pass(self, block_prompts: list[list[int]]) -> PromptPass:
        """A block's distinct prompts (those its forwards' sequences start with, as the planner says) through the
        policy once, for all its micro-batches (their responses continue the prompts' key/value cache:
        sdpo.models.PromptPass)."""
        prompts = build_prompt_inputs(block_prompts, self.pad_id)
        # The pass's backward runs inside its block's last micro-batch's (the step's last is the synchronising one);
        # its forward must not prepare one.
        with self.dist.micro_batch(last=False), self._autocast():
            return PromptPass(self.policy, prompts.to(self.dist.device))

    def micro_batch_loss(self, micro: MicroBatch, targets: TeacherTargets, counts: StepCounts,
                         sums: MetricSums) -> Tensor:
        """The loss of one micro-batch given its teacher `targets`, normalised by the optimizer step's global counts
        (summed over micro-batches). The responses continue the block's prompt pass where there is one; without
        one, rows that share a prompt in this micro-batch run it once (trainer.share_prompts)."""
        rows, device = micro.rows, self.dist.device
        mask_BR = rows.response_mask_BR.to(device)
        with self._autocast():
            inputs = micro.student_inputs(self.pad_id)
            student = response_features(self.policy, inputs.to(device), micro.prompts, micro.last_in_block)
            terms = chunked_response_terms(
                student.values_BRX, student.head, rows.response_ids_BR.to(device), self.config.rollout.temperature,
                self.config.trainer.logits_chunk_size, teacher_entropy=self.teacher_entropy,
                **targets.chunk_kwargs(self._distill_kwargs() if self.distill_logits else None))
        inputs = TokenInputs(
            logp_BR=terms["logp"].float(), mask_BR=mask_BR, advantages_B=rows.advantages_B.to(device),
            entropy_BR=terms["entropy"], old_logp_BR=_on(rows.old_logp_BR, device),
            sampler_logp_BR=_on(rows.sampler_logp_BR, device), ref_logp_BR=_on(rows.ref_logp_BR, device),
            distill_mask_BR=targets.distill_mask_BR, distill_BR=terms.get("distill"),
            teacher_entropy_BR=terms.get("teacher_entropy"),
            teacher_logp_BR=targets.token_logp(terms))
        result = objective(inputs, counts, self.config.algorithm, self.config.rollout.max_new_tokens)
        sums.add_result(result)
        return result.loss

    def step_counts(self, minibatch: RolloutBatch) -> StepCounts:
        """Loss normalisers for one optimizer step, summed over processes."""
        mask_BR = minibatch.response_mask_BR
        distilled_B = minibatch.distill_mask_B
        if distilled_B is None:  # no teacher
            distilled_B = torch.zeros(len(minibatch), dtype=torch.bool)
        return StepCounts(**self.dist.sum_counts({
            "tokens": mask_BR.sum(), "seqs": len(minibatch),
            "distill_tokens": (mask_BR & distilled_B[:, None]).sum(), "distill_seqs": distilled_B.sum()}))

    @torch.no_grad()
    def sampled_logprobs(self, model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
        """log-probs of the sampled tokens under `model` (old policy or reference), before any update: [B, R]."""
        with self._autocast():
            logp = response_logprobs(model, batch.prompt_ids, batch.response_ids, self.pad_id,
                                     self.config.rollout.temperature, self.config.trainer.logits_chunk_size,
                                     self.config.trainer.micro_batch_size, self.dist.device,
                                     self.planner.layout(batch))
        reshard(model)
        return logp

    # ------------------------------------------------------------------------------------------------------------
    # precision

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def _step_autocast(self) -> Iterator[None]:
        """An autocast region around a whole optimizer step (its forwards each open their own inside it).

        Autocast caches its casts of float32 parameters that require a gradient until its outermost region exits;
        with one region per forward, every forward (a block's prompt pass, each micro-batch) cast all the policy's
        weights again. One region per step: 0.91-0.93x the time of a bf16 update on a 2-core CPU (benchmarks/results/
        profile_step.md). The backward runs inside with autocast disabled, as torch recommends, which keeps the
        cache. On a CPU the teacher's own copy (EMA, initial) is cached for the step too (`Teacher.cacheable_casts`:
        0.86x the teacher's forward); not on a GPU, where a cast costs little and the 16-bit copy held all step
        would be a second model in GPU memory. LoRA's frozen base weights are never cached."""
        if self.autocast_dtype is None or not self.cast_weights_once:
            yield
            return
        device = self.dist.device.type
        teacher_casts = self.teacher.cacheable_casts() if device == "cpu" else contextlib.nullcontext()
        with torch.autocast(device, dtype=self.autocast_dtype), teacher_casts:
            yield

    def _distill_kwargs(self) -> dict[str, Any]:
        d = self.config.algorithm.distill
        return {"mode": d.mode, "alpha": d.alpha, "topk": d.topk, "tail": d.tail, "entry_clip": d.entry_clip}

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What the trainer's checkpoint keeps of the learner besides the weights and optimizer state (which the
        launch writes: `Distributed.policy_state`)."""
        return {"scheduler": self.scheduler.state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.teacher.load_state_dict(state["teacher"])

