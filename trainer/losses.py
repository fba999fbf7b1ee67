"""The OPSD losses of METHOD.md section 1 (steps 5-7), as pure tensor functions.

Conventions shared by every function here:
- B rollouts, T response positions, V vocabulary entries. Position t of a logits tensor [B, T, V] holds the
  logits that predict token t of the response (the caller has already shifted them by one).
- Both sides' logits are divided by the rollout `temperature` before any softmax, and computed in at least
  float32 (bf16/fp16 inputs are upcast; float64 stays float64).
- The teacher never receives a gradient: its logits are detached on entry, so it may be run under
  `torch.no_grad()` or not at all differentiably. Gradients flow only through the student.
- No logging, no devices, no distributed calls: functions return tensors, and `opsd_loss` returns
  `(loss, metrics)` with detached 0-dim metric tensors for the caller to log.
"""

from __future__ import annotations

import math

import torch

from trainer.aggregation import aggregate, combine_masks
from trainer.options import Aggregation, Divergence, DistributionDivergence, Support, Tail

# exp() of a log-ratio beyond this overflows in float32; the reference code clamps the same way.
_MAX_LOG_RATIO = 20.0
# The SDPO reference caps the log of the top-k mass at -1e-7, so its tail is never below 1 - exp(-1e-7).
_SDPO_MAX_LOG_TOP_MASS = -1e-7


def _scaled(logits: torch.Tensor, temperature: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits in `dtype` (default: at least float32), divided by the temperature. [..., V] -> [..., V]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return logits.to(dtype or torch.promote_types(logits.dtype, torch.float32)) / temperature


def _tail_logps(
    scaled: torch.Tensor, top_ids: torch.Tensor, log_normalizer: torch.Tensor, *, tail: Tail = "exact"
) -> torch.Tensor:
    """Log of the mass outside the top-k ids. scaled: [..., V]; top_ids: [..., k] with k < V;
    log_normalizer: [..., 1]. Returns [..., 1].

    - exact: logsumexp of the other logits minus the full logsumexp. Summing the tail directly, rather than
      taking log(1 - sum p_topk), is exact however little mass the tail holds: with log1p(-exp(.)) and a clamp,
      a student tail below the clamp (common at low entropy) is pinned there, which changes forward KL by tens
      of nats times the teacher's tail (reverse KL likewise when the teacher's tail is the tiny one). The cost
      is one masked copy of the logits per side (bounded by `chunk_size`).
    - floored: the SDPO reference's tail (lasgroup/SDPO, verl/trainer/ppo/core_algos.py, `add_tail` in
      `compute_self_distillation_loss`, lines 1112-1118): log(1 - exp(s)), s the logsumexp of the top-k
      log-probs capped at -1e-7. A tail below 1 - exp(-1e-7) (about 1e-7) is raised to it, and there the cap
      passes no gradient; the k + 1 categories then hold slightly more than mass 1.
    """
    if tail == "exact":
        outside = scaled.scatter(-1, top_ids, float("-inf"))
        return outside.logsumexp(-1, keepdim=True) - log_normalizer
    elif tail == "floored":
        log_top_mass = (scaled.gather(-1, top_ids) - log_normalizer).logsumexp(-1, keepdim=True)
        # expm1 keeps 1 - exp(s) accurate for s near 0, where the tail is small.
        return torch.log(-torch.expm1(log_top_mass.clamp(max=_SDPO_MAX_LOG_TOP_MASS)))
    else:
        raise ValueError(f"unknown tail {tail!r}")


def _divergence_over_categories(
    student_logps: torch.Tensor, teacher_logps: torch.Tensor, *, divergence: str, alpha: float
) -> torch.Tensor:
    """Divergence between two normalised distributions over the same C categories. [..., C] -> [...]."""
    if divergence == "reverse_kl":
        return (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)
    elif divergence == "forward_kl":
        return (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)
    elif divergence == "jsd":
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"jsd alpha must lie in [0, 1], got {alpha}")
        # The mixture form vanishes at both ends; alpha=0 and 1 are defined as its limits divided by
        # alpha and 1-alpha respectively, i.e. forward and reverse KL (the convention of GKD and the reference).
        if alpha == 0.0:
            return _divergence_over_categories(student_logps, teacher_logps, divergence="forward_kl", alpha=alpha)
        if alpha == 1.0:
            return _divergence_over_categories(student_logps, teacher_logps, divergence="reverse_kl", alpha=alpha)
        mixture_logps = torch.logsumexp(
            torch.stack([teacher_logps + math.log(alpha), student_logps + math.log(1.0 - alpha)]), dim=0
        )
        kl_teacher = (teacher_logps.exp() * (teacher_logps - mixture_logps)).sum(-1)
        kl_student = (student_logps.exp() * (student_logps - mixture_logps)).sum(-1)
        return alpha * kl_teacher + (1.0 - alpha) * kl_student
    else:
        raise ValueError(f"unknown divergence {divergence!r} (sampled_token is computed by sampled_token_loss)")


def _support_logps(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_lse: torch.Tensor,
    teacher_lse: torch.Tensor,
    *,
    support: str,
    top_k: int,
    tail: Tail = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' log-probs over the categories of `support` (`tail`: see `_tail_logps`).

    student, teacher: scaled logits [..., V]; student_lse, teacher_lse: their logsumexp [..., 1].
    Returns two [..., C].
    C = V for full (and for top-k supports with k >= V, where the tail is empty and the result is exactly
    the full divergence), k + 1 for topk_tail, k for topk_renorm. The top-k ids are the student's.
    """
    vocab = student.shape[-1]
    if support == "full" or (support in ("topk_tail", "topk_renorm") and top_k >= vocab):
        return student - student_lse, teacher - teacher_lse
    elif support in ("topk_tail", "topk_renorm"):
        if top_k < 1:
            raise ValueError(f"top_k must be positive, got {top_k}")
        ids = student.detach().topk(top_k, dim=-1).indices
        student_top = student.gather(-1, ids)
        teacher_top = teacher.gather(-1, ids)
        if support == "topk_renorm":
            return student_top.log_softmax(-1), teacher_top.log_softmax(-1)
        # Normalised by the full vocabulary, so the k ids keep their true mass and the tail holds the rest.
        student_logps = torch.cat([student_top - student_lse, _tail_logps(student, ids, student_lse, tail=tail)],
                                  dim=-1)
        teacher_logps = torch.cat([teacher_top - teacher_lse, _tail_logps(teacher, ids, teacher_lse, tail=tail)],
                                  dim=-1)
        return student_logps, teacher_logps
    else:
        raise ValueError(f"unknown support {support!r}")


def _gather_logps(scaled: torch.Tensor, token_ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Log-probs of token_ids without materialising a log_softmax. [B,T,V], [B,T], lse [B,T,1] -> [B,T]."""
    return (scaled.gather(-1, token_ids.unsqueeze(-1)) - lse).squeeze(-1)


def token_logps(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Log-probabilities of the taken tokens.

    logits: [B, T, V] (position t predicts token_ids[:, t]); token_ids: [B, T] int64.
    Returns [B, T] in at least float32: logits[token]/temperature - logsumexp(logits/temperature).
    """
    scaled = _scaled(logits, temperature)
    return _gather_logps(scaled, token_ids, scaled.logsumexp(-1, keepdim=True))


def position_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor | None,
    *,
    divergence: str,
    support: str,
    top_k: int,
    alpha: float,
    temperature: float,
    tail: Tail = "exact",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Everything one chunk of positions contributes: (per-token divergence, student and teacher token logps).

    [B, t, V], [B, t, V], [B, t] or None -> three [B, t] (token logps None when token_ids is None). For
    sampled_token the first output is the one-sample surrogate and token_ids are required. Only the first
    output carries a gradient; the token logps are returned detached (they feed weights and metrics). Each
    side's logsumexp over V is computed once and shared by its token log-probs and its support.
    """
    # A bf16 teacher beside a float32 student (or any mix) is compared in one common dtype.
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    student = _scaled(student_logits, temperature, dtype)
    teacher = _scaled(teacher_logits.detach(), temperature, dtype)
    student_lse = student.logsumexp(-1, keepdim=True)
    teacher_lse = teacher.logsumexp(-1, keepdim=True)
    student_tok = teacher_tok = None
    if token_ids is not None:
        student_tok = _gather_logps(student, token_ids, student_lse)
        teacher_tok = _gather_logps(teacher, token_ids, teacher_lse)
    if divergence == "sampled_token":
        if token_ids is None:
            raise ValueError("the sampled_token divergence needs the response token ids")
        per_token = sampled_token_loss(student_tok, teacher_tok)
    else:
        student_logps, teacher_logps = _support_logps(student, teacher, student_lse, teacher_lse,
                                                      support=support, top_k=top_k, tail=tail)
        per_token = _divergence_over_categories(student_logps, teacher_logps, divergence=divergence, alpha=alpha)
    if student_tok is not None:
        student_tok = student_tok.detach()
    return per_token, student_tok, teacher_tok


def _terms_by_window(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor | None,
    windows: list[slice],
    options: dict,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`position_terms` window by window along T, concatenated. Same shapes as `position_terms`."""
    parts = [
        position_terms(student_logits[:, w], teacher_logits[:, w], None if token_ids is None else token_ids[:, w],
                        **options)
        for w in windows
    ]
    per_token = torch.cat([p[0] for p in parts], dim=1)
    if token_ids is None:
        return per_token, None, None
    return per_token, torch.cat([p[1] for p in parts], dim=1), torch.cat([p[2] for p in parts], dim=1)


class _ChunkedTerms(torch.autograd.Function):
    """`position_terms` with memory bounded by one window of positions, forward and backward.

    The forward keeps no graph. The backward recomputes one window at a time with a graph and writes that
    window's gradient straight into a single [B, T, V] buffer: no [B, T, V] float32 intermediates live beyond
    one window, and no per-window full-size gradient is materialised (as slicing under autograd would).
    Outputs: per_token [B, T], and with token_ids also the (non-differentiable) student and teacher token
    logps [B, T].
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, token_ids, windows, options):
        per_token, student_tok, teacher_tok = _terms_by_window(student_logits, teacher_logits, token_ids, windows,
                                                               options)
        ctx.save_for_backward(student_logits, teacher_logits, token_ids)
        ctx.windows, ctx.options = windows, options
        if token_ids is None:
            return per_token
        ctx.mark_non_differentiable(student_tok, teacher_tok)
        return per_token, student_tok, teacher_tok

    @staticmethod
    def backward(ctx, grad_per_token, *_grad_token_logps):
        student_logits, teacher_logits, token_ids = ctx.saved_tensors
        grad = torch.empty_like(student_logits)
        for w in ctx.windows:
            with torch.enable_grad():
                part = student_logits[:, w].detach().requires_grad_(True)
                per_token, _, _ = position_terms(
                    part, teacher_logits[:, w], None if token_ids is None else token_ids[:, w], **ctx.options)
                grad[:, w] = torch.autograd.grad(per_token, part, grad_outputs=grad_per_token[:, w])[0]
        return grad, None, None, None, None


def _chunked_position_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor | None,
    *,
    chunk_size: int | None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`position_terms` over windows of at most chunk_size positions (None: all at once). Same outputs."""
    teacher_logits = teacher_logits.detach()
    n_positions = student_logits.shape[1]
    if chunk_size is None or chunk_size >= n_positions:
        return position_terms(student_logits, teacher_logits, token_ids, **options)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    windows = [slice(start, start + chunk_size) for start in range(0, n_positions, chunk_size)]
    if not (torch.is_grad_enabled() and student_logits.requires_grad):
        return _terms_by_window(student_logits, teacher_logits, token_ids, windows, options)
    outputs = _ChunkedTerms.apply(student_logits, teacher_logits, token_ids, windows, options)
    if token_ids is None:
        return outputs, None, None
    return outputs


def distillation_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: DistributionDivergence,
    support: Support,
    top_k: int,
    alpha: float,
    temperature: float,
    chunk_size: int | None = None,
    tail: Tail = "exact",
) -> torch.Tensor:
    """Per-position divergence between the student's and the teacher's next-token distributions.

    student_logits, teacher_logits: [B, T, V] (the teacher is detached). Returns [B, T] in at least float32.
    Both sides are softmaxed at `temperature`, then compared over the categories of `support`:
    - topk_tail: the student's top-k ids, each side normalised by its own full-vocabulary logsumexp, plus one
      tail bucket holding the remaining mass 1 - sum of the top-k probabilities on each side (summed directly
      over the other ids, in log space, so it stays exact when tiny): k + 1 categories. k >= V is the full
      vocabulary exactly (the tail is empty and dropped).
    - topk_renorm: the student's top-k ids, renormalised over those k on each side; no tail.
    - full: the whole vocabulary.
    With S the student's and Q the teacher's distribution over those categories:
    - reverse_kl = KL(S || Q) = sum S log(S / Q)  (the paper's setting)
    - forward_kl = KL(Q || S) = sum Q log(Q / S)
    - jsd, generalised with weight alpha (TRL's GKD convention): M = alpha Q + (1 - alpha) S,
      JSD = alpha KL(Q || M) + (1 - alpha) KL(S || M); alpha = 0.5 is the symmetric JSD. At the ends the
      mixture form vanishes, and alpha = 0 is defined as forward KL, alpha = 1 as reverse KL: the limits of
      JSD / alpha as alpha -> 0 and JSD / (1 - alpha) as alpha -> 1.
    chunk_size: compute at most this many positions at a time (see `opsd_loss`); the result is the same.
    tail: 'exact' as above; 'floored' is the SDPO reference's tail, never below about 1e-7 (`_tail_logps`).
    """
    per_token, _, _ = _chunked_position_terms(
        student_logits, teacher_logits, None, chunk_size=chunk_size,
        divergence=divergence, support=support, top_k=top_k, alpha=alpha, temperature=temperature, tail=tail,
    )
    return per_token


def sampled_token_loss(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    """One-sample reverse-KL surrogate: (student_logps - teacher_logps).detach() * student_logps.

    student_logps, teacher_logps: [B, T] log-probs of the sampled tokens (from `token_logps`). Returns [B, T].
    With tokens drawn from the student, the expected gradient of this surrogate equals the gradient of
    KL(student || teacher) (score-function estimator); its value is not the KL (the KL estimate is the
    detached log-ratio itself).
    """
    return (student_logps - teacher_logps).detach() * student_logps


def importance_weights(
    student_logps: torch.Tensor, old_logps: torch.Tensor, *, clip: float | None
) -> torch.Tensor:
    """Detached per-token ratio exp(student_logps - old_logps), clipped from above at `clip` (None: unclipped).

    student_logps, old_logps: [B, T]. Returns [B, T]. The log-ratio is clamped to [-20, 20] before exp so a
    stale or padded position cannot overflow. Used for the mini-batch ratio against the policy that sampled the
    batch, and (with trainer vs rollout-engine log-probs) for the optional rollout correction.
    """
    log_ratio = (student_logps.detach() - old_logps.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    return ratio if clip is None else ratio.clamp(max=clip)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached mean of values [B, T] over mask [B, T] (bool); 0 when nothing is kept."""
    values = values.detach()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp(min=1)


def opsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    sample_mask: torch.Tensor | None = None,
    *,
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
    chunk_size: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    sdpo_compat: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The OPSD loss of one (micro-)batch: divergence per response token, importance weight, masked aggregate.

    student_logits, teacher_logits: [B, T, V], position t predicting response_ids[:, t]; the teacher saw the
    privileged context, the student did not, and only the student gets a gradient. response_ids: [B, T] int64.
    response_mask: [B, T], nonzero on response tokens. sample_mask: [B] or None, 0 drops a rollout whose
    context added nothing. The option names are LossConfig's fields, so `**cfg.loss.model_dump()` fits.
    - divergence/support/top_k/jsd_alpha: see `distillation_divergence`; 'sampled_token' uses
      `sampled_token_loss` on the response tokens and ignores support and top_k.
    - old_logps [B, T]: log-probs of the response under the policy that sampled this batch (before this step's
      earlier mini-batches). With it and importance_ratio_clip set, each token's divergence is weighted by
      `importance_weights(student, old, clip=importance_ratio_clip)`; importance_ratio_clip None or old_logps
      None applies no ratio (None old_logps means the batch is on-policy, ratio 1).
    - rollout_logps [B, T]: the rollout engine's log-probs of the same tokens. With rollout_ratio_clip set,
      tokens are also weighted by exp(trainer - rollout) clipped at rollout_ratio_clip, where trainer is
      old_logps if given, else the current student's (detached).
    - chunk_size: compute at most this many positions at a time, in the forward and again in the backward, so
      the [B, chunk, V] float32 intermediates never exist for all T at once; same loss and gradient. The
      backward then recomputes the forward (about 1.5-2x the loss's compute); use it for long responses.
    - normalizer: passed to `aggregate` (e.g. the mini-batch's token count under gradient accumulation).
    - sdpo_compat: the topk_tail tail as the SDPO reference computes it ('floored' in `_tail_logps`) instead of
      the exact one. Its other conventions are the caller's: `LossConfig` sets rollout_ratio_clip to 2 and
      `aggregation.micro_batch_normalizers` gives each micro-batch's normalizer.
    Returns (loss: 0-dim tensor, metrics: detached 0-dim tensors): divergence (mean over kept tokens of the
    divergence; for sampled_token the log-ratio, whose expectation is the reverse KL), importance_weight_mean,
    importance_clip_fraction, rollout_weight_mean, rollout_clip_fraction (over kept tokens; 1 and 0 when not
    applied), valid_tokens.
    """
    mask = combine_masks(response_mask, sample_mask)
    per_token, student_tok, teacher_tok = _chunked_position_terms(
        student_logits, teacher_logits, response_ids, chunk_size=chunk_size,
        divergence=divergence, support=support, top_k=top_k, alpha=jsd_alpha, temperature=temperature,
        tail="floored" if sdpo_compat else "exact",
    )
    return loss_from_terms(per_token, student_tok, teacher_tok, mask, divergence=divergence, aggregation=aggregation,
                           importance_ratio_clip=importance_ratio_clip, rollout_ratio_clip=rollout_ratio_clip,
                           old_logps=old_logps, rollout_logps=rollout_logps, normalizer=normalizer)


def loss_from_terms(
    per_token: torch.Tensor,
    student_tok: torch.Tensor,
    teacher_tok: torch.Tensor,
    mask: torch.Tensor,
    *,
    divergence: Divergence,
    aggregation: Aggregation,
    importance_ratio_clip: float | None,
    rollout_ratio_clip: float | None,
    old_logps: torch.Tensor | None,
    rollout_logps: torch.Tensor | None,
    normalizer: float | torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The rest of `opsd_loss` once each position's terms are known: weights, masked aggregate, metrics.

    per_token: [B, T], the divergence (or sampled_token surrogate) per position, the only input with a
    gradient; student_tok, teacher_tok: [B, T] detached token log-probs; mask: [B, T] bool from
    `combine_masks`. Options and returns as in `opsd_loss`. A position's weight depends on that position's
    terms alone (trainer/head_loss.py relies on it to weight one chunk of positions at a time).
    """
    divergence_values = (student_tok - teacher_tok) if divergence == "sampled_token" else per_token

    ones = torch.ones_like(per_token, dtype=per_token.dtype)
    weights = ones
    ratio_weights, ratio_clipped = ones, torch.zeros_like(mask)
    if old_logps is not None and importance_ratio_clip is not None:
        ratio_weights = importance_weights(student_tok, old_logps, clip=importance_ratio_clip)
        ratio_clipped = (student_tok - old_logps) > math.log(importance_ratio_clip)
        weights = weights * ratio_weights
    rollout_weights, rollout_clipped = ones, torch.zeros_like(mask)
    if rollout_logps is not None and rollout_ratio_clip is not None:
        trainer_logps = old_logps if old_logps is not None else student_tok
        rollout_weights = importance_weights(trainer_logps, rollout_logps, clip=rollout_ratio_clip)
        rollout_clipped = (trainer_logps - rollout_logps) > math.log(rollout_ratio_clip)
        weights = weights * rollout_weights

    loss = aggregate(per_token * weights, mask, mode=aggregation, normalizer=normalizer)
    metrics = {
        "divergence": _masked_mean(divergence_values, mask),
        "importance_weight_mean": _masked_mean(ratio_weights, mask),
        "importance_clip_fraction": _masked_mean(ratio_clipped.to(per_token.dtype), mask),
        "rollout_weight_mean": _masked_mean(rollout_weights, mask),
        "rollout_clip_fraction": _masked_mean(rollout_clipped.to(per_token.dtype), mask),
        "valid_tokens": mask.sum().detach(),
    }
    return loss, metrics
