"""The training loop and what runs around it: `trainer.*` (steps, batches, optimizer, checkpoints), `eval.*`,
`test_time.*` and `logging.*`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdpo.config.checks import ConfigError, check_choice, check_range


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "constant"  # a name of sdpo.schedules.SCHEDULES: constant | cosine (after warmup)
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_range("trainer.optim.lr", self.lr, 0.0)
        from sdpo.schedules import SCHEDULES

        check_choice("trainer.optim.schedule", self.schedule, SCHEDULES)
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
    micro_batch_size: int = 8  # rollouts (turns) per forward/backward (gradient accumulation inside a mini-batch)
    # Response positions per chunk of the logits / distillation computation (memory bound, not a result knob).
    logits_chunk_size: int = 512
    # Each distinct prompt of an optimizer step runs through the policy once (in blocks of at most micro_batch_size
    # prompts), and its rollouts' responses on the prompt's key/value cache: the same values and gradients for
    # U x P + B x R positions instead of B x (P + R) (sdpo.models.PromptPass); the trainer-side teacher likewise
    # runs each distinct reprompt of a block once. In effect in one process or under DDP, without gradient
    # checkpointing, for models without sliding-window layers; FSDP2 and DeepSpeed run one forward per row.
    share_prompts: bool = True
    # Multi-turn (rollout.max_turns > 1): the turns of an episode run as one sequence (each turn's prompt is the
    # conversation so far, so its tokens are positions of the last turn's row), whole episodes of at most
    # micro_batch_size turns per forward, and the teacher's reprompts branch off it; the same values and gradients
    # as one row per turn (sdpo.layout.PackedInputs, docs/multi_turn.md).
    pack_episodes: bool = True
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


@dataclass(frozen=True)
class OtherEnv:
    """One entry of eval.other_envs: a registered environment evaluated beside the training one."""

    name: str
    label: str  # metrics are eval_<label>/...
    settings: dict[str, Any]  # fields of the environment's config (the rest keep its defaults)
    max_new_tokens: int | None = None  # None: eval.max_new_tokens, else rollout.max_new_tokens

    @classmethod
    def parse(cls, entry: Any) -> OtherEnv:
        if isinstance(entry, str):
            return cls(entry, entry, {})
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"eval.other_envs[] must be an environment name or a mapping with a 'name', not "
                              f"{entry!r}; e.g. eval.other_envs='[arithmetic,{{name:science,max_new_tokens:128}}]'")
        settings = dict(entry)
        name, label = settings.pop("name"), settings.pop("label", entry["name"])
        max_new_tokens = settings.pop("max_new_tokens", None)
        if max_new_tokens is not None:
            check_range(f"eval.other_envs[{label}].max_new_tokens", max_new_tokens, 1)
        return cls(name, str(label), settings, max_new_tokens)


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
    # scripts/eval.py writes its JSON report here; None: report.json in its run directory (runs/eval-<env>-<time>/).
    output_file: str | None = None
    # Other environments' held-out questions (at most num_questions of each), evaluated on the same schedule: what
    # training costs elsewhere (forgetting). Each entry is a registered environment name (its default settings) or a
    # mapping {name: <env>, label: <metric prefix>, max_new_tokens: N, <any of the env's settings>}, for example
    # eval.other_envs='[arithmetic,{name:science,max_new_tokens:128}]'. Logged as eval_<label>/avg@n, pass@k, ...
    # (label: the name) and drawn in the run's reward_curve.png.
    other_envs: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_range("eval.samples_per_question", self.samples_per_question, 1)
        for k in self.pass_k or []:
            check_range("eval.pass_k[]", k, 1, self.samples_per_question)
        labels = [other.label for other in self.other_env_specs]
        if len(set(labels)) < len(labels):
            raise ConfigError(f"eval.other_envs names an environment twice ({labels}): give each entry a label, "
                              "e.g. {name:arithmetic,label:addition,ops:[+]}")

    @property
    def other_env_specs(self) -> list[OtherEnv]:
        return [OtherEnv.parse(entry) for entry in self.other_envs]

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


@dataclass
class TestTimeConfig:
    """Test-time self-distillation on single hard questions (docs/algorithm.md §8; scripts/test_time.py)."""

    __test__ = False  # a config, not a pytest test class

    # Attempts (rollouts) per question before giving up; the paper's budget is 2750 at 16 rollouts per step.
    budget: int = 2750
    num_questions: int | None = None  # None: the whole split
    split: str = "test"
    # What runs on each question: "sdpo" (an SDPO step after each failed batch) and the "best_of_k" baseline
    # (the same number of attempts from the initial weights, no update), and "multi_turn", the paper's multi-turn
    # baseline: each of rollout.num_generations conversations gets the environment's reply to its failed attempt
    # and tries again (first-in-first-out eviction at rollout.max_prompt_len), no update; each turn is one attempt.
    # Names of sdpo.test_time.TEST_TIME_METHODS, checked where they run (`run_test_time`, before the first).
    methods: list[str] = field(default_factory=lambda: ["sdpo", "best_of_k"])
    # The JSON report; None: <trainer.output_dir>/test_time.json.
    output_file: str | None = None

    def __post_init__(self) -> None:
        check_range("test_time.budget", self.budget, 1)


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
