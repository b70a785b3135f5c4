"""`RolloutBatch`: the one record that carries a generation batch between the boxes of a training step.

Shape suffixes (as in `sdpo.losses`): `_B` samples, `_R` response positions (right-padded, with `response_mask_BR`).
Samples are group-major: the G rollouts of a question are contiguous and share a `group_ids_B` value.

Token sequences stay as Python lists until a forward pass needs them. `build_model_inputs` then lays out
`[left padding | prompt | response | right padding]`, so that every response starts at the same column and the
logits of all response positions are one contiguous slice. `build_shared_prompt_inputs` lays out each distinct
prompt once and the responses that continue them apart, for forwards that run a prompt once for all its rollouts.
`PackedInputs` runs the turns of a multi-turn episode as one sequence (`turn_chains`): a turn's prompt is the
conversation so far, so its rows are positions of the episode's last row and need no forward of their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


def pad_right(rows: Sequence[Sequence[float]], value: float, dtype: torch.dtype, width: int | None = None) -> Tensor:
    """Stack ragged rows into a [len(rows), width] tensor, right-padded with `value`."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        row = row[:width]
        if len(row):
            out[i, : len(row)] = torch.as_tensor(row, dtype=dtype)
    return out


@dataclass
class ModelInputs:
    """A padded forward-pass batch whose response tokens occupy columns [P, P + R) of every row."""

    input_ids: Tensor  # [B, P + R]
    attention_mask: Tensor  # [B, P + R]
    position_ids: Tensor  # [B, P + R]
    prompt_width: int  # P
    response_width: int  # R

    def to(self, device: torch.device | str) -> ModelInputs:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
        )

    @property
    def response_hidden_slice(self) -> slice:
        """Positions whose hidden states predict the response tokens (one to the left of each token)."""
        return slice(self.prompt_width - 1, self.prompt_width + self.response_width - 1)


def build_model_inputs(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> ModelInputs:
    prompt = _left_padded(prompts, pad_id)
    response_ids, response_mask = _right_padded(responses, pad_id)
    input_ids = torch.cat([prompt.input_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt.attention_mask, response_mask], dim=1)
    return ModelInputs(input_ids, attention_mask, positions(attention_mask), prompt.input_ids.shape[1],
                       response_ids.shape[1])


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that count real tokens only, as during generation: padding (before the prompt, or after the
    common prefix of `PromptInputs`) shifts nothing."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class PromptInputs:
    """Distinct prompts: [U, P]; `index` maps each prompt to its row. Left-padded, except that the first `common`
    columns hold the prefix every prompt starts with (a chat template's system turn) and the padding follows it:
    [prefix | padding | rest], so that a forward can run the prefix once (`sdpo.models.PromptPass`). Positions
    count real tokens only, so both layouts give the same values."""

    input_ids: Tensor
    attention_mask: Tensor
    index: dict[tuple[int, ...], int]
    common: int = 0

    @property
    def position_ids(self) -> Tensor:
        return positions(self.attention_mask)

    def to(self, device: torch.device | str) -> PromptInputs:
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device))


@dataclass
class SharedPromptInputs:
    """Rows that continue a few distinct prompts: each prompt runs through the model once (`sdpo.models.PromptPass`)
    and the rows' responses run on its key/value cache, U x P + B x R positions instead of B x (P + R), with the
    same values and gradients (a GRPO group's G rollouts share one prompt).

    Each of the B rows names its prompt in `prompts` (`prompt_of_B`) and holds its response right-padded to R
    columns, at positions that continue the prompt's. `prompts` may hold more prompts than these rows use: the
    trainer runs a block of an optimizer step's distinct prompts once for all its micro-batches.
    """

    prompts: PromptInputs  # [U, P]
    prompt_of_B: Tensor  # long [B]: the row's prompt in `prompts`
    response_ids: Tensor  # [B, R]
    response_mask: Tensor  # [B, R]

    def to(self, device: torch.device | str) -> SharedPromptInputs:
        return SharedPromptInputs(self.prompts.to(device), self.prompt_of_B.to(device), self.response_ids.to(device),
                                  self.response_mask.to(device))

    @property
    def attention_mask(self) -> Tensor:
        """[B, P + R]: each row's prompt columns, then its response's."""
        return torch.cat([self.prompts.attention_mask[self.prompt_of_B], self.response_mask], dim=1)

    @property
    def response_position_ids(self) -> Tensor:
        """[B, R]: a response continues its prompt's positions."""
        start_B = self.prompts.attention_mask.sum(-1)[self.prompt_of_B]
        return start_B[:, None] + torch.arange(self.response_ids.shape[1], device=start_B.device)


def distinct_prompts(prompts: Sequence[Sequence[int]]) -> dict[tuple[int, ...], int]:
    """Each distinct prompt and its index, in order of first appearance."""
    index: dict[tuple[int, ...], int] = {}
    for p in prompts:
        index.setdefault(tuple(p), len(index))
    return index


def any_shared(prompts: Sequence[Sequence[int]]) -> bool:
    """Whether some rows share a prompt (so that running each distinct prompt once saves work)."""
    return len(distinct_prompts(prompts)) < len(prompts)


# A shared prefix runs once only where that saves at least this many positions: below it, the extra forward call
# costs more than the positions it saves.
MIN_PREFIX_SAVING = 8


def build_prompt_inputs(prompts: Sequence[Sequence[int]], pad_id: int) -> PromptInputs:
    """The distinct prompts among `prompts`, each once; their common prefix laid out once in front of the padding
    (`PromptInputs.common`) where running it once saves MIN_PREFIX_SAVING positions or more."""
    index = distinct_prompts(prompts)
    distinct = list(index)
    common = common_prefix_length(distinct)
    if (len(distinct) - 1) * common < MIN_PREFIX_SAVING:
        common = 0
    rest = _left_padded([p[common:] for p in distinct], pad_id)
    prefix = torch.tensor(distinct[0][:common], dtype=torch.long).expand(len(distinct), common)
    return PromptInputs(torch.cat([prefix, rest.input_ids], dim=1),
                        torch.cat([torch.ones_like(prefix), rest.attention_mask], dim=1), index, common)


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one token of its own (the position whose hidden state
    predicts its response's first token)."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def build_shared_prompt_inputs(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                               shared: PromptInputs | None = None) -> SharedPromptInputs:
    """`shared`: distinct prompts already laid out, among which these rows' prompts are; by default their own."""
    shared = build_prompt_inputs(prompts, pad_id) if shared is None else shared
    response_ids, response_mask = _right_padded(responses, pad_id)
    prompt_of_B = torch.tensor([shared.index[tuple(p)] for p in prompts], dtype=torch.long)
    return SharedPromptInputs(shared, prompt_of_B, response_ids, response_mask)


def forward_inputs(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                   share_prompts: bool = False, shared: PromptInputs | None = None,
                   chains: Sequence[Sequence[int]] | None = None) -> ModelInputs | SharedPromptInputs | PackedInputs:
    """A forward batch of responses after their prompts. `share_prompts`: rows with one prompt run it once, where
    any do; `shared`: distinct prompts already laid out (a block's), which these rows continue; `chains`: rows that
    run as one sequence (`turn_chains`), where any chain has more than one row (`shared` then holds the chains'
    first prompts)."""
    if chains is not None and any(len(chain) > 1 for chain in chains):
        return build_packed_inputs(prompts, responses, chains, pad_id, share_prompts, shared)
    if shared is not None or (share_prompts and any_shared(prompts)):
        return build_shared_prompt_inputs(prompts, responses, pad_id, shared)
    return build_model_inputs(prompts, responses, pad_id)


def turn_chains(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                episodes: Sequence[int] | None = None, turns: Sequence[int] | None = None) -> list[list[int]]:
    """The rows that can run as one sequence, each chain in turn order: the next turn of an episode continues its
    previous turn's chain when its prompt starts with that turn's prompt and response, token for token (the
    conversation re-rendered with the chat template; sdpo.rollout.episodes). A turn whose prompt does not
    (earlier exchanges evicted by rollout.max_prompt_len, or a response whose text re-tokenizes differently) starts
    a chain of its own, under exactly the prompt it was sampled from. Without `episodes` every row is a chain.
    Chains are in order of their first row."""
    if episodes is None:
        return [[i] for i in range(len(prompts))]
    turns = range(len(prompts)) if turns is None else turns
    rows_of: dict[int, list[int]] = {}
    for i, episode in enumerate(episodes):
        rows_of.setdefault(int(episode), []).append(i)
    chains: list[list[int]] = []
    for rows in rows_of.values():
        rows.sort(key=lambda i: int(turns[i]))
        chain = [rows[0]]
        for i in rows[1:]:
            last = chain[-1]
            tail = [*prompts[last], *responses[last]]
            if len(prompts[i]) >= len(tail) and list(prompts[i][: len(tail)]) == tail:
                chain.append(i)
            else:
                chains.append(chain)
                chain = [i]
        chains.append(chain)
    return sorted(chains, key=lambda chain: chain[0])


@dataclass
class PackedInputs:
    """Rows run as a few longer sequences: each chain of `turn_chains` is one sequence, its first row's prompt
    followed by the rest of its last row (every later turn's response, and the environment's replies between them,
    which carry no loss). The model runs `sequences` ([C, P + Rc], or its prompts shared); row b's response
    positions are the entries `index_BR[b]` of the sequences' response positions flattened to [C * Rc] (padding
    columns point at a real position; they are masked later). Equal in value to running every row alone: each turn
    sees the same tokens at the same positions, once."""

    sequences: ModelInputs | SharedPromptInputs
    index_BR: Tensor  # long [B, R]

    def to(self, device: torch.device | str) -> PackedInputs:
        return PackedInputs(self.sequences.to(device), self.index_BR.to(device))


def build_packed_inputs(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                        chains: Sequence[Sequence[int]], pad_id: int, share_prompts: bool = False,
                        shared: PromptInputs | None = None) -> PackedInputs:
    firsts = [list(prompts[chain[0]]) for chain in chains]
    rests = [[*prompts[chain[-1]], *responses[chain[-1]]][len(first):] for chain, first in zip(chains, firsts)]
    sequences = forward_inputs(firsts, rests, pad_id, share_prompts, shared)
    width = max(max(len(r) for r in rests), 1)  # the sequences' response columns (`_right_padded`)
    index_BR = torch.zeros(len(responses), max(max((len(r) for r in responses), default=0), 1), dtype=torch.long)
    for c, (chain, first) in enumerate(zip(chains, firsts)):
        for i in chain:
            start = c * width + len(prompts[i]) - len(first)
            index_BR[i] = start + torch.arange(index_BR.shape[1]).clamp(max=max(len(responses[i]) - 1, 0))
    return PackedInputs(sequences, index_BR)


@dataclass
class BranchInputs:
    """Rows whose prompts branch off a few longer sequences (`trunks`): the self-teacher's reprompts of a multi-turn
    episode, each the conversation up to its turn (a prefix of the episode's sequence) followed by the reprompt and
    the turn's response. Each trunk runs once (`sdpo.models.PromptPass`); row b sees the first `visible_B[b]` tokens
    of trunk `trunk_of_B[b]` and continues them with its own tokens, `branch_ids` = [left-padded rest of its prompt
    (at least one token) | right-padded response], at the positions that follow. The response's features are the
    branch columns [T - 1, T - 1 + R)."""

    trunks: PromptInputs  # [C, P]
    trunk_of_B: Tensor  # long [B]
    visible_B: Tensor  # long [B]: the trunk tokens the row sees
    branch_ids: Tensor  # [B, T + R]
    branch_mask: Tensor  # [B, T + R]
    tail_width: int  # T

    def to(self, device: torch.device | str) -> BranchInputs:
        return replace(self, trunks=self.trunks.to(device), trunk_of_B=self.trunk_of_B.to(device),
                       visible_B=self.visible_B.to(device), branch_ids=self.branch_ids.to(device),
                       branch_mask=self.branch_mask.to(device))

    @property
    def attention_mask(self) -> Tensor:
        """[B, P + T + R]: the row's visible trunk tokens, then its branch."""
        trunk_mask = self.trunks.attention_mask[self.trunk_of_B]
        visible = trunk_mask.bool() & (positions(trunk_mask) < self.visible_B[:, None])
        return torch.cat([visible.to(self.branch_mask.dtype), self.branch_mask], dim=1)

    @property
    def position_ids(self) -> Tensor:
        """[B, T + R]: the branch continues the visible trunk."""
        return self.visible_B[:, None] + positions(self.branch_mask)

    @property
    def response_slice(self) -> slice:
        return slice(self.tail_width - 1, self.branch_ids.shape[1] - 1)


def build_branch_inputs(trunks: Sequence[Sequence[int]], trunk_of: Sequence[int], prompts: Sequence[Sequence[int]],
                        responses: Sequence[Sequence[int]], pad_id: int) -> BranchInputs:
    """Each row's prompt branches off its trunk where they first differ (leaving the prompt at least one token of
    its own, whose hidden state predicts the response's first token); a trunk is cut after the last token a row
    sees."""
    visible = []
    for prompt, c in zip(prompts, trunk_of):
        trunk, n, limit = trunks[c], 0, min(len(trunks[c]), len(prompt) - 1)
        while n < limit and prompt[n] == trunk[n]:
            n += 1
        visible.append(n)
    kept = [max([v for v, c in zip(visible, trunk_of) if c == t], default=0) for t in range(len(trunks))]
    # A trunk no row sees any of keeps one token (a pass needs one); the rows mask it out.
    laid_out = _left_padded([list(trunk[: max(k, 1)]) for trunk, k in zip(trunks, kept)], pad_id)
    tails = _left_padded([list(prompt[v:]) for prompt, v in zip(prompts, visible)], pad_id)
    response_ids, response_mask = _right_padded(responses, pad_id)
    return BranchInputs(PromptInputs(laid_out.input_ids, laid_out.attention_mask, {}),
                        torch.tensor(list(trunk_of), dtype=torch.long), torch.tensor(visible, dtype=torch.long),
                        torch.cat([tails.input_ids, response_ids], dim=1),
                        torch.cat([tails.attention_mask, response_mask], dim=1), tails.input_ids.shape[1])


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> PromptInputs:
    """Prompts as they are (not deduplicated), left-padded, so that they end in the same column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    return PromptInputs(input_ids, attention_mask, {})


def _right_padded(responses: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Responses right-padded to the longest (at least one column): ids and mask."""
    width = max(max((len(r) for r in responses), default=0), 1)
    return (pad_right(responses, pad_id, torch.long, width),
            pad_right([[1] * len(r) for r in responses], 0, torch.long, width))


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
    # -- from the reprompt builder (spec section 2)
    teacher_prompt_ids: list[list[int]] | None = None
    distill_mask_B: Tensor | None = None  # bool; the sample's reprompt has a solution or feedback
    # log q(y_t) under the reprompt, when the rollout engine scored the teacher (algorithm.teacher.scorer=engine)
    teacher_logp_BR: Tensor | None = None
    # -- computed before the update
    advantages_B: Tensor | None = None  # GRPO group advantages
    old_logp_BR: Tensor | None = None  # the policy's log-probs before this generation batch's updates
    ref_logp_BR: Tensor | None = None  # reference-model log-probs (KL penalty only)

    def __len__(self) -> int:
        return len(self.response_ids)

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

    def student_inputs(self, pad_id: int, share_prompts: bool = False, shared: PromptInputs | None = None,
                       pack: bool = False) -> ModelInputs | SharedPromptInputs | PackedInputs:
        """The policy's forward batch. `share_prompts`: rows with one prompt run it once, where any do; `shared`:
        the optimizer step's distinct prompts, which these rows continue (see `SharedPromptInputs`); `pack`: the
        turns of an episode run as one sequence (`PackedInputs`; `shared` then holds `sequence_prompts`)."""
        return forward_inputs(self.prompt_ids, self.response_ids, pad_id, share_prompts, shared,
                              self.chains() if pack else None)

    def chains(self) -> list[list[int]]:
        """The rows that run as one sequence (`turn_chains`): an episode's turns; each row alone in a single-turn
        batch."""
        if self.episode_ids_B is None:
            return [[i] for i in range(len(self))]
        return turn_chains(self.prompt_ids, self.response_ids, self.episode_ids_B.tolist(), self.turn_B.tolist())

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

    def teacher_inputs(self, pad_id: int, share_prompts: bool = False, shared: PromptInputs | None = None,
                       pack: bool = False) -> ModelInputs | SharedPromptInputs | BranchInputs:
        """The teacher's forward batch: the reprompts (the failed rollouts of a group with one successful sibling
        share one), each run once with `share_prompts`; `shared`: a block's distinct reprompts, which these rows
        continue (`sdpo.teacher.Teacher.prompt_passes`); `pack`: a multi-turn episode's reprompts branch off its
        sequence (the conversation up to each turn runs once: `BranchInputs`)."""
        if self.teacher_prompt_ids is None:
            raise ValueError("the batch has no teacher prompts yet: build them with sdpo.teacher.build_reprompts")
        chains = self.chains() if pack else []
        if any(len(chain) > 1 for chain in chains):
            trunks = [[*self.prompt_ids[chain[-1]], *self.response_ids[chain[-1]]] for chain in chains]
            trunk_of = [0] * len(self)
            for c, chain in enumerate(chains):
                for i in chain:
                    trunk_of[i] = c
            return build_branch_inputs(trunks, trunk_of, self.teacher_prompt_ids, self.response_ids, pad_id)
        return self._inputs(self.teacher_prompt_ids, pad_id, share_prompts, shared)

    @property
    def distill_rows(self) -> list[int]:
        """The rows whose reprompt carries a signal (a demonstration or feedback): the teacher scores only these."""
        return self.distill_mask_B.nonzero().flatten().tolist() if self.distill_mask_B is not None else []

    def _inputs(self, prompts: list[list[int]], pad_id: int, share_prompts: bool,
                shared: PromptInputs | None) -> ModelInputs | SharedPromptInputs:
        return forward_inputs(prompts, self.response_ids, pad_id, share_prompts, shared)

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
        """Micro-batches of whole episodes, at most `size` sequences each (an episode is one sequence, or one per
        unbroken run of turns: `turn_chains`; one with more than `size` gets a micro-batch of its own), the
        episodes ordered as `by_length` orders rows, by their last turn, the longest row of the episode's sequence.
        A single-turn batch gives `by_length().micro_batches(size)`'s micro-batches."""
        episodes = self.episode_rows()
        episode_of = {i: e for e, rows in enumerate(episodes) for i in rows}
        sequences = [0] * len(episodes)
        for chain in self.chains():
            sequences[episode_of[chain[0]]] += 1
        key = lambda e: (len(self.response_ids[episodes[e][-1]]), len(self.prompt_ids[episodes[e][-1]]))  # noqa: E731
        micro: list[int] = []
        count = 0
        for e in sorted(range(len(episodes)), key=key):
            if micro and count + sequences[e] > size:
                yield self.select([i for m in micro for i in episodes[m]])
                micro, count = [], 0
            micro.append(e)
            count += sequences[e]
        if micro:
            yield self.select([i for m in micro for i in episodes[m]])
