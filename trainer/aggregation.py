"""Masking and aggregation of per-token losses: pure tensor functions, no trainer state.

A token counts when its response mask is set and its sample is kept (a rollout whose privileged context added
nothing is dropped with `sample_mask` 0). Masked positions are selected away with `torch.where`, never
multiplied by 0, so whatever a padded position holds (even inf or NaN) cannot leak into the loss value.

One optimizer step covers a mini-batch, computed as micro-batches on every rank: `minibatch_normalizer` gives
the count each micro-batch's `aggregate` divides by, so that their losses add up to the mini-batch's;
`micro_batch_normalizers` chooses between that and the SDPO reference's per-micro-batch mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.options import Aggregation


def combine_masks(response_mask: torch.Tensor, sample_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the tokens that carry loss.

    response_mask: [B, T], nonzero on response tokens. sample_mask: [B] or None, nonzero for kept samples.
    Returns a bool tensor [B, T].
    """
    mask = response_mask.bool()
    if sample_mask is not None:
        if sample_mask.shape != mask.shape[:1]:
            raise ValueError(f"sample_mask has shape {tuple(sample_mask.shape)}, expected ({mask.shape[0]},)")
        mask = mask & sample_mask.bool().unsqueeze(-1)
    return mask


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: Aggregation,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar over the masked tokens.

    per_token: [B, T]; mask: [B, T] (bool, or nonzero = kept; build it with `combine_masks`).
    - token_mean: sum over kept tokens / number of kept tokens.
    - seq_mean_token_sum: per sequence, the sum over its kept tokens; mean over sequences with a kept token.
    - seq_mean_token_mean: per sequence, the mean over its kept tokens; mean over sequences with a kept token.
    `normalizer` replaces the count in the final division (tokens for token_mean, sequences for the seq modes):
    pass the mini-batch's count so that the micro-batches of one optimizer step add up to the mini-batch mean.
    With nothing kept the result is 0 and still has a gradient path (all-zero gradients), never NaN.
    Returns a 0-dim tensor in per_token's dtype.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.bool()
    kept = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if mode == "token_mean":
        total = kept.sum()
        count = mask.sum()
    elif mode == "seq_mean_token_sum":
        total = kept.sum(dim=-1).sum()
        count = mask.any(dim=-1).sum()
    elif mode == "seq_mean_token_mean":
        tokens_per_seq = mask.sum(dim=-1).clamp(min=1).to(per_token.dtype)
        total = (kept.sum(dim=-1) / tokens_per_seq).sum()
        count = mask.any(dim=-1).sum()
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}")
    if normalizer is None:
        # An empty batch divides 0 by 1: the loss is 0 and backward still runs.
        return total / count.clamp(min=1).to(per_token.dtype)
    return total / normalizer


def minibatch_normalizer(kept_response_lengths: Sequence[int], *, mode: Aggregation, world_size: int = 1) -> float:
    """The `normalizer` of `aggregate` for every micro-batch of one mini-batch (pure).

    kept_response_lengths: the response length in tokens of each kept rollout of the mini-batch, over all
    ranks (a rollout dropped by its sample mask is left out). The count is the mini-batch's tokens for
    token_mean, its sequences with at least one token for the seq modes, at least 1; divided by world_size
    because DeepSpeed averages the ranks' gradients, so each rank's micro-batch sums must add up to the
    mini-batch's loss times world_size.
    """
    if mode == "token_mean":
        count = sum(kept_response_lengths)
    elif mode in ("seq_mean_token_sum", "seq_mean_token_mean"):
        count = sum(1 for n in kept_response_lengths if n > 0)
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}")
    return max(count, 1) / world_size


def micro_batch_normalizers(
    minibatch_kept_lengths: Sequence[int],
    micro_batch_kept_lengths: Sequence[Sequence[int]],
    *,
    mode: Aggregation,
    world_size: int = 1,
    sdpo_compat: bool = False,
) -> list[float]:
    """The `normalizer` of `aggregate` for each of this rank's micro-batches of one mini-batch (pure).

    minibatch_kept_lengths: the kept rollouts' response lengths of the whole mini-batch, over all ranks.
    micro_batch_kept_lengths: this rank's micro-batches, each the response lengths of its kept rollouts.
    - default: every micro-batch divides by `minibatch_normalizer` of the whole mini-batch, so the step's loss
      is the true mini-batch aggregate: every token (or sequence) weighs the same whatever the split.
    - sdpo_compat: each micro-batch divides by its own count (at least 1) times the number of this rank's
      micro-batches: the mean over micro-batches of each one's own aggregate, as the SDPO reference does
      (lasgroup/SDPO: verl/trainer/ppo/core_algos.py line 1186, the micro-batch's kept tokens as
      batch_num_tokens; verl/workers/actor/dp_actor.py lines 746-748 and 772, loss_scale_factor = 1 /
      gradient_accumulation, with ppo_mini_batch_size per GPU a multiple of the micro-batch size,
      verl/workers/fsdp_workers.py line 256). A token of a short micro-batch then weighs more than one of a
      long one. No world_size factor: the ranks' gradients are averaged there as here, which already makes
      the mean over all ranks' micro-batches (every rank has as many).
    """
    if not sdpo_compat:
        return [minibatch_normalizer(minibatch_kept_lengths, mode=mode, world_size=world_size)] * len(
            micro_batch_kept_lengths)
    n_micro = len(micro_batch_kept_lengths)
    return [minibatch_normalizer(lengths, mode=mode) * n_micro for lengths in micro_batch_kept_lengths]
