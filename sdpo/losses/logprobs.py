"""Per-token log-probs, entropy and distillation terms from response features, one chunk of positions at a time.

The memory problem: [B, R, V] float32 logits for R = 8192 response tokens and V ~ 150k are ~5 GB per sample, and
SDPO needs the teacher's as well as the student's. `chunked_response_terms` applies the LM heads to a chunk of
positions at a time inside activation checkpointing, so only one chunk's [B, chunk, V] logits exist at once, in
the forward pass and again (recomputed) in the backward pass. (Under DeepSpeed ZeRO-3 the forward itself yields a
micro-batch's logits and the heads are the identity, see `sdpo.models.ResponseFeatures`: there the chunking bounds
only the log-softmax and distillation temporaries.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sdpo.losses.distill import distill_per_token, gather_token, log_softmax_temperature

Head = Callable[[Tensor], Tensor]


def token_logprobs(logits_BRV: Tensor, ids_BR: Tensor, temperature: float) -> Tensor:
    """log pi(ids) under the temperature-scaled distribution -> [B, R]."""
    return gather_token(log_softmax_temperature(logits_BRV, temperature), ids_BR)


def sampled_token_logprobs(logits_BRV: Tensor, ids_BR: Tensor, temperature: float) -> Tensor:
    """`token_logprobs` as z[ids] - logsumexp(z), z = logits / temperature: a reduction instead of a whole [B, R, V]
    log-softmax, for logits that need no gradient (the teacher's, when only its sampled-token log-prob is used)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z_BRV = logits_BRV.float() if logits_BRV.dtype in (torch.float16, torch.bfloat16) else logits_BRV
    z_BRV = z_BRV if temperature == 1.0 else z_BRV / temperature
    return gather_token(z_BRV, ids_BR) - torch.logsumexp(z_BRV, dim=-1)


def entropy_from_logits(logits_BRV: Tensor, temperature: float) -> Tensor:
    """Entropy of the temperature-scaled distribution at each position -> [B, R]."""
    return entropy_from_logprobs(log_softmax_temperature(logits_BRV, temperature))


def entropy_from_logprobs(logp_BRV: Tensor) -> Tensor:
    """Entropy from log-probs over the last dim -> [B, R]."""
    # A -inf logit (a banned token) has p = 0; clamping its log-prob keeps 0 * log 0 at 0 instead of NaN.
    return -(logp_BRV.exp() * logp_BRV.clamp(min=torch.finfo(logp_BRV.dtype).min)).sum(-1)


def _teacher_logits(features: Sequence[Tensor], heads: Sequence[Head], weights: Sequence[float]) -> Tensor:
    """sum_i w_i head_i(features_i), without gradient: one entry for a plain teacher, two for the trust region's
    lerp(ref_logits, live_logits, mix) (docs/algorithm.md §4)."""
    with torch.no_grad():
        terms = [(head(f.detach()), w) for f, head, w in zip(features, heads, weights, strict=True)]
        if len(terms) == 1 and terms[0][1] == 1.0:
            return terms[0][0]  # a plain teacher: no [B, C, V] copies
        # A fresh tensor first (the identity head under ZeRO-3 returns the features themselves), then in place.
        logits = terms[0][0] * terms[0][1]
        for term, w in terms[1:]:
            logits.add_(term, alpha=w)
        return logits


def _on_rows(values_bC: Tensor, rows: Tensor | None, num_rows: int) -> Tensor:
    """Per-row values of a row selection as [num_rows, C] (zeros elsewhere; differentiable)."""
    if rows is None:
        return values_bC
    return values_bC.new_zeros(num_rows, values_bC.shape[1]).index_copy(0, rows, values_bC)


def _chunk_terms(student_head, temperature, distill_kwargs, teacher_heads, teacher_weights, teacher_rows,
                 teacher_entropy, features_BCX, ids_BC, *teacher_features_BCX):
    """All per-token outputs for one chunk of C positions. Positional tensors only, as checkpoint() wants."""
    logits_BCV = student_head(features_BCX)
    logp_BCV = log_softmax_temperature(logits_BCV, temperature)  # once, for the log-probs and the entropy
    out = {"logp": gather_token(logp_BCV, ids_BC)}
    with torch.no_grad():
        out["entropy"] = entropy_from_logprobs(logp_BCV)
    if teacher_features_BCX:
        # The teacher's rows only (`teacher_rows`); the other rows' teacher terms are zeros.
        num_rows = ids_BC.shape[0]
        ids_bC = ids_BC if teacher_rows is None else ids_BC[teacher_rows]
        teacher_logits_bCV = _teacher_logits(teacher_features_BCX, teacher_heads, teacher_weights)
        out["teacher_logp"] = _on_rows(sampled_token_logprobs(teacher_logits_bCV, ids_bC, temperature), teacher_rows, num_rows)
        if teacher_entropy:
            out["teacher_entropy"] = _on_rows(entropy_from_logits(teacher_logits_bCV, temperature), teacher_rows, num_rows)
        if distill_kwargs is not None:
            # index_select: its backward (index_add_) is ~2.5x faster on a CPU than advanced indexing's index_put_.
            student_bCV = logits_BCV if teacher_rows is None else logits_BCV.index_select(0, teacher_rows)
            distill_bC = distill_per_token(student_bCV, teacher_logits_bCV, ids_bC, temperature=temperature, **distill_kwargs)
            out["distill"] = _on_rows(distill_bC, teacher_rows, num_rows)
    return out


def chunked_response_terms(
    student_features_BRX: Tensor,
    student_head: Head,
    response_ids_BR: Tensor,
    temperature: float,
    chunk_size: int,
    teacher_features: Sequence[Tensor] | None = None,
    teacher_heads: Sequence[Head] | None = None,
    teacher_weights: Sequence[float] | None = None,
    distill_kwargs: dict | None = None,
    teacher_rows: Tensor | None = None,
    teacher_entropy: bool = False,
) -> dict[str, Tensor]:
    """Per-token terms of the response, computed `chunk_size` positions at a time.

    student_features_BRX: the student's features at the positions that predict response tokens (so that
    student_head(f)[b, t] scores response_ids_BR[b, t]): final hidden states [B, R, H] with the output head, or
    logits [B, R, V] with the identity (`sdpo.models.ResponseFeatures`). Teacher: `teacher_features` (each aligned
    the same way under the teacher's context), `teacher_heads` (features -> logits) and `teacher_weights`; its logits
    are sum_i w_i head_i(features_i), always without gradient. `teacher_rows` (long, [b]): the teacher features are
    those of these rows of the batch only ([b, R, X]); the other rows' teacher terms are zeros (they are masked), and
    neither model's logits are projected for them on the teacher's account.

    Returns [B, R] tensors: "logp" (with grad) and "entropy" (detached); with a teacher also "teacher_logp"
    (detached) and, when `distill_kwargs` (mode, alpha, topk, tail; see `distill_per_token`) is given, "distill"
    (with grad). Without `distill_kwargs` only the teacher's sampled-token log-prob is computed, which is all the
    advantage-level hybrid needs. `teacher_entropy`: also "teacher_entropy" (detached), the teacher's entropy at the
    temperature (SRPO's weighting, docs/algorithm.md §12).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    teacher_features = list(teacher_features or [])
    if teacher_features and not (len(teacher_features) == len(teacher_heads or []) == len(teacher_weights or [])):
        raise ValueError("teacher_features, teacher_heads and teacher_weights must have the same length")
    if distill_kwargs is not None and "temperature" in distill_kwargs:
        raise ValueError("pass the temperature once, as chunked_response_terms(temperature=...)")
    if distill_kwargs is not None and not teacher_features:
        raise ValueError("distill_kwargs given without a teacher (teacher_features, teacher_heads, teacher_weights)")

    def run_chunk(*tensors: Tensor) -> dict[str, Tensor]:
        return _chunk_terms(student_head, temperature, distill_kwargs, teacher_heads, teacher_weights, teacher_rows,
                            teacher_entropy and bool(teacher_features), *tensors)

    pieces: list[dict[str, Tensor]] = []
    # max(R, 1): an empty response still yields one (empty) chunk, so every key is present with shape [B, 0].
    starts = range(0, max(student_features_BRX.shape[1], 1), chunk_size)
    for start in starts:
        window = slice(start, start + chunk_size)
        tensors = [student_features_BRX[:, window], response_ids_BR[:, window], *(f[:, window] for f in teacher_features)]
        if torch.is_grad_enabled() and len(starts) > 1:
            # Keep only the chunk's inputs; the [B, C, V] logits are recomputed in backward, one chunk at a time.
            # (A single chunk is not recomputed: its backward would rebuild the same tensors at the same peak.)
            pieces.append(checkpoint(run_chunk, *tensors, use_reentrant=False))
        else:
            pieces.append(run_chunk(*tensors))
    return {key: torch.cat([piece[key] for piece in pieces], dim=1) for key in pieces[0]}
