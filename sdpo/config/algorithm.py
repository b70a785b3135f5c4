"""`algorithm.*`: the objective (SDPO, GRPO, their hybrids), the self-teacher, its reprompt and the losses.

A choice with a name (teacher kind, distillation mode, mix, ...) is validated against the registry that implements
it, imported when a config is built: the registries' modules import nothing of the config, so there is no cycle,
and a name registered from outside the library is valid here without editing this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdpo.config.checks import ConfigError, check_choice, check_range


@dataclass
class RepromptConfig:
    """How the self-teacher's context is built (docs/algorithm.md §2). The templates are the paper's exact strings."""

    reprompt_template: str = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
    solution_template: str = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"
    feedback_template: str = (
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n"
    )
    # The rollout's own attempt, for the paper's Table 6 ablation ("own attempt + output + solution": it hurts, 44.5
    # vs 48.3 without it); put before the feedback when include_own_attempt is on.
    own_attempt_template: str = "\nYour earlier attempt:\n\n{own_attempt}\n\n"
    success_reward_threshold: float = 1.0
    # Sibling solutions in the teacher's context; false: environment feedback only (paper Table 6, "output only").
    include_solution: bool = True
    include_own_attempt: bool = False
    # A successful rollout is distilled toward a *sibling* success, never toward itself.
    dont_reprompt_on_self_success: bool = True
    remove_thinking_from_demonstration: bool = True
    include_environment_feedback: bool = True
    environment_feedback_only_without_solution: bool = False
    # Reprompt token budget; demonstration and feedback are shortened first, never the question or instruction.
    max_reprompt_len: int = 10240
    # Teacher context from the data (a problem's `teacher_context`: a dataset's privileged_context column, an
    # environment's reference, or a reward function's Score.info["teacher_context"]), in the solution slot:
    # "fallback": where no successful sibling is drawn (a sibling wins); "prefer": wherever the data has one (the
    # sibling only where it has none); "both": the sibling's solution, then the data's; "off": never.
    data_context: str = "fallback"
    # How the data's context is written into the solution slot; {context} is its text.
    data_context_template: str = "{context}"

    def __post_init__(self) -> None:
        for key in ("prompt", "solution", "feedback"):
            if "{" + key + "}" not in self.reprompt_template:
                raise ConfigError(f"algorithm.reprompt.reprompt_template must contain {{{key}}}")
        if "{successful_previous_attempt}" not in self.solution_template:
            raise ConfigError("algorithm.reprompt.solution_template must contain {successful_previous_attempt}")
        if "{feedback_raw}" not in self.feedback_template:
            raise ConfigError("algorithm.reprompt.feedback_template must contain {feedback_raw}")
        if "{own_attempt}" not in self.own_attempt_template:
            raise ConfigError("algorithm.reprompt.own_attempt_template must contain {own_attempt}")
        if not self.include_solution and not self.include_environment_feedback and self.data_context == "off":
            raise ConfigError("algorithm.reprompt.include_solution=false, include_environment_feedback=false and "
                              "data_context=off leave the teacher nothing to learn from: turn one of them on")
        check_range("algorithm.reprompt.max_reprompt_len", self.max_reprompt_len, 16)
        from sdpo.teacher.choices import DATA_CONTEXT_ORDERS

        check_choice("algorithm.reprompt.data_context", self.data_context, DATA_CONTEXT_ORDERS)
        if "{context}" not in self.data_context_template:
            raise ConfigError("algorithm.reprompt.data_context_template must contain {context}")


@dataclass
class TeacherConfig:
    """Which weights the teacher scores with (docs/algorithm.md §4), what it reads before the response and who scores
    (docs/algorithm.md §11 for a teacher model other than the policy)."""

    # Where the weights come from (`sdpo.teacher.TEACHER_KINDS`): the policy's own (live, frozen, ema, trust_region)
    # or "external": the model at `model` (or one of `models`, chosen per row by `key`), frozen.
    kind: str = "ema"
    # EMA rate tau: teacher <- (1 - tau) teacher + tau student after each finite-gradient optimizer step.
    update_rate: float = 0.05
    # trust_region: teacher logits = lerp(reference logits, live logits, mix). The paper gives no value.
    trust_region_mix: float = 0.5
    # Who computes the teacher's log-probs: "trainer" (a forward pass in the update, every kind and distillation
    # mode) or "engine" (vLLM's prompt log-probs of the response under the reprompt, once per generation batch,
    # before the update). The engine holds the policy as of the last sync, so "engine" needs kind=live, and it
    # yields the sampled token's log-prob only: distill.mode=sampled_token; rollout.temperature=1.0. "server": a
    # vLLM server of the external teacher's own (kind=external, one model), likewise once per generation batch and
    # with the same limits (docs/algorithm.md §11).
    scorer: str = "trainer"
    # scorer=server: the teacher's server (e.g. http://host:8000, started with scripts/serve.py on the teacher's
    # folder); None: started on this machine from algorithm.teacher.model with rollout.vllm's settings.
    server_url: str | None = None
    # What the teacher reads before the response (`sdpo.teacher.TEACHER_CONTEXTS`): "reprompt" (docs/algorithm.md
    # §2: a sibling's solution, the feedback or the data's context; rows with none are not distilled) or "none"
    # (the student's own prompt, every row distilled: plain on-policy distillation, which needs a teacher better
    # than the policy, so kind=external).
    context: str = "reprompt"
    # kind=external: a local model sharing the policy's tokenizer, as a folder with config.json (save_pretrained;
    # a run's checkpoint step-N/ or best/ is one) or a run directory (its newest complete checkpoints/step-N/).
    model: str | None = None
    # kind=external with several teachers: {value of the data column `key`: model path}; each row is scored by the
    # teacher its column names (env=dataset: any column of the row; other envs: a field of Problem.data).
    models: dict[str, str] = field(default_factory=dict)
    key: str | None = None
    # kind=external: the teacher's weights' dtype (float32, bfloat16, float16); None: the policy's (model.dtype).
    # Forwards run under model.autocast_dtype like the policy's.
    dtype: str | None = None

    def __post_init__(self) -> None:
        from sdpo.teacher.choices import TEACHER_CONTEXTS, TEACHER_KINDS, TEACHER_SCORERS

        check_choice("algorithm.teacher.kind", self.kind, TEACHER_KINDS)
        check_choice("algorithm.teacher.scorer", self.scorer, TEACHER_SCORERS)
        check_choice("algorithm.teacher.context", self.context, TEACHER_CONTEXTS)
        check_range("algorithm.teacher.update_rate", self.update_rate, 0.0, 1.0)
        check_range("algorithm.teacher.trust_region_mix", self.trust_region_mix, 0.0, 1.0)
        if self.dtype is not None:
            check_choice("algorithm.teacher.dtype", self.dtype, ["float32", "bfloat16", "float16"])
        sources = [name for name, _ in TEACHER_KINDS.get(self.kind)(self)]
        given = [name for name in ("model", "models", "key", "dtype") if getattr(self, name)]
        if given and "external" not in sources:
            raise ConfigError(f"algorithm.teacher.{given[0]} is read by the external teacher only: add "
                              "algorithm.teacher.kind=external (the other kinds score with the policy's own weights)")
        # Neither model nor models is refused when the teacher is built (`sdpo.teacher.external`): a preset
        # (algorithm=opd) names the kind, the command line the model.
        if self.model and self.models:
            raise ConfigError("algorithm.teacher.model and algorithm.teacher.models both set: one teacher "
                              "(model=<path>) or several routed by a data column (models={value: path, ...}, key=...)")
        if bool(self.models) != bool(self.key):
            raise ConfigError("algorithm.teacher.models and algorithm.teacher.key go together: the models map values "
                              "of the data column `key` to teacher paths")
        scorer = TEACHER_SCORERS.get(self.scorer)
        if scorer.serves_external and (sources != ["external"] or self.models):
            raise ConfigError(f"algorithm.teacher.scorer={self.scorer} serves one external teacher: set "
                              "algorithm.teacher.kind=external and algorithm.teacher.model=<path> (not models)")
        if self.server_url and not scorer.serves_external:
            raise ConfigError(f"algorithm.teacher.server_url={self.server_url} is read by algorithm.teacher.scorer="
                              f"{', '.join(n for n in TEACHER_SCORERS.in_order() if TEACHER_SCORERS.get(n).serves_external)} only")
        if sources == ["live"] and self.context == "none":
            raise ConfigError("algorithm.teacher.kind=live with context=none scores the response as the policy does: "
                              "nothing to distill. Use context=reprompt, or a teacher of its own (kind=external)")


@dataclass
class DistillConfig:
    """The self-distillation loss (docs/algorithm.md §3)."""

    mode: str = "topk_logits"
    topk: int = 100
    # topk_logits: add a tail bucket with the leftover mass (true) or renormalise over the k entries (false).
    tail: bool = True
    # 0: forward KL(T||S); 1: reverse KL(S||T) (paper Eq. 1); in between: generalised JSD.
    alpha: float = 0.5
    # Importance-sampling clip for off-policy mini-batches: min(exp(s - old), is_clip).
    is_clip: float = 2.0
    # Clip of the sampled-token SDPO advantage A = q(y_t) - s(y_t) to [-clip, clip] (the paper's test-time runs use
    # 5.0), in the advantage-level hybrid and the sampled-token loss; None: no clip. Logit-level modes have no such
    # advantage, so the clip is rejected there rather than ignored.
    advantage_clip: float | None = None
    # Logit-level modes: a cap on each token's divergence (token_clip) and on each vocabulary entry's term of it
    # (entry_clip), so that a few outlier tokens or entries cannot dominate the signal; no gradient flows through a
    # capped term. None: no cap (the paper's loss). The sampled-token modes' per-token clip is advantage_clip.
    token_clip: float | None = None
    entry_clip: float | None = None
    # SRPO's entropy-aware weighting (docs/algorithm.md §12): each distilled token's loss times exp(-beta H), H the
    # teacher's entropy there, normalised to mean 1 over the distilled tokens; None: no weighting. The paper uses 1.0.
    entropy_beta: float | None = None

    def __post_init__(self) -> None:
        from sdpo.losses.distill import DISTILL_MODES

        check_choice("algorithm.distill.mode", self.mode, DISTILL_MODES)
        mode = DISTILL_MODES.get(self.mode)
        for key in ("token_clip", "entry_clip"):
            value = getattr(self, key)
            if value is not None:
                check_range(f"algorithm.distill.{key}", value, 1e-6)
                if not mode.needs_logits:
                    raise ConfigError(f"algorithm.distill.{key}={value} caps a logit-level divergence, which "
                                      f"algorithm.distill.mode={self.mode} does not compute: use "
                                      "algorithm.distill.advantage_clip (its per-token clip) or a logit-level mode")
        check_range("algorithm.distill.topk", self.topk, 1)
        if self.entropy_beta is not None:
            check_range("algorithm.distill.entropy_beta", self.entropy_beta, 0.0)
        check_range("algorithm.distill.alpha", self.alpha, 0.0, 1.0)
        if self.advantage_clip is not None:
            check_range("algorithm.distill.advantage_clip", self.advantage_clip, 1e-6)
            if not mode.token_advantage:
                raise ConfigError(
                    f"algorithm.distill.advantage_clip={self.advantage_clip} clips the sampled-token SDPO advantage, "
                    f"which algorithm.distill.mode={self.mode} does not use: it would do nothing. Remove it "
                    "(algorithm.distill.advantage_clip=null) or set algorithm.distill.mode=sampled_token"
                )
        if not mode.needs_logits and self.alpha != 1.0:
            raise ConfigError(
                f"algorithm.distill.mode={self.mode} supports only the reverse KL: set algorithm.distill.alpha=1.0"
            )


@dataclass
class PolicyLossConfig:
    """The GRPO clipped policy-gradient loss (docs/algorithm.md §5)."""

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    # KL to the reference (initial) weights; 0 disables it and skips the reference forward.
    kl_coef: float = 0.0
    kl_estimator: str = "k3"

    def __post_init__(self) -> None:
        check_range("algorithm.policy.clip_eps_low", self.clip_eps_low, 0.0, 1.0)
        check_range("algorithm.policy.clip_eps_high", self.clip_eps_high, 0.0)
        from sdpo.losses.policy import KL_ESTIMATORS

        check_choice("algorithm.policy.kl_estimator", self.kl_estimator, KL_ESTIMATORS)


@dataclass
class AlgorithmConfig:
    """SDPO, GRPO and their hybrids are one objective with a GRPO weight lambda (paper Eq. 3).

    grpo_weight = 0: pure SDPO (distillation only); 1: GRPO (no teacher at all); in between: a hybrid, mixed
    either at the advantage level (mix=advantage: A = lambda A_GRPO + (1 - lambda) A_SDPO inside the clipped
    policy-gradient loss, sampled-token SDPO advantage) or at the loss level (mix=loss:
    lambda * policy_loss + (1 - lambda) * distill_loss, any distillation mode).
    """

    name: str = "sdpo"  # a label for run names and plots
    grpo_weight: float = 0.0
    # "loss", "advantage" or "route" (SRPO: successes take GRPO, failures with a signal the distillation; no lambda).
    mix: str = "loss"
    advantage_estimator: str = "grpo"
    # The paper's GRPO advantage is r - mean(group) without std normalisation.
    norm_adv_by_std: bool = False
    loss_agg_mode: str = "token-mean"
    # Token-level truncated IS between the inference engine's and the trainer's log-probs; None disables it.
    tis_threshold: float | None = 2.0
    # Multi-turn episodes (rollout.max_turns > 1): the return GRPO baselines over a question's episodes and gives to
    # every turn of the episode (`sdpo.losses.EPISODE_RETURNS`). "final": the last turn's reward; "any_success": the
    # best turn's reward; "discounted": sum over turns t (from 0) of episode_discount^t * reward_t (a later success
    # is worth less).
    episode_return: str = "final"
    episode_discount: float = 0.9
    policy: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    reprompt: RepromptConfig = field(default_factory=RepromptConfig)

    @property
    def uses_teacher(self) -> bool:
        return self.grpo_weight < 1.0

    @property
    def uses_policy_loss(self) -> bool:
        from sdpo.losses.mix import MIXES

        return MIXES.get(self.mix).uses_policy_loss(self.grpo_weight)

    def __post_init__(self) -> None:
        check_range("algorithm.grpo_weight", self.grpo_weight, 0.0, 1.0)
        from sdpo.losses.advantages import ADVANTAGE_ESTIMATORS, EPISODE_RETURNS
        from sdpo.losses.aggregate import AGGREGATIONS
        from sdpo.losses.distill import DISTILL_MODES
        from sdpo.losses.mix import MIXES

        check_choice("algorithm.mix", self.mix, MIXES)
        check_choice("algorithm.advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        check_choice("algorithm.loss_agg_mode", self.loss_agg_mode, AGGREGATIONS)
        check_choice("algorithm.episode_return", self.episode_return, EPISODE_RETURNS)
        check_range("algorithm.episode_discount", self.episode_discount, 0.0, 1.0)
        if self.distill.advantage_clip is not None and not self.uses_teacher:
            raise ConfigError(f"algorithm.distill.advantage_clip={self.distill.advantage_clip} clips the SDPO advantage, "
                              "and algorithm.grpo_weight=1.0 (GRPO) has none: remove it")
        mix = MIXES.get(self.mix)
        if mix.in_advantage and self.uses_teacher and not DISTILL_MODES.get(self.distill.mode).token_advantage:
            raise ConfigError(
                "algorithm.mix=advantage mixes the sampled-token SDPO advantage into the policy gradient: "
                "set algorithm.distill.mode=sampled_token (and alpha=1.0), or use algorithm.mix=loss"
            )
        if mix.routes and self.grpo_weight != 0.0:
            raise ConfigError(f"algorithm.mix={self.mix} gives each row one signal, weighted by its tokens, and has no "
                              f"GRPO weight: remove algorithm.grpo_weight={self.grpo_weight} (leave it at 0.0)")
        if self.distill.entropy_beta is not None:
            from sdpo.teacher.choices import TEACHER_SCORERS

            if not self.uses_teacher or not mix.distill_term:
                raise ConfigError(f"algorithm.distill.entropy_beta={self.distill.entropy_beta} weights a distillation "
                                  f"loss term, which algorithm.mix={self.mix} with grpo_weight={self.grpo_weight} has "
                                  "none of: remove it, or use algorithm.mix=route or loss")
            if not TEACHER_SCORERS.get(self.teacher.scorer).forward_in_update:
                raise ConfigError(f"algorithm.distill.entropy_beta needs the teacher's entropy, which "
                                  f"algorithm.teacher.scorer={self.teacher.scorer} does not compute: use "
                                  "algorithm.teacher.scorer=trainer, or remove algorithm.distill.entropy_beta")
