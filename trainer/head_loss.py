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
from trainer.losses import _position_terms, loss_from_terms, opsd_loss, token_logps
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


def _needs_grad(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad


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
                         top_k=top_k, jsd_alpha=jsd_alpha, temperature=temperature, **weight_options)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    mask = combine_masks(response_mask, sample_mask)
    n_rows, width = mask.shape
    term_options = dict(divergence=divergence, support=support, top_k=top_k, alpha=jsd_alpha, temperature=temperature)
    student_weight, student_bias = student_head.weight, student_head.bias
    wants = [torch.is_grad_enabled() and _needs_grad(t) for t in (student_hidden, student_weight, student_bias)]

    # The terms of every position, filled chunk by chunk; masked positions keep 0 (the aggregate ignores them).
    dtype = torch.promote_types(torch.promote_types(student_hidden.dtype, teacher_hidden.dtype), torch.float32)
    per_token, student_tok, teacher_tok = (torch.zeros(n_rows * width, dtype=dtype, device=mask.device)
                                           for _ in range(3))
    hidden = student_hidden.detach().reshape(n_rows * width, -1)
    teacher = teacher_hidden.detach().reshape(n_rows * width, -1)
    token_ids = response_ids.reshape(n_rows * width)
    weight, bias = student_weight.detach(), None if student_bias is None else student_bias.detach()
    # Low-precision heads sum their weight gradient over chunks in float32: one rounding, as in one matmul.
    grad_hidden = torch.zeros_like(hidden) if wants[0] else None
    grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if wants[1] else None
    grad_bias = torch.zeros_like(bias, dtype=grad_weight.dtype if wants[1] else torch.float32) if wants[2] else None

    positions = mask.reshape(-1).nonzero().squeeze(-1)
    for start in range(0, len(positions), chunk_size):
        rows = positions[start:start + chunk_size]
        with torch.no_grad():
            logits = F.linear(hidden[rows], weight, bias)
            teacher_logits = F.linear(teacher[rows], teacher_head.weight.detach(),
                                      None if teacher_head.bias is None else teacher_head.bias.detach())
        with torch.set_grad_enabled(any(wants)):
            logits.requires_grad_(any(wants))
            chunk_terms, chunk_student_tok, chunk_teacher_tok = _position_terms(
                logits, teacher_logits, token_ids[rows], **term_options)
        per_token[rows], student_tok[rows], teacher_tok[rows] = chunk_terms.detach(), chunk_student_tok, chunk_teacher_tok
        if not any(wants):
            continue
        # Each kept position's weight in the loss: d loss / d per_token, given its own (now known) terms.
        with torch.enable_grad():
            leaf = torch.zeros((n_rows, width), dtype=dtype, device=mask.device, requires_grad=True)
            weighted, _ = loss_from_terms(leaf, student_tok.view(n_rows, width), teacher_tok.view(n_rows, width),
                                          mask, **weight_options)
            (position_weights,) = torch.autograd.grad(weighted, leaf)
            (grad_logits,) = torch.autograd.grad(chunk_terms, logits,
                                                 grad_outputs=position_weights.reshape(-1)[rows].to(chunk_terms.dtype))
        with torch.no_grad():
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ hidden[rows]).to(grad_weight.dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(grad_bias.dtype)
        del logits, teacher_logits, chunk_terms, grad_logits  # before the next chunk's logits exist

    loss, metrics = loss_from_terms(per_token.view(n_rows, width), student_tok.view(n_rows, width),
                                    teacher_tok.view(n_rows, width), mask, **weight_options)
    if any(wants):
        loss = _PrecomputedGrads.apply(
            loss, student_hidden, student_weight, student_bias,
            None if grad_hidden is None else grad_hidden.view(student_hidden.shape), grad_weight, grad_bias)
    return loss, metrics


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
