"""`RolloutBatch`: the one record that carries a generation batch between the boxes of a training step.

Shape suffixes (as in `sdpo.losses`): `_B` samples, `_R` response positions (right-padded, with `response_mask_BR`).
Samples are group-major: the G rollouts of a question are contiguous and share a `group_ids_B` value.

Token sequences stay as Python lists until a forward pass needs them; `student_inputs` / `teacher_inputs` then lay
them out (`sdpo.layout`, whose names this module re-exports).

The batch is built in stages, each of which returns a new batch with its own fields filled (`dataclasses.replace`,
never an assignment into the batch another module holds): the collector's rollouts and scores
(`sdpo.rollout.episodes.EpisodeRollout.batch`), the teacher's context (`with_teacher`), the advantages
(`with_advantages`), the learner's old and reference log-probs (`with_logprobs`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from sdpo.layout import (  # noqa: F401 - re-exported: the layouts are imported from here across the package
    MIN_PREFIX_SAVING,
    BranchInputs,
    Layout,
    ModelInputs,
    PackedInputs,
    PromptInputs,
    SharedPromptInputs,
    any_shared,
    build_branch_inputs,
    build_model_inputs,
    build_packed_inputs,
    build_prompt_inputs,
    build_shared_prompt_inputs,
    common_prefix_length,
    distinct_prompts,
    forward_inputs,
    pad_right,
    positions,
    turn_chains,
)


@dataclass
class RolloutBatch:
    # -- from the rollout engine
    problem_ids: list[str]
    prompt_ids: list[list[int]]  # the student's rendered chat prompt
    response_ids: list[list[int]]
    response_text: list[str]
    group_ids_B: Tensor  # long; question index within the generation batch
    truncated_B: Tensor  # bool; the response hit max_new_tokens
    sampler_logp_BR: Tensor | None = None  # the engine's log-probs of the sampled tokens (vLLM), else None
    # Multi-turn episodes (rollout.max_turns > 1, sdpo/rollout/episodes.py); None: single-turn. A row is one model
    # turn: prompt_ids is the conversation before it, response_ids that turn's tokens (the only ones with a loss).
    episode_ids_B: Tensor | None = None  # long; the row's episode (unique within the batch)
    turn_B: Tensor | None = None  # long; the turn's index within its episode, from 0
    # -- from the environment
    rewards_B: Tensor | None = None
    feedback: list[str] = field(default_factory=list)
    returns_B: Tensor | None = None  # float; the episode's return (algorithm.episode_return) on each of its turns
    # The teacher's context from the data, per row (a reward function's Score.info["teacher_context"], else the
    # problem's teacher_context); only reprompts read it. Empty: the problems' own.
    data_context: list[str | None] = field(default_factory=list)
    # -- from the reprompt builder (docs/algorithm.md §2)
    teacher_prompt_ids: list[list[int]] | None = None
    distill_mask_B: Tensor | None = None  # bool; the sample's reprompt has a solution or feedback
    # log q(y_t) under the reprompt, when the rollout engine scored the teacher (algorithm.teacher.scorer=engine)
    teacher_logp_BR: Tensor | None = None
    # Several teachers (algorithm.teacher.key): the index of the one that scores the row (long); None: one teacher
    teacher_route_B: Tensor | None = None
    # -- computed before the update
    advantages_B: Tensor | None = None  # GRPO group advantages
    old_logp_BR: Tensor | None = None  # the policy's log-probs before this generation batch's updates
    ref_logp_BR: Tensor | None = None  # reference-model log-probs (KL penalty only)

    def __len__(self) -> int:
        return len(self.response_ids)

    def with_teacher(self, context: Any) -> RolloutBatch:
        """The batch with the teacher's context (`sdpo.teacher.TeacherContext`): reprompt ids, distillation mask,
        the log-probs an engine scored and each row's teacher among several."""
        return replace(self, teacher_prompt_ids=context.prompt_ids, distill_mask_B=context.distill_mask_B,
                       teacher_logp_BR=context.logp_BR, teacher_route_B=context.route_B)

    def with_advantages(self, advantages_B: Tensor) -> RolloutBatch:
        return replace(self, advantages_B=advantages_B)

    def with_logprobs(self, old_logp_BR: Tensor | None, ref_logp_BR: Tensor | None) -> RolloutBatch:
        """The batch with the policy's log-probs before the update (None: on-policy) and the reference's (None: no
        KL penalty)."""
        return replace(self, old_logp_BR=old_logp_BR, ref_logp_BR=ref_logp_BR)

    @property
    def response_width(self) -> int:
        return max(max((len(r) for r in self.response_ids), default=0), 1)

    @property
    def response_ids_BR(self) -> Tensor:
        return pad_right(self.response_ids, 0, torch.long, self.response_width)

    @property
    def response_mask_BR(self) -> Tensor:
        return pad_right([[1] * len(r) for r in self.response_ids], 0, torch.bool, self.response_width)

    @property
    def response_lengths_B(self) -> Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.float32)

    @property
    def num_groups(self) -> int:
        return int(self.group_ids_B.unique().numel())

    def episodes(self) -> tuple[Tensor, Tensor, Tensor]:
        """(each episode's return [E], each episode's group [E], each row's episode [B]). A single-turn row is an
        episode of its own whose return is its reward; the rows of a multi-turn episode all hold its return."""
        if self.episode_ids_B is None:
            return self.rewards_B, self.group_ids_B, torch.arange(len(self))
        if self.returns_B is None:
            raise ValueError("a multi-turn batch needs returns_B (set by EpisodeRollout.batch)")
        _, episode_B = torch.unique(self.episode_ids_B, return_inverse=True)
        count = int(episode_B.max()) + 1
        returns_E = torch.zeros(count, dtype=torch.float32).scatter(0, episode_B, self.returns_B.float())
        groups_E = torch.zeros(count, dtype=torch.long).scatter(0, episode_B, self.group_ids_B)
        return returns_E, groups_E, episode_B

    def student_inputs(self, pad_id: int, layout: Layout = Layout()
                       ) -> ModelInputs | SharedPromptInputs | PackedInputs:
        """The policy's forward batch, laid out as the planner's `layout` says (`sdpo.plan.MicroBatch`)."""
        return forward_inputs(self.prompt_ids, self.response_ids, pad_id, layout)

    def chains(self) -> list[list[int]]:
        """The rows that run as one sequence (`turn_chains`): an episode's turns; each row alone in a single-turn
        batch."""
        return turn_chains(self.prompt_ids, self.response_ids, self.episode_rows())

    def sequence_prompts(self, pack: bool) -> list[list[int]]:
        """The prompts the forward's sequences start with: every row's, or with `pack` each chain's first."""
        return [self.prompt_ids[chain[0]] for chain in self.chains()] if pack else self.prompt_ids

    def episode_rows(self) -> list[list[int]]:
        """Each episode's rows in turn order, episodes in order of first appearance (single-turn: each row)."""
        if self.episode_ids_B is None:
            return [[i] for i in range(len(self))]
        rows_of: dict[int, list[int]] = {}
        for i, episode in enumerate(self.episode_ids_B.tolist()):
            rows_of.setdefault(episode, []).append(i)
        return [sorted(rows, key=lambda i: int(self.turn_B[i])) for rows in rows_of.values()]

    def teacher_inputs(self, pad_id: int, layout: Layout = Layout()
                       ) -> ModelInputs | SharedPromptInputs | BranchInputs:
        """The teacher's forward batch: the reprompts (the failed rollouts of a group with one successful sibling
        share one), laid out as the planner's `layout` says; where it chains a multi-turn episode's rows, their
        reprompts branch off the episode's sequence (the conversation up to each turn runs once: `BranchInputs`)."""
        if self.teacher_prompt_ids is None:
            raise ValueError("the batch has no teacher prompts yet: add the teacher's context (RolloutBatch.with_teacher)")
        if layout.packs():
            chains = layout.chains or []
            trunks = [[*self.prompt_ids[chain[-1]], *self.response_ids[chain[-1]]] for chain in chains]
            trunk_of = [0] * len(self)
            for c, chain in enumerate(chains):
                for i in chain:
                    trunk_of[i] = c
            return build_branch_inputs(trunks, trunk_of, self.teacher_prompt_ids, self.response_ids, pad_id)
        return forward_inputs(self.teacher_prompt_ids, self.response_ids, pad_id, layout)

    @property
    def distill_rows(self) -> list[int]:
        """The rows whose reprompt carries a signal (a demonstration or feedback): the teacher scores only these."""
        return self.distill_mask_B.nonzero().flatten().tolist() if self.distill_mask_B is not None else []

    def select(self, index: Sequence[int] | Tensor) -> RolloutBatch:
        """The samples at `index`, with per-token tensors trimmed to the selection's longest response."""
        idx = torch.as_tensor(index, dtype=torch.long)
        picked = [int(i) for i in idx]
        width = max(max((len(self.response_ids[i]) for i in picked), default=0), 1)
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                values[f.name] = value
            elif isinstance(value, Tensor):
                value = value[idx]
                values[f.name] = value[:, :width] if f.name.endswith("_BR") else value
            elif isinstance(value, list):
                values[f.name] = [value[i] for i in picked] if value else []
        return RolloutBatch(**values)

    def group_minibatches(self, questions_per_minibatch: int, generator: torch.Generator | None = None) -> Iterator[RolloutBatch]:
        """Split into mini-batches of whole groups (a question's rollouts never straddle two optimizer steps)."""
        groups = self.group_ids_B.unique()
        if generator is not None:
            groups = groups[torch.randperm(len(groups), generator=generator)]
        for start in range(0, len(groups), questions_per_minibatch):
            chosen = groups[start : start + questions_per_minibatch]
            yield self.select(torch.isin(self.group_ids_B, chosen).nonzero().flatten())

    def prompt_blocks(self, max_prompts: int, by_episode: bool = False) -> Iterator[RolloutBatch]:
        """The samples in blocks of whole prompts, at most `max_prompts` distinct prompts per block (in order of
        first appearance): every sample of a prompt lands in the same block. `by_episode`: whole episodes, each
        placed by its first turn's prompt."""
        episodes = self.episode_rows() if by_episode else [[i] for i in range(len(self))]
        index = distinct_prompts([self.prompt_ids[rows[0]] for rows in episodes])
        block_of = [index[tuple(self.prompt_ids[rows[0]])] // max_prompts for rows in episodes]
        for block in range(max(block_of, default=-1) + 1):
            yield self.select([i for rows, b in zip(episodes, block_of) if b == block for i in rows])

    def micro_batches(self, size: int) -> Iterator[RolloutBatch]:
        for start in range(0, len(self), size):
            yield self.select(range(start, min(start + size, len(self))))

    def by_length(self) -> RolloutBatch:
        """The same samples ordered by (response length, prompt length), so that micro-batches cut from it pad
        little: a forward's width is its longest prompt plus its longest response. The update's loss is a sum over
        micro-batches normalised by the optimizer step's counts, so the order changes only floating-point rounding."""
        order = sorted(range(len(self)), key=lambda i: (len(self.response_ids[i]), len(self.prompt_ids[i])))
        return self.select(order)

    def episode_micro_batches(self, size: int) -> Iterator[RolloutBatch]:
        """Micro-batches of whole episodes, at most `size` turns (rows: the responses a forward trains, as many as a
        micro-batch of single-turn rows holds) each; an episode of more turns gets a micro-batch of its own. An
        episode's turns run as one sequence (or one per unbroken run of turns: `turn_chains`), so a micro-batch also
        holds at most `size` sequences. Episodes are ordered by the length of their last turn's row (the longest
        sequence of the episode), so that a micro-batch pads little."""
        episodes = self.episode_rows()
        length = lambda e: len(self.prompt_ids[episodes[e][-1]]) + len(self.response_ids[episodes[e][-1]])  # noqa: E731
        micro: list[int] = []
        count = 0
        for e in sorted(range(len(episodes)), key=length):
            if micro and count + len(episodes[e]) > size:
                yield self.select([i for m in micro for i in episodes[m]])
                micro, count = [], 0
            micro.append(e)
            count += len(episodes[e])
        if micro:
            yield self.select([i for m in micro for i in episodes[m]])
