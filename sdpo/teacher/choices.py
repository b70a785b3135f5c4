"""The self-teacher's named choices, each a registry (the config validates against them, `sdpo.config`):

- `TEACHER_KINDS` (algorithm.teacher.kind): the weights whose logits the teacher mixes, as [(source, weight)] with
  sources from `WEIGHT_SOURCES` ("live", "initial", "ema", or one registered from outside);
- `TEACHER_SCORERS` (algorithm.teacher.scorer): who computes the teacher's log-probs (the trainer, the rollout
  engine, or a server of the external teacher);
- `TEACHER_CONTEXTS` (algorithm.teacher.context): what the teacher reads before the response: the reprompt, or the
  student's own prompt (plain on-policy distillation from a teacher model of its own, docs/algorithm.md §11);
- `DATA_CONTEXT_ORDERS` (algorithm.reprompt.data_context): how the data's teacher context and a successful
  sibling's answer share the reprompt's solution slot.

This module imports no other part of the library but the registry (the server scorer imports the server when it
starts one), so that the config can read these names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdpo.registry import Registry

# kind -> the weights whose logits the teacher mixes: (algorithm.teacher config) -> [(source name, weight)].
TeacherKind = Callable[[Any], list[tuple[str, float]]]
TEACHER_KINDS: Registry[TeacherKind] = Registry("teacher kind")
TEACHER_KINDS.register("live")(lambda config: [("live", 1.0)])
TEACHER_KINDS.register("frozen")(lambda config: [("initial", 1.0)])
TEACHER_KINDS.register("ema")(lambda config: [("ema", 1.0)])
TEACHER_KINDS.register("trust_region")(
    lambda config: [("initial", 1.0 - config.trust_region_mix), ("live", config.trust_region_mix)])
# A model other than the policy (algorithm.teacher.model, or .models routed by .key): `sdpo.teacher.external`.
TEACHER_KINDS.register("external")(lambda config: [("external", 1.0)])

# source name -> (policy, copy_policy, algorithm.teacher config) -> the weights (`sdpo.teacher.weights`); the
# built-in sources register there.
WEIGHT_SOURCES: Registry[Callable[..., Any]] = Registry("teacher weight source")


class TeacherScorer:
    """Who computes the teacher's log-probs (`algorithm.teacher.scorer`)."""

    forward_in_update = True  # a teacher forward inside the update, per micro-batch
    reads_rollout_engine = False  # the rollout engine scores (it then reads reprompt + response: its context grows)
    serves_external = False  # a server of the external teacher's own scores (algorithm.teacher.kind=external)

    def setup(self, teacher: Any, tokenizer: Any, rollout_config: Any, max_model_len: int) -> None:
        """When the teacher is built: what the scorer needs of it (its weights' folders, the policy's tokenizer,
        rollout.* for a server, the longest teacher prompt plus response)."""

    def check(self, engine: Any) -> None:
        """At start: whether `engine` can do what this scorer asks of it."""

    def score(self, teacher_prompt_ids: list[list[int]], response_ids: list[list[int]], rows: list[int],
              width: int, engine: Any) -> torch.Tensor | None:
        """Before the update: log q(y_t) [B, width] computed outside the trainer's forwards, or None."""
        return None


TEACHER_SCORERS: Registry[type[TeacherScorer]] = Registry("teacher scorer")
TEACHER_SCORERS.register("trainer")(TeacherScorer)


@TEACHER_SCORERS.register("engine")
class EngineScorer(TeacherScorer):
    """The rollout engine's prompt log-probs, once per generation batch, for engines that declare the capability
    (`RolloutEngine.scores_teacher`)."""

    forward_in_update = False
    reads_rollout_engine = True

    def check(self, engine: Any) -> None:
        if not engine.scores_teacher:
            raise ValueError(f"algorithm.teacher.scorer=engine: the {type(engine).__name__} engine cannot score "
                             "the teacher (use rollout=vllm, or algorithm.teacher.scorer=trainer)")

    def score(self, teacher_prompt_ids: list[list[int]], response_ids: list[list[int]], rows: list[int],
              width: int, engine: Any) -> torch.Tensor:
        """log q(y_t) under the reprompt for the rows with a signal (0 elsewhere)."""
        logp_BR = torch.zeros(len(response_ids), width)
        if rows:
            scores = engine.score_teacher([teacher_prompt_ids[i] for i in rows], [response_ids[i] for i in rows])
            logp_BR[rows, : scores.token_logp_BR.shape[1]] = scores.token_logp_BR
        return logp_BR


# context -> (the rows' reprompts, the rows' student prompts, render: () -> the reprompts' token ids) ->
# (each row's teacher prompt, whether the row is distilled). Only "reprompt" renders.
TeacherContextRule = Callable[[list[Any], list[list[int]], Callable[[], list[list[int]]]], tuple[list[list[int]], list[bool]]]
TEACHER_CONTEXTS: Registry[TeacherContextRule] = Registry("teacher context")
# The reprompt (docs/algorithm.md §2): a row is distilled where its reprompt carries a sibling's solution, the
# environment's feedback or the data's context.
TEACHER_CONTEXTS.register("reprompt")(lambda reprompts, student, render: (render(), [r.has_signal for r in reprompts]))
# The student's own prompt: every row is distilled (on-policy distillation needs no success, feedback or data).
TEACHER_CONTEXTS.register("none")(lambda reprompts, student, render: ([list(p) for p in student], [True] * len(student)))

@TEACHER_SCORERS.register("server")
class ServerScorer(EngineScorer):
    """An external teacher's log-probs from a vLLM server that serves its model (docs/algorithm.md §11): started
    from the teacher's folder with rollout.vllm's settings (algorithm.teacher.server_url=null; stopped when the
    process exits), or reached at server_url. Like the engine scorer, once per generation batch, the sampled tokens'
    log q(y_t) only (the sampled-token modes): the logit-level modes compare the distributions on the student's
    top-k, which a server of the teacher alone cannot score."""

    reads_rollout_engine = False
    serves_external = True

    def __init__(self) -> None:
        self.server: Any = None

    def setup(self, teacher: Any, tokenizer: Any, rollout_config: Any, max_model_len: int) -> None:
        from dataclasses import replace

        from sdpo.rollout.server import ServerEngine

        folders = [folder for store in teacher.stores for folder in getattr(store, "folders", [])]
        if len(folders) != 1 or rollout_config is None:
            raise ValueError("algorithm.teacher.scorer=server serves one external teacher (algorithm.teacher.model), "
                             "built with the run's rollout config (build_teacher)")
        config = replace(rollout_config, server=replace(rollout_config.server, url=teacher.config.server_url))
        self.server = ServerEngine(folders[0], tokenizer, config, max_model_len=max_model_len)

    def check(self, engine: Any) -> None:
        """The rollout engine is asked nothing: the teacher's own server scores."""

    def score(self, teacher_prompt_ids: list[list[int]], response_ids: list[list[int]], rows: list[int],
              width: int, engine: Any) -> torch.Tensor:
        return super().score(teacher_prompt_ids, response_ids, rows, width, self.server)


# order -> (a sibling's solution or None, the data's context rendered or None) -> (the solution slot, whether it
# holds the data's context); only called where the data has a context for the row.
DataContextOrder = Callable[[str | None, str], tuple[str | None, bool]]
DATA_CONTEXT_ORDERS: Registry[DataContextOrder | None] = Registry("data-context order")
DATA_CONTEXT_ORDERS.register("off")(None)  # the data's context is never used
DATA_CONTEXT_ORDERS.register("fallback")(lambda sibling, data: (sibling, False) if sibling is not None else (data, True))
DATA_CONTEXT_ORDERS.register("prefer")(lambda sibling, data: (data, True))
DATA_CONTEXT_ORDERS.register("both")(
    lambda sibling, data: (f"{sibling}\n\n{data}", True) if sibling is not None else (data, True))
