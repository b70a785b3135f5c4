"""How an optimizer step's rows run as forwards: `MicroBatchPlanner`, the one place that decides blocks of shared
prompts, micro-batches of rows or of whole episodes, and whether a teacher's reprompts branch off an episode's
sequence. The learner asks it for the step's `MicroBatch`es, and the student's and the teacher's forwards ask each
micro-batch for their inputs, so that the settings that steer the layout travel in the plan, not in signatures.

- trainer.share_prompts (in effect: `Learner` turns it off where it cannot hold): rows that share a prompt run it
  once. Where rollouts share prompts, the step's rows come in blocks of at most `micro_batch_size` distinct prompts;
  each block's prompts run once through the policy (`sdpo.models.PromptPass`) for the micro-batches of its rows,
  and its distinct reprompts once through the teacher (`sdpo.teacher.Teacher`).
- trainer.pack_episodes, in a multi-turn batch: micro-batches of whole episodes, each episode one sequence
  (`sdpo.layout.PackedInputs`), in blocks by their first prompt; with shared prompts a turn's reprompt branches off
  its episode's sequence (`sdpo.layout.BranchInputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sdpo.batch import (
    BranchInputs,
    Layout,
    ModelInputs,
    PackedInputs,
    PromptInputs,
    RolloutBatch,
    SharedPromptInputs,
    any_shared,
)
from sdpo.models import PromptPass


@dataclass(frozen=True)
class Forward:
    """Where a forward runs: the tokenizer's pad id, the device, and `any_rank` (`Distributed.any_rank`)."""

    pad_id: int
    device: torch.device
    any_rank: Callable[[bool], bool] = bool


@dataclass(eq=False)
class Block:
    """Rows of an optimizer step whose distinct prompts run once (`shared`), or all its rows (not `shared`)."""

    rows: RolloutBatch
    shared: bool  # the block's prompts run once through the policy (`prompts`), its reprompts once per source
    prompts: PromptPass | None = None


@dataclass
class MicroBatch:
    """One forward/backward of an optimizer step: its rows, its block, and how its forwards lay the rows out."""

    rows: RolloutBatch
    block: Block
    last_in_block: bool  # its backward also carries the block's prompt pass's gradient
    last_in_step: bool  # its backward synchronises gradients over processes
    share: bool = False  # rows with one prompt (reprompt) run it once
    pack: bool = False  # an episode's turns run as one sequence
    # The block's distinct prompts through the policy, which the rows' responses continue (or None).
    prompts: PromptPass | None = field(init=False)

    def __post_init__(self) -> None:
        self.prompts = self.block.prompts

    @property
    def branch(self) -> bool:
        """A turn's reprompt continues its episode's sequence (`sdpo.layout.BranchInputs`)."""
        return self.share and self.pack

    def student_inputs(self, pad_id: int) -> ModelInputs | SharedPromptInputs | PackedInputs:
        shared = self.prompts.prompts if self.prompts is not None else None
        return self.rows.student_inputs(pad_id, Layout(self.share, shared, self.rows.chains() if self.pack else None))

    def teacher_inputs(self, rows: Tensor, pad_id: int, shared: PromptInputs | None
                       ) -> ModelInputs | SharedPromptInputs | BranchInputs:
        """The teacher's forward batch of the rows `rows` (`shared`: the block's distinct reprompts they continue)."""
        selected = self.rows.select(rows)
        return selected.teacher_inputs(pad_id, Layout(self.share, shared, selected.chains() if self.branch else None))


class MicroBatchPlanner:
    """`size`: trainer.micro_batch_size; `share_prompts`: prompt sharing in effect; `pack_episodes`:
    trainer.pack_episodes."""

    def __init__(self, size: int, share_prompts: bool, pack_episodes: bool) -> None:
        self.size, self.share_prompts, self.pack_episodes = size, share_prompts, pack_episodes

    def packs(self, batch: RolloutBatch) -> bool:
        """Whether the batch's episodes run as one sequence each (multi-turn with trainer.pack_episodes)."""
        return self.pack_episodes and batch.episode_ids_B is not None

    def layout(self, batch: RolloutBatch) -> Layout:
        """How the whole batch runs outside the micro-batches (the old policy's and the reference's log-probs):
        shared prompts where in effect, and an episode's turns as one sequence (`RolloutBatch.chains`) where packed."""
        return Layout(self.share_prompts, None, batch.chains() if self.packs(batch) else None)

    def micro_batches(self, minibatch: RolloutBatch, prompt_pass: Callable[[list[list[int]]], PromptPass]
                      ) -> Iterator[MicroBatch]:
        """The optimizer step's micro-batches, each cut from a length-ordered block so that its forward pads little.

        Where rollouts share prompts: blocks of at most `size` distinct prompts, each block's prompts (those its
        sequences start with) run once (`prompt_pass`) for the micro-batches of its rows (a pass keeps its prompts'
        activations until its last backward: no more prompts than a micro-batch has rows). Multi-turn with pack_episodes:
        micro-batches of whole episodes, each one sequence, at most `size` turns (so at most as many sequences,
        each at most rollout.max_prompt_len + max_new_tokens positions, as one turn's row is), in blocks by their
        first prompt. Lazily, so that a block's pass runs after the previous block's last backward."""
        pack = self.packs(minibatch)
        shared = self.share_prompts and any_shared(minibatch.sequence_prompts(pack))
        blocks = list(minibatch.prompt_blocks(self.size, by_episode=pack)) if shared else [minibatch]
        for b, rows_of_block in enumerate(blocks):
            block = Block(rows_of_block, shared, prompt_pass(rows_of_block.sequence_prompts(pack)) if shared else None)
            micros = list(rows_of_block.episode_micro_batches(self.size) if pack
                          else rows_of_block.by_length().micro_batches(self.size))
            for i, rows in enumerate(micros):
                last = i == len(micros) - 1
                yield MicroBatch(rows, block, last, last and b == len(blocks) - 1, self.share_prompts, pack)
