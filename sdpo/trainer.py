"""`SDPOTrainer`: one training step of Self-Distillation Policy Optimization, readable from top to bottom.

    questions -> rollouts -> rewards + feedback -> teacher context (reprompts) -> advantages
              -> optimizer steps over mini-batches of whole groups (policy forward, teacher forward, objective)
              -> EMA teacher update after each finite-gradient step -> engine weight sync

SDPO, GRPO and their hybrids are one loop and one objective (`sdpo.losses.objective`): `algorithm.grpo_weight`
(lambda) is 0 for pure SDPO, 1 for GRPO (no teacher is built), in between for the hybrid, mixed at the advantage
level (paper Eq. 3) or the loss level. Where the processes are and how the policy is spread over them is
`sdpo.distributed`'s business; which weights score the teacher and how is `sdpo.teacher`'s. docs/architecture.md
follows one step through the modules.

Where this departs from the paper's public code (a verl fork), and why:
- Reprompts that are too long lose demonstration and feedback tokens, never the question, instruction or chat
  header (the public code truncates from the right and can cut the instruction).
- Losses are normalised by the global loss-token count of the optimizer step (all micro-batches and ranks), so
  results do not depend on micro-batch size.
- Top-k distillation takes the top-k of the *current* student at each step (the public code does the same), and the
  teacher forward runs inside the update, chunked over the sequence together with the student's vocabulary
  projection, so neither model's full [B, R, V] logits are held (except under DeepSpeed ZeRO-3, where a forward
  yields a micro-batch's logits: `sdpo.models.ResponseFeatures`).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass, replace
import logging
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from omegaconf import OmegaConf
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from sdpo import checkpoint as ckpt
from sdpo.batch import RolloutBatch, any_shared, build_prompt_inputs, pad_right
from sdpo.config import SDPOConfig
from sdpo.console import progress_postfix
from sdpo.diagnostics import FailureModes, context_metrics, too_small_to_move
from sdpo.distributed import Distributed
from sdpo.envs import Environment, Problem
from sdpo.envs.sampler import QuestionSampler
from sdpo.evaluation import evaluate
from sdpo.guards import BEST_DIR, BestCheckpoint
from sdpo.inputs import resolve_inputs
from sdpo.losses import chunked_response_terms
from sdpo.losses.objective import MetricSums, StepCounts, TokenInputs, objective
from sdpo.models import (DTYPES, PromptPass, load_model, render_chat, reshard, response_features,
                         supports_prompt_pass, unwrap)
from sdpo.precision import keep_freed_memory, resolve_precision, use_all_cores
from sdpo.rollout import RolloutEngine, SamplingSettings, build_engine
from sdpo.rollout.episodes import EpisodeLimits, episode_advantages, episode_metrics, evaluate_episodes, run_episodes
from sdpo.teacher import InitialWeights, Teacher, group_reprompts, reprompt_stats, teacher_prompt_ids
from sdpo.tracking import CURVES, StageTimer, Tracker, plot_curves

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    metrics: dict[str, float]
    batch: RolloutBatch  # the step's rollouts with their rewards and feedback (sample tables, test-time discovery)


def _on(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    return tensor.to(device) if tensor is not None else None


def _list(tensor: Tensor | None) -> list | None:
    return tensor.tolist() if tensor is not None else None


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
        resolve_precision(config)  # `auto` dtypes -> what this machine runs natively (saved in config.yaml)
        tcfg, acfg = config.trainer, config.algorithm
        self.dist = Distributed(tcfg)  # the launch: processes and how the policy is spread over them
        set_seed(tcfg.seed)
        if not tcfg.output_dir:
            raise ValueError("trainer.output_dir is not set: name the run directory (configs/config.yaml sets a "
                             "timestamped runs/<algorithm>-<env>-<time> one)")
        self.run_dir = Path(self.dist.shared_value(tcfg.output_dir))  # one directory for every process

        # -- environment and data
        self.env, self.model_path, self.tokenizer = inputs.env, inputs.model_path, inputs.tokenizer
        self.train_problems = self._renderable(self.env.load(config.env.train_split))
        self.eval_problems = self._renderable(self.env.load(config.env.eval_split))[: config.eval.num_questions]
        self.sampler = QuestionSampler(len(self.train_problems), tcfg.seed)

        # -- policy, teacher, KL reference (with LoRA: the adapter disabled, never a copy), optimizer, schedule.
        # Copies of the policy are taken before it is prepared (a prepared module may be split), then placed alike.
        model = inputs.load_policy()
        reload = lambda: load_model(replace(config.model, gradient_checkpointing=False), self.model_path)  # noqa: E731
        copy_policy = lambda policy: self.dist.frozen_copy(policy, reload)  # noqa: E731
        self.teacher = Teacher(acfg.teacher, model, copy_policy) if acfg.uses_teacher else None
        self.use_reference = acfg.uses_policy_loss and acfg.policy.kl_coef > 0
        self.reference = InitialWeights(model, copy_policy) if self.use_reference else None
        optimizer = self._optimizer(model)
        self.policy, self.optimizer = self.dist.prepare(model, optimizer)
        self.trainable = self.dist.trainable
        self.num_weights = sum(getattr(p, "ds_numel", p.numel()) for p in self.trainable)  # ds_numel: ZeRO-3 partitions
        for weights in (self.teacher, self.reference):
            if weights is not None:
                weights.place(self.unwrapped, self.dist.place_copy)
        self.autocast_dtype = DTYPES.get(config.model.autocast_dtype)
        # One forward per distinct prompt (trainer.share_prompts, sdpo.models.PromptPass): transformers turns the
        # key/value cache off under gradient checkpointing, and a sharded module must not be called again before
        # its backward.
        self.share_prompts = (tcfg.share_prompts and not config.model.gradient_checkpointing
                              and not (self.dist.sharded or self.dist.deepspeed) and supports_prompt_pass(model))
        # One autocast region per optimizer step (`_step_autocast`), so that each float32 weight is cast once per
        # step, not once per forward. The cached casts live for the whole step: not when sharded (every gathered
        # weight would stay) nor under gradient checkpointing (where a forward keeps no weights for its backward, so
        # the cache would add a 16-bit copy of the model).
        self.cast_weights_once = not (self.dist.sharded or self.dist.deepspeed or config.model.gradient_checkpointing)
        self.engine = engine or self._build_engine()
        # Every allowed core for the forward/backward, also after an in-process vLLM engine disabled set_num_threads;
        # freed memory kept for the next step's tensors rather than faulted in again.
        self.threads = use_all_cores()
        keep_freed_memory()
        if self.teacher is not None:
            self.teacher.check_engine(self.engine)

        self.step, self.timer = 0, StageTimer()
        self.failure_modes = FailureModes()  # sdpo/diagnostics.py: echo, copying, drift, vanishing updates
        self.best = BestCheckpoint(tcfg.keep_best, tcfg.collapse_drop, self.run_dir / "checkpoints")
        if tcfg.resume != "none":
            self._resume(tcfg.resume)
        self.tracker = Tracker(config.logging, self.run_dir, OmegaConf.to_container(OmegaConf.structured(config)),
                               enabled=self.dist.is_main)
        if self.dist.is_main:
            OmegaConf.save(OmegaConf.structured(config), self.run_dir / "config.yaml")

    # ------------------------------------------------------------------------------------------------------------
    # the loop

    @property
    def unwrapped(self) -> torch.nn.Module:
        return unwrap(self.policy)

    def train(self) -> dict[str, float]:
        cfg = self.config
        bar = tqdm(total=cfg.trainer.total_steps, initial=self.step, desc=cfg.algorithm.name,
                   disable=not (self.dist.is_main and cfg.logging.progress_bar))
        if cfg.eval.every and cfg.eval.at_start and self.step == 0:
            at_start = self.evaluate()
            self.keep_best(at_start)
            self.tracker.log(at_start, self.step)
        metrics: dict[str, float] = {}
        shown: dict[str, str] = {}  # the progress bar's fields
        while self.step < cfg.trainer.total_steps:
            result = self.training_step()
            metrics, collapsed = result.metrics, False
            self._log_samples(result.batch)
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                metrics.update(self.evaluate())
                collapsed = self.keep_best(metrics)
            self.tracker.log(metrics, self.step)
            bar.update(1)
            bar.set_postfix(progress_postfix(metrics, shown))
            if cfg.trainer.save_every and self.step % cfg.trainer.save_every == 0:
                self.save()
            if collapsed:
                break
        bar.close()
        self.save()
        if self.dist.is_main:
            plot_curves([self.run_dir], CURVES, self.run_dir / "reward_curve.png")
        self.tracker.close()
        return metrics

    def training_step(self) -> StepResult:
        """One generation batch: rollouts, rewards, teacher context, then the optimizer steps over it."""
        batch, problems_B, metrics = self.sample_and_score()
        with self.timer("teacher_context"):  # reprompts and their token ids (and engine-side teacher scoring)
            metrics |= self.build_teacher_context(batch, problems_B)
        batch.advantages_B = episode_advantages(batch, self.config.algorithm.norm_adv_by_std)
        with self.timer("update"):
            metrics |= self.update(batch)
        with self.timer("sync"):
            sync = self.engine.sync_weights(self.unwrapped)
        metrics |= {"sync/seconds": sync.seconds, "sync/mib": sync.bytes / 2**20, **sync.extra}
        metrics |= self.failure_modes.drift(metrics)
        self.step += 1
        return StepResult(metrics | self.timer.pop(), batch)

    def sampling_step(self) -> StepResult:
        """A step that samples and scores without learning (the best-of-k baseline of test-time runs)."""
        batch, _, metrics = self.sample_and_score()
        self.step += 1
        return StepResult(metrics | self.timer.pop(), batch)

    # ------------------------------------------------------------------------------------------------------------
    # the boxes of a step

    def sample_and_score(self) -> tuple[RolloutBatch, list[Problem], dict[str, float]]:
        with self.timer("generate"):
            batch, problems_B = self.generate(self.next_questions())
        with self.timer("score"):
            metrics = self.score(batch, problems_B)
        return batch, problems_B, metrics

    def next_questions(self) -> list[Problem]:
        """This process's share of the step's questions (every process draws the same global list)."""
        indices = self.sampler.take(self.config.trainer.questions_per_step)
        return [self.train_problems[i] for i in self.dist.share(indices)]

    def generate(self, problems: list[Problem]) -> tuple[RolloutBatch, list[Problem]]:
        prompts = [self._prompt_ids[id(p)] for p in problems]
        sampling = SamplingSettings.from_config(self.config.rollout, seed=self.dist.sampling_seed(self.config.trainer.seed, self.step))
        if self.config.rollout.max_turns > 1:  # episodes, scored turn by turn as they run: one row per model turn
            return run_episodes(self.engine, self.env, self.tokenizer, problems, prompts, sampling, self.config,
                                self.dist.any_rank)
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
        if batch.episode_ids_B is None:  # multi-turn episodes were scored turn by turn while they ran
            scores = self.env.score_batch(problems_B, batch.response_text, batch.truncated_B.tolist())
            batch.rewards_B = torch.tensor([s.reward for s in scores], dtype=torch.float32)
            batch.feedback = [s.feedback for s in scores]
        lengths = batch.response_lengths_B
        return self.dist.reduce_mean({
            "reward/mean": batch.rewards_B.mean(),
            "response/length_mean": lengths.mean(),
            "response/truncated_fraction": batch.truncated_B.float().mean(),
            **episode_metrics(batch, self.config.algorithm.reprompt.success_reward_threshold),
        }) | {"response/length_max": float(self.dist.reduce(lengths.max(), "max"))}

    def build_teacher_context(self, batch: RolloutBatch, problems_B: list[Problem]) -> dict[str, float]:
        """Reprompts (spec section 2): a sibling's solution and/or the env's feedback; a mask where there is neither."""
        rcfg = self.config.algorithm.reprompt
        rewards, groups = batch.rewards_B.tolist(), batch.group_ids_B.tolist()
        reprompts = group_reprompts(f"{self.config.trainer.seed}:{self.step}", rcfg, problems_B, batch.response_text,
                                    rewards, batch.feedback, groups, _list(batch.episode_ids_B))
        stats = reprompt_stats(reprompts, rewards, groups, rcfg.success_reward_threshold)
        failure_modes = context_metrics(rcfg, [p.question for p in problems_B], batch.response_text,
                                        [r.solution for r in reprompts], [r.feedback for r in reprompts], rewards, groups)
        if self.teacher is not None:
            within_window = replace(rcfg, max_reprompt_len=self._reprompt_limit())
            batch.teacher_prompt_ids = teacher_prompt_ids(reprompts, batch.prompt_ids, self.tokenizer, within_window,
                                                         self.config.model.chat_template_kwargs)
            batch.distill_mask_B = torch.tensor([r.has_signal for r in reprompts])
            self.teacher.score_with_engine(batch, self.engine)
        return self.dist.reduce_mean({f"teacher/{k}": v for k, v in vars(stats).items()} | failure_modes)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Optimizer steps over mini-batches of whole groups; several per generation batch make them off-policy."""
        tcfg = self.config.trainer
        if self.optimizer_steps_per_batch > 1:
            batch.old_logp_BR = self._sampled_logprobs(self.policy, batch)
        if self.reference is not None:
            with self.reference.use(self.unwrapped) as model:
                batch.ref_logp_BR = self._sampled_logprobs(model, batch)
        sums = MetricSums()
        generator = torch.Generator().manual_seed(tcfg.seed + self.step)
        for _ in range(tcfg.epochs_per_step):
            for minibatch in batch.group_minibatches(self.dist.local_count(tcfg.mini_batch_questions), generator):
                self.optimizer_step(minibatch, sums)
        means = sums.means(lambda t: self.dist.reduce(t, "sum"), lambda t: self.dist.reduce(t, "max"))
        return means | {"optim/lr": self.scheduler.get_last_lr()[0]}

    def optimizer_step(self, minibatch: RolloutBatch, sums: MetricSums) -> None:
        counts, size = self.step_counts(minibatch), self.config.trainer.micro_batch_size
        # trainer.share_prompts, where rollouts share prompts: blocks of at most `size` distinct prompts, each block's
        # prompts run once for the micro-batches of their rollouts (a pass keeps its prompts' activations until its
        # last backward: no more prompts than a micro-batch has rows), and the teacher's reprompts likewise.
        shared = self.share_prompts and any_shared(minibatch.prompt_ids)
        blocks = list(minibatch.prompt_blocks(size)) if shared else [minibatch]
        with self._step_autocast():
            for b, block in enumerate(blocks):
                prompts = self.prompt_pass(block) if shared else None
                reprompts = self.teacher_prompt_passes(block) if shared else None
                micro_batches = list(block.by_length().micro_batches(size))
                for i, micro in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1  # the block's last: its prompts' backward runs with this one's
                    with self.dist.micro_batch(last=last and b == len(blocks) - 1):
                        loss = self.micro_batch_loss(micro, counts, sums, prompts, last, reprompts)
                        with torch.autocast(self.dist.device.type, enabled=False):  # keeps `_step_autocast`'s cache
                            self.dist.backward(loss, prompts.pending() if prompts is not None and last else None)
                    if self.teacher is not None:
                        self.teacher.release()
        applied, grad_norm = self.dist.optimizer_step()
        if applied:
            self.scheduler.step()
            if self.teacher is not None:
                self.teacher.update(self.unwrapped)
            sums.add("optim/grad_norm", grad_norm, 1)
        else:
            log.warning("step %d: non-finite grad norm, optimizer step skipped", self.step)
        sums.add("optim/skipped_steps", float(not applied), 1)
        small = applied and too_small_to_move(grad_norm, self.num_weights, self.config.trainer.optim.eps)
        sums.add("diagnostics/small_grad_fraction", float(small), 1)

    def prompt_pass(self, block: RolloutBatch) -> PromptPass:
        """A block's distinct prompts through the policy once, for all its micro-batches (their responses continue
        the prompts' key/value cache: sdpo.models.PromptPass)."""
        prompts = build_prompt_inputs(block.prompt_ids, self.tokenizer.pad_token_id)
        # DDP: the pass's backward runs inside its block's last micro-batch's (the step's last is the synchronising
        # one); its forward must not prepare one.
        with self.dist.micro_batch(last=False), self._autocast():
            return PromptPass(self.policy, prompts.to(self.dist.device))

    def teacher_prompt_passes(self, block: RolloutBatch) -> list[PromptPass] | None:
        """A block's distinct reprompts through the teacher once (no gradient), for all its micro-batches' teacher
        forwards (`sdpo.teacher.Teacher.prompt_passes`); None without a trainer-side teacher or shared reprompts."""
        if self.teacher is None:
            return None
        with self.timer("teacher_forward"), self._autocast():
            return self.teacher.prompt_passes(self.unwrapped, block, self.tokenizer.pad_token_id, self.dist.device)

    def micro_batch_loss(self, micro: RolloutBatch, counts: StepCounts, sums: MetricSums,
                         prompts: PromptPass | None = None, last: bool = True,
                         reprompts: list[PromptPass] | None = None) -> Tensor:
        """The loss of one micro-batch, normalised by the optimizer step's global counts (summed over micro-batches).
        `prompts`: the block's `prompt_pass`, which the responses continue (`last`: the block's last micro-batch);
        without one, rows that share a prompt in this micro-batch run it once (trainer.share_prompts). `reprompts`:
        the block's `teacher_prompt_passes`, which the teacher's forward continues in the same way."""
        acfg, device, pad_id = self.config.algorithm, self.dist.device, self.tokenizer.pad_token_id
        mask_BR = micro.response_mask_BR.to(device)
        distill_mask_BR = mask_BR & micro.distill_mask_B.to(device)[:, None] if self.teacher is not None else None
        teacher = None
        if self.teacher is not None:
            with self.timer("teacher_forward"), self._autocast():  # counted apart from time/update
                teacher = self.teacher.micro_batch_features(self.unwrapped, micro, pad_id, device, self.dist.any_rank,
                                                            self.share_prompts, reprompts)
        # Logit-level distillation (full / top-k) needs both models' logits, so it is computed chunk by chunk here;
        # the sampled-token forms (token or sequence credit) need only log q(y_t) and live in the objective.
        logit_level = teacher is not None and acfg.mix == "loss" and acfg.distill.logit_level
        with self._autocast():
            inputs = micro.student_inputs(pad_id, self.share_prompts, prompts.prompts if prompts is not None else None)
            student = response_features(self.policy, inputs.to(device), prompts, last)
            terms = chunked_response_terms(
                student.values_BRX, student.head, micro.response_ids_BR.to(device), self.config.rollout.temperature,
                self.config.trainer.logits_chunk_size, **(teacher.chunk_kwargs() if teacher is not None else {}),
                distill_kwargs=self._distill_kwargs() if logit_level else None)
        inputs = TokenInputs(
            logp_BR=terms["logp"].float(), mask_BR=mask_BR, advantages_B=micro.advantages_B.to(device),
            entropy_BR=terms["entropy"], old_logp_BR=_on(micro.old_logp_BR, device),
            sampler_logp_BR=_on(micro.sampler_logp_BR, device), ref_logp_BR=_on(micro.ref_logp_BR, device),
            distill_mask_BR=distill_mask_BR, distill_BR=terms.get("distill"),
            teacher_logp_BR=Teacher.token_logp(micro, terms, distill_mask_BR) if self.teacher is not None else None)
        result = objective(inputs, counts, acfg, self.config.rollout.max_new_tokens)
        sums.add_result(result)
        return result.loss

    def evaluate(self) -> dict[str, float]:
        """avg@k / pass@k on this process's share of the held-out questions, averaged over processes."""
        ecfg, rcfg = self.config.eval, self.config.rollout
        sampling = SamplingSettings.from_config(
            rcfg, n=ecfg.samples_per_question, temperature=ecfg.temperature, top_p=ecfg.top_p,
            max_new_tokens=ecfg.max_new_tokens, seed=self.config.trainer.seed + 7919,
        )
        problems = self.dist.share(self.eval_problems)
        if self.config.rollout.max_turns > 1:  # success within the turn budget, and the first turn's avg@k
            return self.dist.reduce_mean(evaluate_episodes(self.engine, self.env, self.tokenizer, problems,
                                                           [self._prompt_ids[id(p)] for p in problems], sampling,
                                                           EpisodeLimits.from_config(self.config),
                                                           any_rank=self.dist.any_rank))
        result = evaluate(self.engine, self.env, problems, lambda p: self._prompt_ids[id(p)], sampling,
                          ks=ecfg.ks, success_threshold=self.config.algorithm.reprompt.success_reward_threshold)
        return self.dist.reduce_mean(result.metrics)

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints

    def keep_best(self, metrics: dict[str, float]) -> bool:
        """After an evaluation: save checkpoints/best/ on a better held-out value (trainer.keep_best); True when the
        value fell trainer.collapse_drop below the best (sdpo/guards.py)."""
        verdict = self.best.observe(metrics, self.step)
        if verdict.improved:
            self.save(BEST_DIR)
        if verdict.collapsed:
            best = self.best.best
            log.warning("step %d: %s=%.4f fell %.4f or more below its best %.4f (step %d): stopping (trainer.collapse_drop)",
                        self.step, best.metric, metrics[best.metric], self.config.trainer.collapse_drop, best.value, best.step)
            metrics["guard/collapse_stop"] = 1.0
        return verdict.collapsed

    def save(self, name: str | None = None) -> Path | None:
        """A checkpoint of everything the next step depends on (sdpo/checkpoint.py); every process takes part.
        `name`: a fixed directory instead of step-<step> (`best`), which rotation and resume leave alone."""
        root = self.run_dir / "checkpoints"
        self.dist.wait()
        if self.dist.is_main:
            ckpt.start(root, self.step, name)
        self.dist.wait()
        staging = ckpt.staging_dir(root, self.step, name)
        self.dist.write_rng_state(staging)
        self.dist.wait()
        weights, optimizer = self.dist.policy_state(staging)  # whole weights (None: unsplit) and optimizer state
        teacher = self.teacher.state_dict() if self.teacher is not None else {}
        path = None
        if self.dist.is_main:
            ckpt.save_model(self.unwrapped, self.tokenizer, staging, state_dict=weights)
            state = {"step": self.step, "world_size": self.dist.world, "optimizer": optimizer,
                     "scheduler": self.scheduler.state_dict(), "teacher": teacher, "sampler": self.sampler.state_dict(),
                     "failure_modes": self.failure_modes.state_dict(), "best": self.best.state_dict()}
            if name == BEST_DIR:
                self.best.write_record(staging)
            path = ckpt.finish(root, staging, self.step, state, self.config.trainer.keep_last, name)
        self.dist.wait()
        return path

    def _resume(self, resume: str) -> None:
        path = ckpt.latest_checkpoint(self.run_dir / "checkpoints") if resume == "auto" else Path(resume)
        if path is None:
            log.info("trainer.resume=auto: no complete checkpoint in %s, starting fresh", self.run_dir)
            return
        state = ckpt.load_trainer_state(path)
        self.dist.load_policy_state(path, state)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.sampler.load_state_dict(state["sampler"])
        self.failure_modes.load_state_dict(state.get("failure_modes", {}))  # .get: checkpoints from before issue #16
        self.best.load_state_dict(state.get("best", {}))
        self.dist.restore_rng_state(path, state["world_size"])
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
            ids = render_chat(self.tokenizer, p.messages, self.config.model.chat_template_kwargs)
            if len(ids) <= self.config.rollout.max_prompt_len:
                self._prompt_ids[id(p)] = ids
                kept.append(p)
        if len(kept) < len(problems):
            log.warning("dropped %d of %d problems longer than rollout.max_prompt_len=%d tokens",
                        len(problems) - len(kept), len(problems), self.config.rollout.max_prompt_len)
        if problems and not kept:
            raise ValueError("every problem is longer than rollout.max_prompt_len: raise it")
        return kept

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters and its schedule (`self.scheduler`)."""
        tcfg, optim = self.config.trainer, self.config.trainer.optim
        trainable = [p for p in model.parameters() if p.requires_grad]
        # torch's fused AdamW kernel: one pass over all parameters instead of a Python loop over them (0.11 s
        # against 0.62 s per step for SmolLM2-135M on a 2-core CPU). Not for FSDP2's sharded or DeepSpeed's
        # flattened parameters, which keep the default implementation.
        fused = not (self.dist.sharded or self.dist.deepspeed) and all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                      weight_decay=optim.weight_decay, fused=fused or None)
        self.optimizer_steps_per_batch = (tcfg.questions_per_step // tcfg.mini_batch_questions) * tcfg.epochs_per_step
        if optim.schedule == "cosine":
            total = tcfg.total_steps * self.optimizer_steps_per_batch
            self.scheduler = get_cosine_schedule_with_warmup(optimizer, optim.warmup_steps, total, min_lr_rate=optim.min_lr_ratio)
        else:
            self.scheduler = get_constant_schedule_with_warmup(optimizer, optim.warmup_steps)
        return optimizer

    def _build_engine(self) -> RolloutEngine:
        config = self.config
        max_model_len = config.rollout.max_prompt_len + config.rollout.max_new_tokens
        if config.algorithm.uses_teacher and config.algorithm.teacher.scorer == "engine":  # it reads reprompts too
            max_model_len = max(max_model_len, self._reprompt_limit() + config.rollout.max_new_tokens)
        return build_engine(config.rollout, self.unwrapped, self.tokenizer, self.model_path, max_model_len,
                            self.autocast_dtype, sharded=self.dist.sharded)

    def _reprompt_limit(self) -> int:
        """algorithm.reprompt.max_reprompt_len within the model's context window: the teacher reads a reprompt and a
        response, and positions past the window are undefined (vLLM refuses them: the paper's 10240 exceeds
        SmolLM2's 8192)."""
        limit = self.config.algorithm.reprompt.max_reprompt_len
        window = getattr(self.unwrapped.config, "max_position_embeddings", None)
        return min(limit, window - self.config.rollout.max_new_tokens) if window else limit

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
        teacher_casts = (self.teacher.cacheable_casts() if self.teacher is not None and self.dist.device.type == "cpu"
                         else contextlib.nullcontext())
        with torch.autocast(self.dist.device.type, dtype=self.autocast_dtype), teacher_casts:
            yield

    def _distill_kwargs(self) -> dict[str, object]:
        d = self.config.algorithm.distill
        return {"mode": d.mode, "alpha": d.alpha, "topk": d.topk, "tail": d.tail}

    @torch.no_grad()
    def _sampled_logprobs(self, model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
        """log-probs of the sampled tokens under `model` (old policy or reference), before any update: [B, R]."""
        device, parts = self.dist.device, []
        for micro in batch.micro_batches(self.config.trainer.micro_batch_size):
            with self._autocast():
                inputs = micro.student_inputs(self.tokenizer.pad_token_id, self.share_prompts)
                features = response_features(model, inputs.to(device))
                terms = chunked_response_terms(features.values_BRX, features.head, micro.response_ids_BR.to(device),
                                               self.config.rollout.temperature, self.config.trainer.logits_chunk_size)
            parts.append(terms["logp"].float().cpu())
        reshard(model)
        return torch.cat([torch.nn.functional.pad(p, (0, batch.response_width - p.shape[1])) for p in parts])

    def step_counts(self, minibatch: RolloutBatch) -> StepCounts:
        """Loss normalisers for one optimizer step, summed over processes."""
        mask_BR = minibatch.response_mask_BR
        distilled_B = minibatch.distill_mask_B if minibatch.distill_mask_B is not None else torch.zeros(len(minibatch), dtype=torch.bool)
        return StepCounts(**self.dist.sum_counts({
            "tokens": mask_BR.sum(), "seqs": len(minibatch),
            "distill_tokens": (mask_BR & distilled_B[:, None]).sum(), "distill_seqs": distilled_B.sum()}))

    def _log_samples(self, batch: RolloutBatch) -> None:
        """Every `logging.samples_every` steps: a table of completions with their reward and feedback (main process)."""
        lcfg = self.config.logging
        if not lcfg.samples_every or self.step % lcfg.samples_every:
            return
        rows = [
            {"problem": batch.problem_ids[i], "response": batch.response_text[i],
             "reward": float(batch.rewards_B[i]), "feedback": batch.feedback[i]}
            for i in range(min(lcfg.num_samples, len(batch)))
        ]
        self.tracker.log_samples(rows, self.step)
