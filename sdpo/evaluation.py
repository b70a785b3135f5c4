"""Held-out evaluation the way papers report it: avg@k, pass@k (unbiased estimator) and maj@k."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import math
from pathlib import Path
from typing import Any

from sdpo.envs.base import Environment, Problem
from sdpo.rollout.base import RolloutEngine, SamplingSettings


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct).

    The unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), computed as a stable product.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(answers: Sequence[Any], correct: Sequence[bool]) -> float:
    """1 if the most frequent answer (ties broken by first appearance) is a correct one, else 0.

    `answers` are the extracted answers (None for no answer; never counted as a vote).
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    best = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == best)
    return float(any(ok for a, ok in zip(answers, correct) if a == winner))


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rewards: list[list[float]]  # [question][sample]


def evaluate(
    engine: RolloutEngine,
    env: Environment,
    problems: Sequence[Problem],
    render: Callable[[Problem], list[int]],
    sampling: SamplingSettings,
    ks: Sequence[int] = (1,),
    success_threshold: float = 1.0,
    prefix: str = "eval",
) -> EvalResult:
    """Sample `sampling.n` responses per problem and report avg@n, pass@k for each k <= n, maj@n, response length.

    No problems (a dataset without held-out data): no metrics, rather than zeros that read as a score."""
    if not problems:
        return EvalResult({}, [])
    completions = engine.generate([render(p) for p in problems], sampling)
    n = sampling.n
    flat_problems = [problems[c.prompt_index] for c in completions]
    scores = env.score_batch(flat_problems, [c.text for c in completions], [c.truncated for c in completions])
    rewards = [[s.reward for s in scores[i * n : (i + 1) * n]] for i in range(len(problems))]
    correct = [[r >= success_threshold for r in row] for row in rewards]
    metrics = {
        f"{prefix}/avg@{n}": sum(map(sum, rewards)) / max(1, n * len(problems)),
        f"{prefix}/response_length": sum(len(c.token_ids) for c in completions) / max(1, len(completions)),
    }
    for k in sorted({k for k in ks if k <= n} | {n}):
        metrics[f"{prefix}/pass@{k}"] = sum(pass_at_k(n, sum(row), k) for row in correct) / max(1, len(problems))
    answers = [[s.info.get("answer") for s in scores[i * n : (i + 1) * n]] for i in range(len(problems))]
    if any(a is not None for row in answers for a in row):
        metrics[f"{prefix}/maj@{n}"] = sum(majority_correct(a, c) for a, c in zip(answers, correct)) / max(1, len(problems))
    return EvalResult(metrics, rewards)


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """A plain-text table of `name  value` rows, avg / pass / maj first."""
    order = {"avg": 0, "pass": 1, "maj": 2}

    def rank(name: str) -> tuple:
        kind, _, k = name.split("/")[-1].partition("@")
        return (order.get(kind, 3), int(k) if k.isdigit() else 0, name)

    names = sorted(metrics, key=rank)
    width = max(map(len, names), default=0)
    lines = [title] if title else []
    lines += [f"{name:<{width}}  {metrics[name]:.4f}" for name in names]
    return "\n".join(lines)


def evaluate_checkpoint(
    config: Any, env: Environment | None = None, engine: RolloutEngine | None = None
) -> dict[str, Any]:
    """Evaluate `config.model.name_or_path` (a trainer checkpoint, a LoRA adapter checkpoint or any local model) on
    the eval split of `config.env` with `config.eval`'s sampling: the report scripts/eval.py prints and writes."""
    import time

    import torch

    from sdpo.envs import build_environment
    from sdpo.models import DTYPES, load_model, load_tokenizer, render_chat, resolve_checkpoint
    from sdpo.precision import resolve_precision
    from sdpo.rollout import build_engine

    resolve_precision(config)
    ecfg, rcfg = config.eval, config.rollout
    torch.manual_seed(config.trainer.seed)  # the HF engine samples from torch's global generator
    path = resolve_checkpoint(config.model)
    tokenizer = load_tokenizer(path)
    env = env or build_environment(config.env)
    problems = env.load(config.env.eval_split)
    prompts = {id(p): render_chat(tokenizer, p.messages, config.model.chat_template_kwargs) for p in problems}
    problems = [p for p in problems if len(prompts[id(p)]) <= rcfg.max_prompt_len][: ecfg.num_questions]
    max_new_tokens = ecfg.max_new_tokens or rcfg.max_new_tokens
    if engine is None:
        model = load_model(config.model, path).eval()
        model_path = path
        if rcfg.engine != "hf" and (Path(path) / "adapter_config.json").exists():
            model_path = Path(path) / "merged"  # vLLM serves a plain checkpoint: the adapter merged into the base
            model.save_pretrained(model_path)
            tokenizer.save_pretrained(model_path)
        engine = build_engine(rcfg, model, tokenizer, model_path, rcfg.max_prompt_len + max_new_tokens,
                              DTYPES.get(config.model.autocast_dtype))
    sampling = SamplingSettings.from_config(rcfg, n=ecfg.samples_per_question, temperature=ecfg.temperature,
                                            top_p=ecfg.top_p, max_new_tokens=max_new_tokens, seed=config.trainer.seed)
    start = time.perf_counter()
    result = evaluate(engine, env, problems, lambda p: prompts[id(p)], sampling, ks=ecfg.ks,
                      success_threshold=config.algorithm.reprompt.success_reward_threshold)
    return {
        "checkpoint": str(path),
        "env": config.env.name,
        "split": config.env.eval_split,
        "num_questions": len(problems),
        "samples_per_question": ecfg.samples_per_question,
        "sampling": {"temperature": ecfg.temperature, "top_p": ecfg.top_p, "max_new_tokens": max_new_tokens},
        "seconds": round(time.perf_counter() - start, 2),
        "metrics": result.metrics,
        "per_question": [{"id": p.id, "rewards": r} for p, r in zip(problems, result.rewards, strict=True)],
    }
