"""Reducing per-token losses [B, R] to the scalar that is backpropagated (docs/algorithm.md §3, §5, §9).

Every mode divides by counts of the *whole optimizer step* (all micro-batches, all ranks), supplied by the caller.
Then the sum over micro-batches of the returned values is exactly the step's loss, whatever the micro-batch size;
normalising per micro-batch would weight a token by the size of the micro-batch it happened to land in.
With DDP, which averages gradients over ranks, scale the loss by the world size to keep the global sum.
"""

from __future__ import annotations

from torch import Tensor

from sdpo.registry import Registry

AGGREGATIONS: Registry = Registry("loss aggregation")


def _masked(values_BR: Tensor, mask_BR: Tensor) -> Tensor:
    # where() rather than multiply: a masked-out entry can never leak into the sum (0 * inf would be NaN).
    return values_BR.where(mask_BR.bool(), values_BR.new_zeros(()))


def _per_count(total: Tensor, count: float | Tensor) -> Tensor:
    # A zero count means nothing was masked in (e.g. no sample was reprompted this step): return 0, not NaN.
    if isinstance(count, Tensor):
        return total / count.clamp(min=1)
    return total / max(count, 1)


@AGGREGATIONS.register("token-mean")
def token_mean(values_BR, mask_BR, num_tokens, num_seqs, max_response_len=None) -> Tensor:
    """Every loss token in the step weighs the same (DAPO; the paper's choice for SDPO)."""
    return _per_count(_masked(values_BR, mask_BR).sum(), num_tokens)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(values_BR, mask_BR, num_tokens, num_seqs, max_response_len=None) -> Tensor:
    """Mean over each sequence's tokens, then over sequences (original GRPO): long responses weigh less per token.

    `num_seqs` counts the sequences of the step; a sequence with no loss token contributes 0.
    """
    per_seq_B = _masked(values_BR, mask_BR).sum(-1) / mask_BR.sum(-1).clamp(min=1)
    return _per_count(per_seq_B.sum(), num_seqs)


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(values_BR, mask_BR, num_tokens, num_seqs, max_response_len=None) -> Tensor:
    """Dr. GRPO: each sequence's token sum over a constant (the max response length), then mean over sequences."""
    if max_response_len is None:
        raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_response_len (the generation limit)")
    return _per_count(_masked(values_BR, mask_BR).sum() / max_response_len, num_seqs)


def aggregate(
    values_BR: Tensor,
    mask_BR: Tensor,
    mode: str,
    num_tokens: float | Tensor,
    num_seqs: float | Tensor,
    max_response_len: int | None = None,
) -> Tensor:
    """Scalar loss of one micro-batch under aggregation `mode`, normalised by the step's global counts.

    num_tokens: masked-in tokens in the whole step; num_seqs: sequences in the whole step; max_response_len: the
    response length limit (seq-mean-token-sum-norm only). Summing over the step's micro-batches gives its loss.
    """
    if values_BR.shape != mask_BR.shape:
        raise ValueError(f"values_BR {tuple(values_BR.shape)} and mask_BR {tuple(mask_BR.shape)} differ in shape")
    return AGGREGATIONS.get(mode)(values_BR, mask_BR, num_tokens, num_seqs, max_response_len)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is set (over `dim`, or all); 0 where nothing is set. For metrics."""
    masked = _masked(values, mask)
    if dim is None:
        return masked.sum() / mask.sum().clamp(min=1)
    return masked.sum(dim) / mask.sum(dim).clamp(min=1)
