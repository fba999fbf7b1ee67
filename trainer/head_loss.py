"""The OPSD loss from the last hidden states: both LM heads and the loss of METHOD.md section 1 (steps 5-6),
a chunk of positions at a time.

Why: the logits of one 32k-token response over Qwen3's 151,936-token vocabulary take ~20 GB per side in
float32, and `opsd_loss` (trainer/losses.py) needs them for every position at once. Here the student's and
the teacher's hidden states [B, T, H] come in with their heads (trainer/lm_head.py), and only `chunk_size`
positions' logits [chunk, V] exist at any time; `opsd_loss` on full logits stays the reference.

How the gradient is had without a second pass: a position's loss term depends on its own logits only, and
its weight in the loss (mask, aggregation, normaliser, importance ratios) is detached and depends on that
position's terms alone (`loss_from_terms`). So the gradient of the loss with respect to a chunk's logits is
known as soon as the chunk's forward is, and goes through the head at once: grad hidden = grad logits @ W,
grad W += grad logits^T @ hidden, grad bias += the column sums. Nothing is recomputed: the forward does the
unfused path's forward and backward, in the same number of head matmuls, and the backward only scales the
stored gradients by the loss's incoming gradient (the design of Liger's fused linear cross-entropy). The
gradients are computed only when autograd can use them (grad mode on, the student's inputs need grad).

Only kept positions (response mask and sample mask) go through the heads: padding costs nothing.
Conventions as in trainer/losses.py: pure tensor functions, logits in at least float32, the teacher gets no
gradient, the loss returns `(loss, metrics)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.aggregation import combine_masks
from trainer.lm_head import LMHead
from trainer.losses import position_terms, loss_from_terms, opsd_loss, token_logps
from trainer.options import Aggregation, Divergence, Support


class _PrecomputedGrads(torch.autograd.Function):
    """Return `loss` unchanged; its backward hands out gradients computed beforehand, times the incoming one.

    Inputs: loss (0-dim, detached), the student's hidden states, head weight and bias (the tensors that
    receive the gradients), then their precomputed gradients (None for an input that needs none).
    """

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the fused loss's gradients were handed out already (backward runs once)")
        # Scaled in place and released: the weight's gradient is as large as the head, so no second copy.
        grads, ctx.grads = ctx.grads, None
        scaled = tuple(None if grad is None else grad.mul_(grad_loss.to(grad.dtype)).to(dtype)
                       for grad, dtype in zip(grads, ctx.dtypes))
        return (None, *scaled, None, None, None)


def opsd_loss_from_hidden(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    sample_mask: torch.Tensor | None = None,
    *,
    student_head: LMHead,
    teacher_head: LMHead,
    chunk_size: int | None,
    divergence: Divergence,
    support: Support,
    top_k: int,
    jsd_alpha: float,
    aggregation: Aggregation,
    importance_ratio_clip: float | None,
    rollout_ratio_clip: float | None,
    temperature: float,
    old_logps: torch.Tensor | None = None,
    rollout_logps: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    sdpo_compat: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`opsd_loss` of the logits `hidden @ head.weight.T + head.bias` on each side, never all at once.

    student_hidden, teacher_hidden: [B, T, H], position t's last hidden state (the one that predicts
    response_ids[:, t]); each side's head is applied to it. chunk_size: kept positions per chunk, over all
    rows (a chunk's logits are [chunk_size, V] on each side); None computes all logits [B, T, V] first and
    calls `opsd_loss` on them (the unfused reference). Every other argument, the loss, the metrics and the
    gradients (to the student's hidden states, head weight and bias) are those of
    `opsd_loss(student_hidden @ W.T + b, teacher_hidden @ W_teacher.T + b_teacher, ...)`; a tied head's
    weight is the embedding matrix, which then gets both gradients summed.
    """
    weight_options = dict(divergence=divergence, aggregation=aggregation, importance_ratio_clip=importance_ratio_clip,
                          rollout_ratio_clip=rollout_ratio_clip, old_logps=old_logps, rollout_logps=rollout_logps,
                          normalizer=normalizer)
    if chunk_size is None:
        student_logits = F.linear(student_hidden, student_head.weight, student_head.bias)
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden, teacher_head.weight, teacher_head.bias)
        return opsd_loss(student_logits, teacher_logits, response_ids, response_mask, sample_mask, support=support,
                         top_k=top_k, jsd_alpha=jsd_alpha, temperature=temperature, sdpo_compat=sdpo_compat,
                         **weight_options)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    mask = combine_masks(response_mask, sample_mask)
    student_leaves = (student_hidden, student_head.weight, student_head.bias)
    wants = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in student_leaves)
    terms, grads = _chunked_terms(
        student_hidden, teacher_hidden, response_ids, mask, student_head=student_head, teacher_head=teacher_head,
        chunk_size=chunk_size, wants=wants, weight_options=weight_options,
        term_options=dict(divergence=divergence, support=support, top_k=top_k, alpha=jsd_alpha,
                          temperature=temperature, tail="floored" if sdpo_compat else "exact"))
    loss, metrics = loss_from_terms(*terms, mask, **weight_options)
    if any(wants):
        loss = _PrecomputedGrads.apply(loss, *student_leaves, *grads)
    return loss, metrics


def _position_weights(student_tok: torch.Tensor, teacher_tok: torch.Tensor, mask: torch.Tensor,
                      weight_options: dict) -> torch.Tensor:
    """d loss / d per_token of `loss_from_terms`: [B, T], position n's entry exact once n's terms are filled in.

    The loss is linear in per_token with detached weights that depend on each position's own terms, so the
    derivative is taken at per_token = 0 and the not-yet-computed positions' placeholders touch no other entry.
    """
    leaf = torch.zeros(mask.shape, dtype=student_tok.dtype, device=mask.device, requires_grad=True)
    with torch.enable_grad():
        loss, _ = loss_from_terms(leaf, student_tok, teacher_tok, mask, **weight_options)
        return torch.autograd.grad(loss, leaf)[0]


def _chunked_terms(student_hidden, teacher_hidden, response_ids, mask, *, student_head: LMHead,
                   teacher_head: LMHead, chunk_size: int, wants: tuple[bool, bool, bool], weight_options: dict,
                   term_options: dict) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """The chunk loop of `opsd_loss_from_hidden`.

    Returns the terms (per_token, student and teacher token logps: three detached [B, T], 0 where masked) and
    the gradients of the loss (unit incoming gradient) to the student's hidden states [B, T, H], head weight
    and bias (None where `wants` is False).
    """
    n_positions = mask.numel()
    # Terms in the dtype `position_terms` computes in; masked positions keep 0 (the aggregate ignores them).
    dtype = torch.promote_types(torch.promote_types(student_hidden.dtype, teacher_hidden.dtype), torch.float32)
    per_token, student_tok, teacher_tok = (torch.zeros(n_positions, dtype=dtype, device=mask.device)
                                           for _ in range(3))
    hidden = student_hidden.detach().reshape(n_positions, -1)
    teacher = teacher_hidden.detach().reshape(n_positions, -1)
    token_ids = response_ids.reshape(n_positions)
    weight, bias = (None if t is None else t.detach() for t in (student_head.weight, student_head.bias))
    teacher_weight, teacher_bias = (None if t is None else t.detach() for t in (teacher_head.weight, teacher_head.bias))
    # A low-precision head's weight gradient is summed over chunks in float32: one rounding, as in one matmul.
    accumulate = torch.promote_types(weight.dtype, torch.float32)
    grad_hidden = torch.zeros_like(hidden) if wants[0] else None
    grad_weight = torch.zeros_like(weight, dtype=accumulate) if wants[1] else None
    grad_bias = torch.zeros_like(bias, dtype=accumulate) if wants[2] else None

    positions = mask.reshape(-1).nonzero().squeeze(-1)
    for start in range(0, len(positions), chunk_size):
        rows = positions[start:start + chunk_size]
        with torch.no_grad():
            logits = F.linear(hidden[rows], weight, bias)
            teacher_logits = F.linear(teacher[rows], teacher_weight, teacher_bias)
        with torch.set_grad_enabled(any(wants)):
            chunk_terms, student_tok[rows], teacher_tok[rows] = position_terms(
                logits.requires_grad_(any(wants)), teacher_logits, token_ids[rows], **term_options)
        per_token[rows] = chunk_terms.detach()
        del teacher_logits  # the chunk's backward needs only the student's side
        if not any(wants):
            continue
        position_weights = _position_weights(student_tok.view(mask.shape), teacher_tok.view(mask.shape), mask,
                                             weight_options).reshape(-1)[rows]
        with torch.enable_grad():
            (grad_logits,) = torch.autograd.grad(chunk_terms, logits, grad_outputs=position_weights.to(dtype))
        with torch.no_grad():
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:  # in place: no [V, H] temporary per chunk
                grad_weight.addmm_(grad_logits.T.to(accumulate), hidden[rows].to(accumulate))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(accumulate)
        del logits, chunk_terms, grad_logits  # before the next chunk's logits exist

    terms = tuple(t.view(mask.shape) for t in (per_token, student_tok, teacher_tok))
    return terms, (None if grad_hidden is None else grad_hidden.view(student_hidden.shape), grad_weight, grad_bias)


def token_logps_from_hidden(hidden: torch.Tensor, head: LMHead, token_ids: torch.Tensor, *, temperature: float,
                            chunk_size: int) -> torch.Tensor:
    """`token_logps` of the logits `hidden @ head.weight.T + head.bias`, chunk_size positions at a time.

    hidden: [B, T, H]; token_ids: [B, T]. Returns [B, T], detached (these log-probs only weigh the loss).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    ids = token_ids.reshape(-1)
    bias = None if head.bias is None else head.bias.detach()
    with torch.no_grad():
        parts = [token_logps(F.linear(flat[start:start + chunk_size], head.weight.detach(), bias),
                             ids[start:start + chunk_size], temperature=temperature)
                 for start in range(0, len(ids), chunk_size)]
    return torch.cat(parts).view(token_ids.shape)
