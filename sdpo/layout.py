"""Forward-batch layouts: how token lists become the tensors of one forward pass (`forward_inputs` picks one).

- `build_model_inputs`: `[left padding | prompt | response | right padding]`, so that every response starts at the
  same column and the logits of all response positions are one contiguous slice.
- `build_shared_prompt_inputs`: each distinct prompt once, and the responses that continue them apart, for forwards
  that run a prompt once for all its rollouts (`sdpo.models.PromptPass`).
- `PackedInputs`: the turns of a multi-turn episode as one sequence (`turn_chains`): a turn's prompt is the
  conversation so far, so its rows are positions of the episode's last row and need no forward of their own.
- `BranchInputs`: the teacher's reprompts of an episode, which share the conversation up to their turn with the
  episode's sequence and branch off it.

Which one a forward gets is the micro-batch planner's decision (`sdpo.plan`), handed down as one `Layout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class Layout:
    """How one forward lays out its rows, as the micro-batch planner decided it (`sdpo.plan.MicroBatchPlanner`):
    the layout functions ask it instead of taking each of its settings."""

    share_prompts: bool = False  # rows with one prompt run it once, where any do
    shared: PromptInputs | None = None  # distinct prompts already laid out (a block's), which the rows continue
    chains: Sequence[Sequence[int]] | None = None  # rows that run as one sequence (`turn_chains`); None: each alone

    def packs(self) -> bool:
        """Whether some rows run as one sequence (a chain of more than one row)."""
        return self.chains is not None and any(len(chain) > 1 for chain in self.chains)

    def shares(self, prompts: Sequence[Sequence[int]]) -> bool:
        """Whether `prompts` run once each: laid out already, or shared by some rows where sharing is on."""
        return self.shared is not None or (self.share_prompts and any_shared(prompts))


def forward_inputs(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                   layout: Layout = Layout()) -> ModelInputs | SharedPromptInputs | PackedInputs:
    """A forward batch of responses after their prompts, laid out as `layout` says: chains of rows as one sequence
    each (`layout.shared` then holds the chains' first prompts), distinct prompts once, or every row padded."""
    if layout.packs():
        return build_packed_inputs(prompts, responses, pad_id, layout)
    if layout.shares(prompts):
        return build_shared_prompt_inputs(prompts, responses, pad_id, layout.shared)
    return build_model_inputs(prompts, responses, pad_id)


def turn_chains(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                episodes: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """The rows that can run as one sequence, each chain in turn order: the next turn of an episode continues its
    previous turn's chain when its prompt starts with that turn's prompt and response, token for token (the
    conversation re-rendered with the chat template; sdpo.rollout.episodes). A turn whose prompt does not
    (earlier exchanges evicted by rollout.max_prompt_len, or a response whose text re-tokenizes differently) starts
    a chain of its own, under exactly the prompt it was sampled from. `episodes`: each episode's rows in turn order
    (`RolloutBatch.episode_rows`); without, every row is a chain. Chains are in order of their first row."""
    if episodes is None:
        return [[i] for i in range(len(prompts))]
    chains: list[list[int]] = []
    for rows in episodes:
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


def build_packed_inputs(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                        layout: Layout) -> PackedInputs:
    """`layout.chains` as one sequence each, their first prompts laid out as `layout` says."""
    chains = layout.chains or []
    firsts = [list(prompts[chain[0]]) for chain in chains]
    rests = [[*prompts[chain[-1]], *responses[chain[-1]]][len(first):] for chain, first in zip(chains, firsts)]
    sequences = forward_inputs(firsts, rests, pad_id, replace(layout, chains=None))
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
