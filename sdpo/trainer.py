"""`SDPOTrainer`: one training step of Self-Distillation Policy Optimization, readable from top to bottom.

    questions -> rollouts -> rewards + feedback -> teacher context (reprompts) -> advantages
              -> optimizer steps over mini-batches of whole groups (policy forward, teacher forward, losses)
              -> EMA teacher update after each finite-gradient step -> engine weight sync

SDPO, GRPO and their hybrids are one loop: `algorithm.grpo_weight` (lambda) is 0 for pure SDPO, 1 for GRPO (no
teacher is built), in between for the hybrid, mixed at the advantage level (paper Eq. 3) or the loss level.

Where this departs from the paper's public code (a verl fork), and why:
- Reprompts that are too long lose demonstration and feedback tokens, never the question, instruction or chat
  header (the public code truncates from the right and can cut the instruction).
- Losses are normalised by the global loss-token count of the optimizer step (all micro-batches and ranks), so
  results do not depend on micro-batch size.
- Top-k distillation takes the top-k of the *current* student at each step (the public code does the same), and the
  teacher forward runs inside the update, chunked over the sequence together with the student's vocabulary
  projection, so neither model's full [B, R, V] logits are ever held.
"""

from __future__ import annotations

from collections import defaultdict
import contextlib
import copy as copy_module
from dataclasses import asdict, replace
import logging
import math
import os
from pathlib import Path
import random
import time
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, fsdp2_prepare_model, set_seed
from omegaconf import OmegaConf
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from sdpo import checkpoint as ckpt
from sdpo.batch import RolloutBatch, pad_right
from sdpo.config import SDPOConfig
from sdpo.envs import Environment, Problem
from sdpo.evaluation import evaluate
from sdpo.inputs import resolve_inputs
from sdpo.losses import (
    aggregate,
    chunked_response_terms,
    clipped_policy_loss,
    group_advantages,
    is_ratio,
    kl_penalty,
    mix_advantages,
    sampled_token_distill,
    sdpo_token_advantages,
    truncated_is_weights,
)
from sdpo.models import (
    DTYPES, load_model, output_head, render_chat, reshard, response_hidden_states, unwrap,
)
from sdpo.rollout import RolloutEngine, SamplingSettings, build_engine
from sdpo.sharding import full_state_dict
from sdpo.teacher import Reprompt, Teacher, build_reprompts, reprompt_stats, teacher_prompt_ids
from sdpo.teacher.teacher import base_weights, frozen_copy
from sdpo.tracking import CURVES, StageTimer, Tracker, plot_curves

log = logging.getLogger(__name__)


class QuestionSampler:
    """Seeded passes over the training questions in shuffled order; its position is part of a checkpoint."""

    def __init__(self, num_questions: int, seed: int) -> None:
        self.num_questions, self.seed = num_questions, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.num_questions))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        picked: list[int] = []
        while len(picked) < count:
            chunk = self._order()[self.position : self.position + count - len(picked)]
            picked += chunk
            self.position += len(chunk)
            if self.position >= self.num_questions:
                self.epoch, self.position = self.epoch + 1, 0
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class MetricSums:
    """Weighted sums over micro-batches, averaged once per step: add(name, value_sum, weight); peak(name, value)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.peaks: dict[str, float] = defaultdict(lambda: -math.inf)

    def add(self, name: str, total: Tensor | float, weight: Tensor | float) -> None:
        self.sums[name] += float(total)
        self.weights[name] += float(weight)

    def peak(self, name: str, value: Tensor | float) -> None:
        self.peaks[name] = max(self.peaks[name], float(value))

    def means(self, reduce_sum=lambda t: t, reduce_max=lambda t: t) -> dict[str, float]:
        """Weighted means and peaks; the reducers combine ranks first (every rank must hold the same keys)."""
        keys = sorted(self.sums)
        totals = reduce_sum(torch.tensor([[self.sums[k] for k in keys], [self.weights[k] for k in keys]], dtype=torch.float64))
        out = {k: float(s / w) for k, s, w in zip(keys, *totals.cpu()) if w > 0}
        if self.peaks:
            names = sorted(self.peaks)
            out |= dict(zip(names, reduce_max(torch.tensor([self.peaks[k] for k in names], dtype=torch.float64)).tolist()))
        return out


class SDPOTrainer:
    """`config` (or the defaults) with `overrides`; a model, datasets and reward functions of one's own
    (sdpo/inputs.py, docs/own_data.md). `env` and `engine` replace the ones the config would build (a researcher's
    own objects, scripted tests)."""

    def __init__(self, config: SDPOConfig | None = None, *, model: Any = None, tokenizer: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, reward_funcs: Any = None,
                 overrides: list[str] | None = None, env: Environment | None = None,
                 engine: RolloutEngine | None = None) -> None:
        inputs = resolve_inputs(config, model=model, tokenizer=tokenizer, train_dataset=train_dataset,
                                eval_dataset=eval_dataset, reward_funcs=reward_funcs, overrides=overrides, env=env)
        self.config = config = inputs.config
        tcfg, acfg = config.trainer, config.algorithm
        # Launched with torchrun on a machine without GPUs: Accelerate needs `cpu` to set up gloo (not under
        # DeepSpeed, which `cpu` would switch off).
        deepspeed_env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        self.accelerator = Accelerator(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
                                       and not deepspeed_env)
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        launched = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if self.deepspeed and launched != self.accelerator.num_processes:
            # Accelerate takes the process count from the accelerator's backend; without GPUs it has none.
            raise RuntimeError(f"DeepSpeed runs {launched} processes but Accelerate counts "
                               f"{self.accelerator.num_processes}: DeepSpeed through Accelerate needs GPUs (on the CPU, "
                               "use torchrun with DDP, or see tests/test_distributed.py for how the test sets it up)")
        if self.accelerator.distributed_type == DistributedType.FSDP and not self.accelerator.is_fsdp2:
            raise ValueError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config "
                             "(configs/accelerate/fsdp2.yaml)")
        # FSDP2 and ZeRO-3: parameters are sharded over ranks, so every forward is a collective that all ranks must
        # join.
        self.zero3 = self.deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        self.sharded = self.accelerator.is_fsdp2 or self.zero3
        set_seed(tcfg.seed)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if tcfg.questions_per_step % self.world or tcfg.mini_batch_questions % self.world:
            raise ValueError(
                f"trainer.questions_per_step and trainer.mini_batch_questions must be multiples of the number of "
                f"processes ({self.world}) so that every rank holds whole groups"
            )
        run_dir = [tcfg.output_dir or f"runs/{acfg.name}-{config.env.name}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if self.world > 1:
            broadcast_object_list(run_dir)  # rank 0's timestamp: every rank must write into one directory
        self.run_dir = Path(run_dir[0])
        if tcfg.resume == "auto" and not tcfg.output_dir:
            log.warning("trainer.resume=auto without trainer.output_dir looks in a fresh timestamped directory")

        # -- environment and data
        self.env, self.model_path, self.tokenizer = inputs.env, inputs.model_path, inputs.tokenizer
        self.train_problems = self._renderable(self.env.load(config.env.train_split))
        self.eval_problems = self._renderable(self.env.load(config.env.eval_split))[: config.eval.num_questions]
        self.sampler = QuestionSampler(len(self.train_problems), tcfg.seed)

        # -- policy, teacher, reference (with LoRA: the adapter disabled, never a copy), optimizer, schedule
        if self.deepspeed:
            self._configure_deepspeed()
        model = inputs.load_policy()
        # Copies of the policy are taken before `prepare`: FSDP2 cannot copy a sharded module, so they are sharded
        # the same way afterwards (`_place_copy`).
        self.teacher = Teacher(acfg.teacher, model, self._frozen_copy) if acfg.uses_teacher else None
        self.use_reference = acfg.uses_policy_loss and acfg.policy.kl_coef > 0
        reference = self._frozen_copy(model) if self.use_reference and not config.model.lora.enabled else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        optim = tcfg.optim
        optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
        self.optimizer_steps_per_batch = (tcfg.questions_per_step // tcfg.mini_batch_questions) * tcfg.epochs_per_step
        if optim.schedule == "cosine":
            total = tcfg.total_steps * self.optimizer_steps_per_batch
            self.scheduler = get_cosine_schedule_with_warmup(optimizer, optim.warmup_steps, total, min_lr_rate=optim.min_lr_ratio)
        else:
            self.scheduler = get_constant_schedule_with_warmup(optimizer, optim.warmup_steps)
        self.policy, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]  # FSDP2 replaced them by shards
        if self.teacher is not None:
            self.teacher.place(self.unwrapped, self._place_copy)
        self.reference = self._place_copy(reference) if reference is not None else None
        self.autocast_dtype = DTYPES.get(config.model.autocast_dtype)

        # -- rollout engine
        max_model_len = config.rollout.max_prompt_len + config.rollout.max_new_tokens
        self.engine_scores_teacher = acfg.uses_teacher and acfg.teacher.scorer == "engine"
        if self.engine_scores_teacher:  # the engine also reads reprompt + response
            max_model_len = max(max_model_len, acfg.reprompt.max_reprompt_len + config.rollout.max_new_tokens)
        self.engine = engine or build_engine(config.rollout, self.unwrapped, self.tokenizer, self.model_path, max_model_len,
                                             self.autocast_dtype, sharded=self.sharded)
        if self.engine_scores_teacher and not hasattr(self.engine, "score_teacher"):
            raise ValueError(f"algorithm.teacher.scorer=engine: the {type(self.engine).__name__} engine cannot score "
                             "the teacher (use rollout=vllm, or algorithm.teacher.scorer=trainer)")

        self.step = 0
        self.timer = StageTimer()
        if tcfg.resume != "none":
            self._resume(tcfg.resume)
        run_config = OmegaConf.to_container(OmegaConf.structured(config))
        self.tracker = Tracker(config.logging, self.run_dir, run_config, enabled=self.accelerator.is_main_process)
        if self.accelerator.is_main_process:
            OmegaConf.save(OmegaConf.structured(config), self.run_dir / "config.yaml")

    # ------------------------------------------------------------------------------------------------------------
    # the loop

    @property
    def unwrapped(self) -> torch.nn.Module:
        return unwrap(self.policy)

    def train(self) -> dict[str, float]:
        cfg = self.config
        bar = tqdm(total=cfg.trainer.total_steps, initial=self.step, desc=cfg.algorithm.name,
                   disable=not (self.accelerator.is_main_process and cfg.logging.progress_bar))
        if cfg.eval.every and cfg.eval.at_start and self.step == 0:
            self.tracker.log(self.evaluate(), self.step)
        metrics: dict[str, float] = {}
        while self.step < cfg.trainer.total_steps:
            metrics = self.training_step()
            self.step += 1
            self._log_samples(self._last_batch)
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                metrics.update(self.evaluate())
            self.tracker.log(metrics, self.step)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items() if k in ("reward/mean", "eval/avg@" + str(cfg.eval.samples_per_question))})
            if cfg.trainer.save_every and self.step % cfg.trainer.save_every == 0:
                self.save()
        bar.close()
        self.save()
        if self.accelerator.is_main_process:
            plot_curves([self.run_dir], CURVES, self.run_dir / "reward_curve.png")
        self.tracker.close()
        return metrics

    def training_step(self) -> dict[str, float]:
        """One generation batch: rollouts, rewards, teacher context, then the optimizer steps over it."""
        problems = self.next_questions()
        with self.timer("generate"):
            batch, problems_B = self.generate(problems)
        with self.timer("score"):
            metrics = self.score(batch, problems_B)
        with self.timer("teacher"):
            metrics |= self.build_teacher_context(batch, problems_B)
        batch.advantages_B = group_advantages(batch.rewards_B, batch.group_ids_B, self.config.algorithm.norm_adv_by_std)
        with self.timer("update"):
            metrics |= self.update(batch)
        with self.timer("sync"):
            sync = self.engine.sync_weights(self.unwrapped)
        metrics |= {"sync/seconds": sync.seconds, "sync/mib": sync.bytes / 2**20, **sync.extra}
        metrics |= self.timer.pop()
        self._last_batch = batch  # its sample completions are logged with the step's metrics
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    # the boxes of a step

    def next_questions(self) -> list[Problem]:
        """This rank's share of the step's questions (every rank draws the same global list, then takes a slice)."""
        indices = self.sampler.take(self.config.trainer.questions_per_step)
        return [self.train_problems[i] for i in indices[self.rank :: self.world]]

    def generate(self, problems: list[Problem]) -> tuple[RolloutBatch, list[Problem]]:
        prompts = [self._prompt_ids[id(p)] for p in problems]
        sampling = SamplingSettings.from_config(self.config.rollout, seed=self.config.trainer.seed + self.step * self.world + self.rank)
        completions = self.engine.generate(prompts, sampling)
        has_logprobs = all(c.logprobs is not None for c in completions)
        batch = RolloutBatch(
            problem_ids=[problems[c.prompt_index].id for c in completions],
            prompt_ids=[prompts[c.prompt_index] for c in completions],
            response_ids=[c.token_ids for c in completions],
            response_text=[c.text for c in completions],
            group_ids_B=torch.tensor([c.prompt_index for c in completions]),
            truncated_B=torch.tensor([c.truncated for c in completions]),
            sampler_logp_BR=pad_right([c.logprobs for c in completions], 0.0, torch.float32) if has_logprobs else None,
        )
        return batch, [problems[c.prompt_index] for c in completions]

    def score(self, batch: RolloutBatch, problems_B: list[Problem]) -> dict[str, float]:
        scores = self.env.score_batch(problems_B, batch.response_text, batch.truncated_B.tolist())
        batch.rewards_B = torch.tensor([s.reward for s in scores], dtype=torch.float32)
        batch.feedback = [s.feedback for s in scores]
        batch.extras["status"] = [s.info.get("status", "") for s in scores]
        lengths = batch.response_lengths_B
        return self._reduce_mean({
            "reward/mean": batch.rewards_B.mean(),
            "response/length_mean": lengths.mean(),
            "response/truncated_fraction": batch.truncated_B.float().mean(),
        }) | {"response/length_max": float(self._reduce(lengths.max(), "max"))}

    def build_teacher_context(self, batch: RolloutBatch, problems_B: list[Problem]) -> dict[str, float]:
        """Reprompts (spec section 2): a sibling's solution and/or the env's feedback; a mask where there is neither."""
        acfg = self.config.algorithm
        reprompts = self._reprompts(batch, problems_B)
        stats = reprompt_stats(reprompts, batch.rewards_B.tolist(), batch.group_ids_B.tolist(), acfg.reprompt.success_reward_threshold)
        if self.teacher is not None:
            batch.teacher_prompt_ids = teacher_prompt_ids(reprompts, batch.prompt_ids, self.tokenizer, acfg.reprompt)
            batch.distill_mask_B = torch.tensor([r.has_signal for r in reprompts])
            if acfg.teacher.scorer == "engine":
                batch.teacher_logp_BR = self._engine_teacher_logp(batch)
        return self._reduce_mean({f"teacher/{k}": v for k, v in asdict(stats).items()})

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Optimizer steps over mini-batches of whole groups; several per generation batch make them off-policy."""
        tcfg = self.config.trainer
        if self.optimizer_steps_per_batch > 1:
            batch.old_logp_BR = self._sampled_logprobs(self.policy, batch)
        if self.use_reference:
            # The initial weights: a frozen copy, or with LoRA the policy with its adapter disabled.
            reference = contextlib.nullcontext(self.reference) if self.reference is not None else base_weights(self.unwrapped)
            with reference as model:
                batch.ref_logp_BR = self._sampled_logprobs(model, batch)
        sums = MetricSums()
        generator = torch.Generator().manual_seed(tcfg.seed + self.step)
        for _ in range(tcfg.epochs_per_step):
            for minibatch in batch.group_minibatches(tcfg.mini_batch_questions // self.world, generator):
                self.optimizer_step(minibatch, sums)
        means = sums.means(lambda t: self._reduce(t, "sum"), lambda t: self._reduce(t, "max"))
        return means | {"optim/lr": self.scheduler.get_last_lr()[0]}

    def optimizer_step(self, minibatch: RolloutBatch, sums: MetricSums) -> None:
        counts = self._global_counts(minibatch)
        micro_batches = list(minibatch.micro_batches(self.config.trainer.micro_batch_size))
        for i, micro in enumerate(micro_batches):
            # DDP: all-reduce gradients once, on the last micro-batch of the optimizer step.
            sync = i == len(micro_batches) - 1
            with contextlib.nullcontext() if sync or self.deepspeed else self.accelerator.no_sync(self.policy):
                loss = self.micro_batch_loss(micro, counts, sums)
                # DDP and DeepSpeed average gradients over ranks; the counts are already global, so undo the average.
                if self.deepspeed:  # accumulates; the engine's step below reduces (accelerator.backward would step)
                    self.policy.backward(loss * self.world)
                else:
                    self.accelerator.backward(loss * self.world)
            if self.teacher is not None:
                self.teacher.release()
        applied, grad_norm = self._apply_gradients()
        if applied:
            self.scheduler.step()
            if self.teacher is not None:
                self.teacher.update(self.unwrapped)
            sums.add("optim/grad_norm", grad_norm, 1)
        else:
            log.warning("step %d: non-finite grad norm, optimizer step skipped", self.step)
        sums.add("optim/skipped_steps", float(not applied), 1)

    def _apply_gradients(self) -> tuple[bool, float]:
        """Clip, then step unless the grad norm is not finite; (stepped, grad norm). Gradients are zeroed after."""
        if self.deepspeed:
            # The engine clips (gradient_clipping = trainer.optim.grad_clip), skips a non-finite step, zeroes.
            self.policy.step()
            return self.policy.was_step_applied(), float(self.policy.get_global_grad_norm())
        grad_norm = float(self.accelerator.clip_grad_norm_(self.trainable, self.config.trainer.optim.grad_clip))
        applied = math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied, grad_norm

    def micro_batch_loss(self, micro: RolloutBatch, counts: dict[str, float], sums: MetricSums) -> Tensor:
        """The loss of one micro-batch, normalised by the optimizer step's global counts (summed over micro-batches)."""
        acfg, device = self.config.algorithm, self.accelerator.device
        ids_BR, mask_BR = micro.response_ids_BR.to(device), micro.response_mask_BR.to(device)
        distill_mask_BR = mask_BR & micro.distill_mask_B.to(device)[:, None] if self.teacher is not None else None
        teacher = self._teacher_hidden(micro) if self._needs_teacher(distill_mask_BR) else None
        with self._autocast():
            hidden_BRH = response_hidden_states(self.policy, micro.student_inputs(self.tokenizer.pad_token_id).to(device))
            terms = chunked_response_terms(
                hidden_BRH, output_head(self.policy), ids_BR, self.config.rollout.temperature,
                self.config.trainer.logits_chunk_size,
                teacher_hidden=teacher.hidden if teacher else None,
                teacher_heads=teacher.heads if teacher else None,
                teacher_weights=teacher.weights if teacher else None,
                distill_kwargs=self._distill_kwargs() if teacher and acfg.mix == "loss" else None,
            )
        logp_BR = terms["logp"].float()
        # log q(y_t) of the rows being distilled: from the teacher forward above, or scored by the engine before the
        # update (algorithm.teacher.scorer=engine); None when this micro-batch has nothing to distill.
        teacher_logp_BR = terms["teacher_logp"].float() if teacher is not None else None
        if micro.teacher_logp_BR is not None and distill_mask_BR.any():
            teacher_logp_BR = micro.teacher_logp_BR.to(device)[:, : logp_BR.shape[1]]
        old_BR = micro.old_logp_BR.to(device) if micro.old_logp_BR is not None else logp_BR.detach()
        # Token-level truncated IS between the engine's sampler and the trainer (spec section 3).
        tis_BR = torch.ones_like(logp_BR)
        if micro.sampler_logp_BR is not None and acfg.tis_threshold is not None:
            tis_BR = truncated_is_weights(old_BR, micro.sampler_logp_BR.to(device), acfg.tis_threshold)
        agg = dict(mode=acfg.loss_agg_mode, max_response_len=self.config.rollout.max_new_tokens)
        # Zero times the log-probs keeps the graph connected when nothing in this micro-batch carries a loss (pure
        # SDPO without a success or feedback): backward still runs, and DDP ranks stay in step.
        loss = 0.0 * logp_BR.sum()
        n_tok = mask_BR.sum()

        if acfg.uses_policy_loss:
            adv_BR = micro.advantages_B.to(device)[:, None].expand_as(logp_BR)
            if acfg.mix == "advantage" and self.teacher is not None:
                # Rows without a reprompt signal have no SDPO advantage (0), only lambda * A_GRPO.
                sdpo_adv_BR = torch.zeros_like(logp_BR)
                if teacher_logp_BR is not None:
                    sdpo_adv_BR = sdpo_token_advantages(teacher_logp_BR, logp_BR.detach(), acfg.distill.advantage_clip) * distill_mask_BR
                adv_BR = mix_advantages(micro.advantages_B.to(device), sdpo_adv_BR, acfg.grpo_weight)
            pg_BR, clipped_BR = clipped_policy_loss(logp_BR, old_BR, adv_BR, acfg.policy.clip_eps_low, acfg.policy.clip_eps_high)
            pg_BR = pg_BR * tis_BR
            if self.use_reference:
                kl_BR = kl_penalty(logp_BR, micro.ref_logp_BR.to(device), acfg.policy.kl_estimator)
                pg_BR = pg_BR + acfg.policy.kl_coef * kl_BR
                sums.add("policy/kl_ref", (kl_BR.detach() * mask_BR).sum(), n_tok)
            policy_loss = aggregate(pg_BR, mask_BR, num_tokens=counts["tokens"], num_seqs=counts["seqs"], **agg)
            loss = loss + (1.0 if acfg.mix == "advantage" else acfg.grpo_weight) * policy_loss
            sums.add("policy/loss", policy_loss.detach() * counts["tokens"], n_tok)
            sums.add("policy/clip_fraction", (clipped_BR & mask_BR).sum(), n_tok)

        if self.teacher is not None:
            # Every rank logs the same keys (metrics are all-reduced), with zero weight where nothing was distilled.
            n_distill = distill_mask_BR.sum()
            gap_BR = (logp_BR.detach() - teacher_logp_BR) * distill_mask_BR if teacher_logp_BR is not None else mask_BR * 0.0
            # E_{y ~ student}[log s(y) - log q(y)]: an unbiased estimate of KL(student || teacher) on-policy.
            sums.add("distill/student_teacher_kl", gap_BR.sum(), n_distill)
            if acfg.mix == "loss" and teacher_logp_BR is None:
                sums.add("distill/loss", 0.0, 0.0)
                sums.add("distill/is_clip_fraction", 0.0, 0.0)
            elif acfg.mix == "loss":
                ratio_BR = is_ratio(logp_BR, old_BR, acfg.distill.is_clip)
                per_token_BR = terms["distill"].float() if "distill" in terms else sampled_token_distill(logp_BR, teacher_logp_BR)
                distill_BR = per_token_BR * ratio_BR * tis_BR
                distill_loss = aggregate(distill_BR, distill_mask_BR, num_tokens=counts["distill_tokens"],
                                         num_seqs=counts["distill_seqs"], **agg)
                loss = loss + (1.0 - acfg.grpo_weight) * distill_loss
                sums.add("distill/loss", distill_loss.detach() * counts["distill_tokens"], n_distill)
                sums.add("distill/is_clip_fraction", ((ratio_BR >= acfg.distill.is_clip) & distill_mask_BR).sum(), n_distill)
        sums.add("policy/entropy", (terms["entropy"].float() * mask_BR).sum(), n_tok)
        if micro.sampler_logp_BR is not None:
            # Engine-vs-trainer mismatch on the behaviour policy's log-probs (spec section 9).
            delta_BR = (old_BR - micro.sampler_logp_BR.to(device)).abs() * mask_BR
            sums.add("rollout/logp_abs_diff_mean", delta_BR.sum(), n_tok)
            sums.peak("rollout/logp_abs_diff_max", delta_BR.max())
            sums.add("rollout/tis_weight_mean", (tis_BR * mask_BR).sum(), n_tok)
            if acfg.tis_threshold is not None:
                sums.add("rollout/tis_truncated_fraction", ((tis_BR >= acfg.tis_threshold) & mask_BR).sum(), n_tok)
        return loss

    def evaluate(self) -> dict[str, float]:
        """avg@k / pass@k on this rank's share of the held-out questions, averaged over ranks."""
        ecfg, rcfg = self.config.eval, self.config.rollout
        sampling = SamplingSettings.from_config(
            rcfg, n=ecfg.samples_per_question, temperature=ecfg.temperature, top_p=ecfg.top_p,
            max_new_tokens=ecfg.max_new_tokens, seed=self.config.trainer.seed + 7919,
        )
        problems = self.eval_problems[self.rank :: self.world]
        result = evaluate(self.engine, self.env, problems, lambda p: self._prompt_ids[id(p)], sampling,
                          ks=ecfg.ks, success_threshold=self.config.algorithm.reprompt.success_reward_threshold)
        return self._reduce_mean(result.metrics)

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints

    def save(self) -> Path | None:
        """A checkpoint of everything the next step depends on (sdpo/checkpoint.py); every rank takes part."""
        acc, root = self.accelerator, self.run_dir / "checkpoints"
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.start(root, self.step)
        acc.wait_for_everyone()
        staging = ckpt.staging_dir(root, self.step)
        ckpt.write_rank_state(staging, self.rank, {"rng": ckpt.rng_state()})
        acc.wait_for_everyone()
        # Sharded: these gather whole tensors from every rank's shards (collectives).
        weights = full_state_dict(self.unwrapped) if self.sharded else None
        if self.deepspeed:  # each rank writes its partitions of the master weights and optimizer state
            ckpt.save_deepspeed_state(self.policy, staging)
            optimizer = None
        else:
            optimizer = ckpt.optimizer_state_dict(self.unwrapped, self.optimizer.optimizer)
        teacher = self.teacher.state_dict() if self.teacher is not None else {}
        path = None
        if acc.is_main_process:
            ckpt.save_model(self.unwrapped, self.tokenizer, staging, state_dict=weights)
            state = {
                "step": self.step,
                "world_size": self.world,
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "teacher": teacher,
                "sampler": self.sampler.state_dict(),
            }
            path = ckpt.finish(root, staging, self.step, state, self.config.trainer.keep_last)
        acc.wait_for_everyone()
        return path

    def _resume(self, resume: str) -> None:
        path = ckpt.latest_checkpoint(self.run_dir / "checkpoints") if resume == "auto" else Path(resume)
        if path is None:
            log.info("trainer.resume=auto: no complete checkpoint in %s, starting fresh", self.run_dir)
            return
        state = ckpt.load_trainer_state(path)
        if self.deepspeed:
            if state["world_size"] != self.world:
                raise RuntimeError(f"checkpoint {path} was written by {state['world_size']} DeepSpeed processes: resume "
                                   f"it with as many (here {self.world}), or from its weights as a new run "
                                   f"(model.name_or_path={path})")
            ckpt.load_deepspeed_state(self.policy, path)
        else:
            if state["optimizer"] is None:
                raise RuntimeError(f"checkpoint {path} was written under DeepSpeed: resume it with the same DeepSpeed "
                                   f"launch, or start a new run from its weights (model.name_or_path={path})")
            ckpt.load_model_weights(self.unwrapped, path)
            ckpt.load_optimizer_state_dict(self.unwrapped, self.optimizer.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.sampler.load_state_dict(state["sampler"])
        rank_state = ckpt.read_rank_state(path, self.rank)
        if rank_state is None or state["world_size"] != self.world:
            log.warning("checkpoint %s was written by %d processes, resumed with %d: sampling continues from other "
                        "RNG streams (not bit-exact)", path, state["world_size"], self.world)
            rank_state = rank_state or ckpt.read_rank_state(path, 0)
        ckpt.set_rng_state(rank_state["rng"])
        self.step = state["step"]
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------------------------
    # helpers

    def _renderable(self, problems: list[Problem]) -> list[Problem]:
        """Render every prompt once; drop (and report) those longer than rollout.max_prompt_len."""
        if not hasattr(self, "_prompt_ids"):
            self._prompt_ids: dict[int, list[int]] = {}  # keyed by id(problem): ids need not be unique across splits
        kept = []
        for p in problems:
            ids = render_chat(self.tokenizer, p.messages)
            if len(ids) <= self.config.rollout.max_prompt_len:
                self._prompt_ids[id(p)] = ids
                kept.append(p)
        if len(kept) < len(problems):
            log.warning("dropped %d of %d problems longer than rollout.max_prompt_len=%d tokens",
                        len(problems) - len(kept), len(problems), self.config.rollout.max_prompt_len)
        if problems and not kept:
            raise ValueError("every problem is longer than rollout.max_prompt_len: raise it")
        return kept

    def _configure_deepspeed(self) -> None:
        """Fill in the DeepSpeed config from this trainer's (before `prepare`): the loop owns accumulation.

        One optimizer step per mini-batch of whole groups, its micro-batches accumulated by `engine.backward` and
        applied by one `engine.step` (`managed_gradient_accumulation: false`); the engine clips with
        trainer.optim.grad_clip. The batch sizes are only DeepSpeed's bookkeeping.
        """
        plugin, tcfg = self.accelerator.state.deepspeed_plugin, self.config.trainer
        ds = plugin.deepspeed_config
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ValueError(f"the DeepSpeed config sets {key!r}: remove it, the trainer builds its own "
                                 "(trainer.optim.*)")
        ds.update(train_micro_batch_size_per_gpu=tcfg.micro_batch_size, gradient_accumulation_steps=1,
                  train_batch_size=tcfg.micro_batch_size * self.world, gradient_clipping=tcfg.optim.grad_clip,
                  managed_gradient_accumulation=False)
        # Communication buckets sized by the model (Accelerate fills "auto" from its hidden size), as the
        # transformers integration does; DeepSpeed's fixed defaults (5e8-element buckets) suit no particular model.
        zero = ds.setdefault("zero_optimization", {})
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            zero.setdefault(key, "auto")

    def _frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of the initial policy (teacher, reference), before `prepare`.

        Under ZeRO-3 transformers partitions the weights while loading (zero.Init), so the copy is a second load of
        the same checkpoint instead of a deepcopy of empty partitions.
        """
        if not self.zero3:
            return frozen_copy(model)
        copy = load_model(replace(self.config.model, gradient_checkpointing=False), self.model_path)
        return copy.requires_grad_(False).eval()

    def _place_copy(self, copy: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of the policy (teacher, reference) placed like the prepared policy."""
        if self.accelerator.is_fsdp2:
            return fsdp2_prepare_model(self.accelerator, copy)
        if self.zero3:  # an engine of its own, without an optimizer, partitioned like the policy
            import deepspeed

            ds = copy_module.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            # Every parameter partitioned (none kept whole on every rank): the EMA update lerps the partitions.
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            engine, *_ = deepspeed.initialize(model=copy, config=ds)
            engine.eval()  # DeepSpeed's eval() returns None
            return engine
        return copy.to(self.accelerator.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=self.autocast_dtype)

    def _distill_kwargs(self) -> dict[str, Any]:
        d = self.config.algorithm.distill
        return {"mode": d.mode, "alpha": d.alpha, "topk": d.topk, "tail": d.tail}

    def _engine_teacher_logp(self, batch: RolloutBatch) -> Tensor:
        """log q(y_t) under the reprompt for the rows with a signal, scored by the rollout engine (0 elsewhere)."""
        rows = batch.distill_mask_B.nonzero().flatten().tolist()
        teacher_logp_BR = torch.zeros(len(batch), batch.response_width)
        if rows:
            scores = self.engine.score_teacher([batch.teacher_prompt_ids[i] for i in rows], [batch.response_ids[i] for i in rows])
            teacher_logp_BR[rows, : scores.token_logp_BR.shape[1]] = scores.token_logp_BR
        return teacher_logp_BR

    def _needs_teacher(self, distill_mask_BR: Tensor | None) -> bool:
        if distill_mask_BR is None or self.engine_scores_teacher:
            return False
        needed = distill_mask_BR.any().float()
        if self.sharded:  # the teacher forward is a collective: every rank runs it if one rank needs it
            needed = self._reduce(needed, "max")
        return bool(needed)

    def _teacher_hidden(self, micro: RolloutBatch):
        """Teacher hidden states for the rows with a distillation signal (zeros elsewhere: those rows are masked)."""
        assert self.teacher is not None
        rows = micro.distill_mask_B.nonzero().flatten()
        if len(rows) == 0:  # FSDP2, another rank needs the teacher: join its forward with a stand-in row (masked)
            rows = torch.zeros(1, dtype=torch.long)
        sub = micro.select(rows)
        with self.timer("teacher"), self._autocast():
            hidden = self.teacher.hidden_states(self.unwrapped, sub.teacher_inputs(self.tokenizer.pad_token_id).to(self.accelerator.device))
        full = []
        for h in hidden.hidden:
            out = h.new_zeros(len(micro), micro.response_width, h.shape[-1])
            out[rows.to(h.device), : h.shape[1]] = h
            full.append(out)
        hidden.hidden = full
        return hidden

    @torch.no_grad()
    def _sampled_logprobs(self, model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
        """log-probs of the sampled tokens under `model` (old policy or reference), before any update: [B, R]."""
        device, parts = self.accelerator.device, []
        for micro in batch.micro_batches(self.config.trainer.micro_batch_size):
            with self._autocast():
                hidden = response_hidden_states(model, micro.student_inputs(self.tokenizer.pad_token_id).to(device))
                terms = chunked_response_terms(hidden, output_head(model), micro.response_ids_BR.to(device),
                                               self.config.rollout.temperature, self.config.trainer.logits_chunk_size)
            parts.append(terms["logp"].float().cpu())
        reshard(model)
        return torch.cat([torch.nn.functional.pad(p, (0, batch.response_width - p.shape[1])) for p in parts])

    def _global_counts(self, minibatch: RolloutBatch) -> dict[str, float]:
        """Loss normalisers for one optimizer step, summed over ranks."""
        mask_BR = minibatch.response_mask_BR
        has_distill = minibatch.distill_mask_B if minibatch.distill_mask_B is not None else torch.zeros(len(minibatch), dtype=torch.bool)
        local = torch.tensor([
            mask_BR.sum(), len(minibatch), (mask_BR & has_distill[:, None]).sum(), has_distill.sum(),
        ], dtype=torch.float64, device=self.accelerator.device)
        total = self._reduce(local, "sum").tolist()
        return dict(zip(["tokens", "seqs", "distill_tokens", "distill_seqs"], total))

    def _reduce(self, value: Tensor, op: str) -> Tensor:
        """sum / mean / max over ranks (identity on one process)."""
        if self.world == 1:
            return value
        value = value.to(self.accelerator.device)
        if op == "max":
            return self.accelerator.gather(value.reshape(1, -1)).max(dim=0).values.reshape(value.shape)
        return self.accelerator.reduce(value, reduction=op)

    def _reduce_mean(self, metrics: dict[str, Any]) -> dict[str, float]:
        if not metrics:
            return {}
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        values = self._reduce(values, "mean") if self.world > 1 else values
        return dict(zip(keys, values.tolist()))

    def _reprompts(self, batch: RolloutBatch, problems_B: list[Problem]) -> list[Reprompt]:
        """One reprompt per rollout, group by group. A demonstration is drawn with a generator seeded by (seed, step,
        question): the same choice however many processes the groups are spread over, and no RNG to checkpoint."""
        rows_by_group: dict[int, list[int]] = defaultdict(list)
        for i, group in enumerate(batch.group_ids_B.tolist()):
            rows_by_group[group].append(i)
        reprompts: list[Reprompt] = [None] * len(batch)  # type: ignore[list-item]
        for rows in rows_by_group.values():
            rng = random.Random(f"{self.config.trainer.seed}:{self.step}:{problems_B[rows[0]].id}")
            picked = build_reprompts([problems_B[i] for i in rows], [batch.response_text[i] for i in rows],
                                     [float(batch.rewards_B[i]) for i in rows], [batch.feedback[i] for i in rows],
                                     [0] * len(rows), self.config.algorithm.reprompt, rng)
            for i, reprompt in zip(rows, picked, strict=True):
                reprompts[i] = reprompt
        return reprompts

    def _log_samples(self, batch: RolloutBatch) -> None:
        """Every `logging.samples_every` steps: a table of completions with their reward and feedback (main rank)."""
        lcfg = self.config.logging
        if not lcfg.samples_every or self.step % lcfg.samples_every:
            return
        rows = [
            {"problem": batch.problem_ids[i], "response": batch.response_text[i],
             "reward": float(batch.rewards_B[i]), "feedback": batch.feedback[i]}
            for i in range(min(lcfg.num_samples, len(batch)))
        ]
        self.tracker.log_samples(rows, self.step)
