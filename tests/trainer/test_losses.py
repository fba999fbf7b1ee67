"""The OPSD losses against independent computations written here: explicit softmax, categories built by hand
with Python loops, hand-computed numbers, and invariances (k = V is full KL, alpha = 0 is forward KL,
chunked equals plain, masked positions are inert); `sdpo_compat` against a port of the SDPO reference's loss."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.aggregation import aggregate, combine_masks, micro_batch_normalizers, minibatch_normalizer
from trainer.config import LossConfig
from trainer.losses import (
    distillation_divergence,
    importance_weights,
    opsd_loss,
    sampled_token_loss,
    token_logps,
)

F64 = torch.float64
DIVERGENCES = [("reverse_kl", 0.0), ("forward_kl", 0.0), ("jsd", 0.3)]
SUPPORTS = ["topk_tail", "topk_renorm", "full"]


# ---------------------------------------------------------------- independent reference, one position at a time
def ref_categories(student_row, teacher_row, *, support, top_k, temperature):
    """Probabilities of both sides over the support's categories, built element by element."""
    vocab = len(student_row)
    p = [torch.exp(student_row[i] / temperature) for i in range(vocab)]
    q = [torch.exp(teacher_row[i] / temperature) for i in range(vocab)]
    p_sum, q_sum = sum(p), sum(q)
    p = [x / p_sum for x in p]
    q = [x / q_sum for x in q]
    if support == "full" or top_k >= vocab:
        groups = [[i] for i in range(vocab)]
    else:
        top = sorted(range(vocab), key=lambda i: -float(student_row[i].detach()))[:top_k]
        groups = [[i] for i in top]
        if support == "topk_tail":
            groups.append([i for i in range(vocab) if i not in top])
    student_cats = [sum(p[i] for i in g) for g in groups]
    teacher_cats = [sum(q[i] for i in g) for g in groups]
    if support == "topk_renorm" and top_k < vocab:
        s_total, t_total = sum(student_cats), sum(teacher_cats)
        student_cats = [x / s_total for x in student_cats]
        teacher_cats = [x / t_total for x in teacher_cats]
    return student_cats, teacher_cats


def ref_kl(a, b):
    return sum(x * torch.log(x / y) for x, y in zip(a, b))


def ref_divergence(student_cats, teacher_cats, *, divergence, alpha):
    if divergence == "reverse_kl" or (divergence == "jsd" and alpha == 1.0):
        return ref_kl(student_cats, teacher_cats)
    if divergence == "forward_kl" or (divergence == "jsd" and alpha == 0.0):
        return ref_kl(teacher_cats, student_cats)
    mixture = [alpha * q + (1 - alpha) * p for p, q in zip(student_cats, teacher_cats)]
    return alpha * ref_kl(teacher_cats, mixture) + (1 - alpha) * ref_kl(student_cats, mixture)


def ref_per_token(student_logits, teacher_logits, *, divergence, support, top_k, alpha, temperature):
    rows = []
    for b in range(student_logits.shape[0]):
        row = []
        for t in range(student_logits.shape[1]):
            s_cats, t_cats = ref_categories(student_logits[b, t], teacher_logits[b, t], support=support,
                                            top_k=top_k, temperature=temperature)
            row.append(ref_divergence(s_cats, t_cats, divergence=divergence, alpha=alpha))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def make_logits(*shape, seed=0, dtype=F64, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=dtype) * scale)


def options(**overrides):
    base = dict(divergence="reverse_kl", support="topk_tail", top_k=3, jsd_alpha=0.5, aggregation="token_mean",
                importance_ratio_clip=2.0, rollout_ratio_clip=None, temperature=1.0)
    base.update(overrides)
    return base


# ---------------------------------------------------------------- divergences: values and gradients
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_divergence_values_and_gradients_match_explicit_computation(divergence, alpha, support):
    student = make_logits(2, 3, 7, seed=1).requires_grad_(True)
    teacher = make_logits(2, 3, 7, seed=2)
    upstream = make_logits(2, 3, seed=3)  # a generic cotangent, so no gradient component can cancel out
    kwargs = dict(divergence=divergence, support=support, top_k=3, alpha=alpha, temperature=0.7)

    got = distillation_divergence(student, teacher, **kwargs)
    want = ref_per_token(student, teacher, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    (got_grad,) = torch.autograd.grad((got * upstream).sum(), student)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), student)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_divergence_gradients_match_finite_differences(divergence, alpha, support):
    student = make_logits(1, 2, 6, seed=4).requires_grad_(True)
    teacher = make_logits(1, 2, 6, seed=5)

    for chunk_size in (None, 1):  # the chunked path has its own hand-written backward
        def fn(s):
            return distillation_divergence(s, teacher, divergence=divergence, support=support, top_k=2,
                                           alpha=alpha, temperature=1.3, chunk_size=chunk_size)

        assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("support", ["topk_tail", "topk_renorm"])
@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_k_covering_the_vocabulary_is_exactly_the_full_divergence(divergence, alpha, support):
    student = make_logits(2, 4, 6, seed=6)
    teacher = make_logits(2, 4, 6, seed=7)
    full = distillation_divergence(student, teacher, divergence=divergence, support="full", top_k=1,
                                   alpha=alpha, temperature=1.0)
    for top_k in (6, 50):
        topk = distillation_divergence(student, teacher, divergence=divergence, support=support, top_k=top_k,
                                       alpha=alpha, temperature=1.0)
        assert torch.equal(topk, full)
    # k = V - 1: the tail bucket holds exactly one id, so topk_tail is again the full divergence (up to
    # rounding of 1 - sum); topk_renorm drops that id and must match the explicit renormalised reference.
    near = distillation_divergence(student, teacher, divergence=divergence, support=support, top_k=5,
                                   alpha=alpha, temperature=1.0)
    if support == "topk_tail":
        torch.testing.assert_close(near, full, rtol=1e-10, atol=1e-12)
    else:
        want = ref_per_token(student, teacher, divergence=divergence, support=support, top_k=5, alpha=alpha,
                             temperature=1.0)
        torch.testing.assert_close(near, want, rtol=1e-10, atol=1e-12)


def test_top2_with_tail_on_a_hand_made_five_token_distribution():
    p = [0.4, 0.3, 0.15, 0.1, 0.05]  # student: top-2 ids are 0 and 1, tail mass 0.3
    q = [0.1, 0.2, 0.3, 0.25, 0.15]  # teacher on those ids: 0.1 and 0.2, tail mass 0.7
    student = torch.tensor(p, dtype=F64).log().view(1, 1, 5)
    teacher = torch.tensor(q, dtype=F64).log().view(1, 1, 5) + 3.0  # a shift must not matter

    def run(divergence, support, alpha=0.5):
        return distillation_divergence(student, teacher, divergence=divergence, support=support, top_k=2,
                                       alpha=alpha, temperature=1.0).item()

    assert run("reverse_kl", "topk_tail") == pytest.approx(
        0.4 * math.log(0.4 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.3 * math.log(0.3 / 0.7), rel=1e-12)
    assert run("forward_kl", "topk_tail") == pytest.approx(
        0.1 * math.log(0.1 / 0.4) + 0.2 * math.log(0.2 / 0.3) + 0.7 * math.log(0.7 / 0.3), rel=1e-12)
    # renormalised: student (4/7, 3/7), teacher (1/3, 2/3)
    assert run("reverse_kl", "topk_renorm") == pytest.approx(
        4 / 7 * math.log((4 / 7) / (1 / 3)) + 3 / 7 * math.log((3 / 7) / (2 / 3)), rel=1e-12)
    # symmetric JSD over (0.4, 0.3, 0.3) and (0.1, 0.2, 0.7): mixture (0.25, 0.25, 0.5)
    assert run("jsd", "topk_tail", alpha=0.5) == pytest.approx(
        0.5 * (0.1 * math.log(0.1 / 0.25) + 0.2 * math.log(0.2 / 0.25) + 0.7 * math.log(0.7 / 0.5))
        + 0.5 * (0.4 * math.log(0.4 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.3 * math.log(0.3 / 0.5)),
        rel=1e-12)


@pytest.mark.parametrize("support", SUPPORTS)
def test_jsd_endpoints_are_forward_and_reverse_kl(support):
    student = make_logits(2, 3, 8, seed=8)
    teacher = make_logits(2, 3, 8, seed=9)

    def run(divergence, alpha):
        return distillation_divergence(student, teacher, divergence=divergence, support=support, top_k=3,
                                       alpha=alpha, temperature=1.0)

    forward, reverse = run("forward_kl", 0.0), run("reverse_kl", 0.0)
    assert not torch.allclose(forward, reverse)
    assert torch.equal(run("jsd", 0.0), forward)
    assert torch.equal(run("jsd", 1.0), reverse)
    # the endpoints are the limits of the mixture form divided by its weight
    # (to first order in the weight; 1e-7 keeps the second-order term and float64 rounding below 1e-3)
    small = 1e-7
    torch.testing.assert_close(run("jsd", small) / small, forward, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(run("jsd", 1 - small) / small, reverse, rtol=1e-3, atol=1e-9)


def test_symmetric_jsd_is_symmetric_and_bounded_by_log2():
    student = make_logits(2, 3, 8, seed=10)
    teacher = make_logits(2, 3, 8, seed=11)
    kwargs = dict(divergence="jsd", support="full", top_k=1, alpha=0.5, temperature=1.0)
    a = distillation_divergence(student, teacher, **kwargs)
    b = distillation_divergence(teacher, student, **kwargs)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert bool((a > 0).all()) and bool((a <= math.log(2)).all())


@pytest.mark.parametrize("support", SUPPORTS)
def test_temperature_divides_both_sides_logits(support):
    student = make_logits(2, 3, 7, seed=12)
    teacher = make_logits(2, 3, 7, seed=13)
    hot = distillation_divergence(student, teacher, divergence="reverse_kl", support=support, top_k=3, alpha=0.5,
                                  temperature=2.5)
    pre_divided = distillation_divergence(student / 2.5, teacher / 2.5, divergence="reverse_kl", support=support,
                                          top_k=3, alpha=0.5, temperature=1.0)
    torch.testing.assert_close(hot, pre_divided, rtol=1e-12, atol=1e-14)
    cold = distillation_divergence(student, teacher, divergence="reverse_kl", support=support, top_k=3, alpha=0.5,
                                   temperature=1.0)
    assert not torch.allclose(hot, cold)


def test_tail_holding_almost_no_mass_stays_finite():
    # The student's top-2 holds all but ~1e-40 of its mass: the tail is clamped, not log(0).
    student = torch.tensor([[[60.0, 59.0, -40.0, -41.0, -42.0]]], dtype=F64, requires_grad=True)
    teacher = make_logits(1, 1, 5, seed=14)
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        got = distillation_divergence(student, teacher, divergence=divergence, support="topk_tail", top_k=2,
                                      alpha=0.5, temperature=1.0)
        want = ref_per_token(student.detach(), teacher, divergence=divergence, support="topk_tail", top_k=2,
                             alpha=0.5, temperature=1.0)
        (grad,) = torch.autograd.grad(got.sum(), student)
        assert torch.isfinite(got).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- token log-probs and the sampled-token estimator
def test_token_logps_are_log_softmax_at_the_taken_tokens():
    logits = make_logits(2, 3, 5, seed=15)
    ids = torch.tensor([[0, 4, 2], [1, 1, 3]])
    got = token_logps(logits, ids, temperature=0.5)
    for b in range(2):
        for t in range(3):
            z = [math.exp(float(v) / 0.5) for v in logits[b, t]]
            assert float(got[b, t]) == pytest.approx(math.log(z[int(ids[b, t])] / sum(z)), rel=1e-12)


def test_sampled_token_loss_value_and_gradient_by_hand():
    student = torch.tensor([[-0.5, -2.0]], dtype=F64, requires_grad=True)
    teacher = torch.tensor([[-1.0, -1.5]], dtype=F64, requires_grad=True)
    loss = sampled_token_loss(student, teacher)
    torch.testing.assert_close(loss.detach(), torch.tensor([[0.5 * -0.5, -0.5 * -2.0]], dtype=F64))
    student_grad, teacher_grad = torch.autograd.grad(loss.sum(), [student, teacher], allow_unused=True)
    torch.testing.assert_close(student_grad, torch.tensor([[0.5, -0.5]], dtype=F64))  # the detached log-ratio
    assert teacher_grad is None


def test_opsd_loss_with_the_sampled_token_estimator_by_hand():
    student = make_logits(2, 3, 5, seed=45)
    teacher = make_logits(2, 3, 5, seed=46)
    ids = torch.tensor([[4, 0, 2], [1, 3, 3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, metrics = opsd_loss(student, teacher, ids, mask, **options(divergence="sampled_token", temperature=0.6))
    surrogate, log_ratio = [], []
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                s_logp = float(student[b, t, ids[b, t]] / 0.6 - torch.log(torch.exp(student[b, t] / 0.6).sum()))
                t_logp = float(teacher[b, t, ids[b, t]] / 0.6 - torch.log(torch.exp(teacher[b, t] / 0.6).sum()))
                surrogate.append((s_logp - t_logp) * s_logp)
                log_ratio.append(s_logp - t_logp)
    assert loss.item() == pytest.approx(sum(surrogate) / 5, rel=1e-10)
    assert metrics["divergence"].item() == pytest.approx(sum(log_ratio) / 5, rel=1e-10)


def test_sampled_token_expected_gradient_is_the_reverse_kl_gradient():
    vocab = 5
    student = make_logits(1, 1, vocab, seed=16).requires_grad_(True)
    teacher = make_logits(1, 1, vocab, seed=17)
    probs = torch.softmax(student.detach()[0, 0] / 0.8, dim=-1)
    expected = torch.zeros_like(student)
    for token in range(vocab):
        ids = torch.tensor([[token]])
        surrogate = sampled_token_loss(token_logps(student, ids, temperature=0.8),
                                       token_logps(teacher, ids, temperature=0.8))
        (grad,) = torch.autograd.grad(surrogate.sum(), student)
        expected += probs[token] * grad
    exact = distillation_divergence(student, teacher, divergence="reverse_kl", support="full", top_k=1, alpha=0.5,
                                    temperature=0.8)
    (exact_grad,) = torch.autograd.grad(exact.sum(), student)
    torch.testing.assert_close(expected, exact_grad, rtol=1e-10, atol=1e-12)
    # and the expected log-ratio is the reverse KL itself (the metric reported for sampled_token)
    log_ratio = [float(token_logps(student.detach(), torch.tensor([[v]]), temperature=0.8)
                       - token_logps(teacher, torch.tensor([[v]]), temperature=0.8)) for v in range(vocab)]
    assert sum(float(probs[v]) * log_ratio[v] for v in range(vocab)) == pytest.approx(exact.item(), rel=1e-10)


# ---------------------------------------------------------------- importance weights
def test_importance_weights_by_hand():
    student = torch.tensor([[0.0, math.log(3.0), -1.0, 50.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[math.log(2.0), 0.0, -1.5, -50.0]], dtype=F64)
    clipped = importance_weights(student, old, clip=2.0)
    assert not clipped.requires_grad
    torch.testing.assert_close(clipped, torch.tensor([[0.5, 2.0, math.exp(0.5), 2.0]], dtype=F64))
    unclipped = importance_weights(student, old, clip=None)
    torch.testing.assert_close(unclipped, torch.tensor([[0.5, 3.0, math.exp(0.5), math.exp(20.0)]], dtype=F64))


def test_opsd_loss_weights_each_token_by_the_clipped_ratio():
    student = make_logits(2, 3, 6, seed=18).requires_grad_(True)
    teacher = make_logits(2, 3, 6, seed=19)
    ids = torch.tensor([[1, 2, 3], [0, 5, 4]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    current = token_logps(student, ids, temperature=1.0).detach()
    log_ratio = torch.tensor([[0.3, -0.2, 1.5], [0.9, -3.0, 2.0]], dtype=F64)  # 1.5 and 0.9 exceed log(2)
    old = current - log_ratio
    rollout = old - torch.tensor([[0.0, 0.1, 0.0], [-0.2, 0.0, 0.5]], dtype=F64)

    loss, metrics = opsd_loss(student, teacher, ids, mask, old_logps=old, rollout_logps=rollout,
                              **options(importance_ratio_clip=2.0, rollout_ratio_clip=1.05))
    per_token = ref_per_token(student.detach(), teacher, divergence="reverse_kl", support="topk_tail", top_k=3,
                              alpha=0.5, temperature=1.0)
    kept = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    is_w = {pos: min(math.exp(float(log_ratio[pos])), 2.0) for pos in kept}
    rollout_delta = {(0, 0): 0.0, (0, 1): 0.1, (0, 2): 0.0, (1, 0): -0.2, (1, 1): 0.0}
    ro_w = {pos: min(math.exp(rollout_delta[pos]), 1.05) for pos in kept}
    want = sum(is_w[pos] * ro_w[pos] * float(per_token[pos]) for pos in kept) / len(kept)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert metrics["importance_weight_mean"].item() == pytest.approx(sum(is_w.values()) / 5, rel=1e-10)
    assert metrics["importance_clip_fraction"].item() == pytest.approx(2 / 5)
    assert metrics["rollout_weight_mean"].item() == pytest.approx(sum(ro_w.values()) / 5, rel=1e-10)
    assert metrics["rollout_clip_fraction"].item() == pytest.approx(1 / 5)
    assert metrics["valid_tokens"].item() == 5
    assert metrics["divergence"].item() == pytest.approx(sum(float(per_token[p]) for p in kept) / 5, rel=1e-10)

    # importance_ratio_clip None applies no ratio at all
    unweighted, metrics = opsd_loss(student, teacher, ids, mask, old_logps=old, **options(importance_ratio_clip=None))
    assert unweighted.item() == pytest.approx(sum(float(per_token[p]) for p in kept) / 5, rel=1e-10)
    assert metrics["importance_weight_mean"].item() == 1.0


# ---------------------------------------------------------------- masking and aggregation
def test_minibatch_normalizer_by_hand():
    # The kept rollouts of one mini-batch, over all ranks, have 3, 0 and 5 response tokens.
    assert minibatch_normalizer([3, 0, 5], mode="token_mean") == 8.0
    assert minibatch_normalizer([3, 0, 5], mode="seq_mean_token_sum") == 2.0  # the empty response is no sequence
    assert minibatch_normalizer([3, 0, 5], mode="seq_mean_token_mean") == 2.0
    assert minibatch_normalizer([3, 0, 5], mode="token_mean", world_size=2) == 4.0
    assert minibatch_normalizer([], mode="token_mean") == 1.0  # nothing kept: the loss is 0, not 0/0
    assert minibatch_normalizer([0], mode="seq_mean_token_mean", world_size=2) == 0.5
    with pytest.raises(ValueError):
        minibatch_normalizer([1], mode="mean")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_micro_batches_on_two_ranks_add_up_to_the_minibatch(mode):
    """Each rank sums its micro-batches' losses and DeepSpeed averages the ranks: the mini-batch's aggregate."""
    per_token = make_logits(6, 4, seed=7)
    lengths = [4, 2, 0, 3, 1, 4]
    mask = torch.tensor([[t < n for t in range(4)] for n in lengths])
    kept = torch.tensor([True, True, True, False, True, True])
    whole = aggregate(per_token, combine_masks(mask, kept), mode=mode)
    normalizer = minibatch_normalizer([n for n, k in zip(lengths, kept) if k], mode=mode, world_size=2)
    rank_losses = [
        sum(aggregate(per_token[rows], combine_masks(mask[rows], kept[rows]), mode=mode, normalizer=normalizer)
            for rows in micro_batches)
        for micro_batches in ([[0, 1], [2]], [[3, 4], [5]])]
    assert float(sum(rank_losses) / 2) == pytest.approx(float(whole), rel=1e-12)


def test_aggregation_modes_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert aggregate(per_token, mask, mode="token_mean").item() == pytest.approx((1 + 2 + 4) / 3)
    assert aggregate(per_token, mask, mode="seq_mean_token_sum").item() == pytest.approx((3 + 4) / 2)
    assert aggregate(per_token, mask, mode="seq_mean_token_mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate(per_token, mask, mode="token_mean", normalizer=10).item() == pytest.approx(7 / 10)
    assert aggregate(per_token, mask, mode="seq_mean_token_sum", normalizer=4).item() == pytest.approx(7 / 4)
    with pytest.raises(ValueError):
        aggregate(per_token, mask, mode="token_sum")


def test_micro_batches_with_the_mini_batch_normalizer_add_up_to_the_mini_batch_loss():
    per_token = make_logits(4, 5, seed=20)
    mask = make_logits(4, 5, seed=21) > 0
    whole = aggregate(per_token, mask, mode="token_mean")
    halves = sum(aggregate(per_token[i:i + 2], mask[i:i + 2], mode="token_mean", normalizer=mask.sum())
                 for i in (0, 2))
    torch.testing.assert_close(halves, whole)


def test_masked_garbage_never_reaches_the_value():
    per_token = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], dtype=F64)
    mask = torch.tensor([[True, False], [False, True]])
    for mode in ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean"):
        assert aggregate(per_token, mask, mode=mode).item() == pytest.approx(1.5)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "sampled_token"])
def test_masked_positions_change_neither_loss_nor_gradient(divergence, aggregation):
    student = make_logits(2, 4, 6, seed=22)
    teacher = make_logits(2, 4, 6, seed=23)
    ids = torch.tensor([[1, 2, 3, 0], [0, 5, 4, 4]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]])
    opts = options(divergence=divergence, aggregation=aggregation)

    def run(s, t, token_ids):
        s = s.clone().requires_grad_(True)
        loss, _ = opsd_loss(s, t, token_ids, mask, **opts)
        (grad,) = torch.autograd.grad(loss, s)
        return loss, grad

    loss, grad = run(student, teacher, ids)
    masked = ~mask.bool()
    student2, teacher2, ids2 = student.clone(), teacher.clone(), ids.clone()
    student2[masked] = make_logits(int(masked.sum()), 6, seed=24, scale=30.0)
    teacher2[masked] = make_logits(int(masked.sum()), 6, seed=25, scale=30.0)
    ids2[masked] = 3
    loss2, grad2 = run(student2, teacher2, ids2)
    assert loss2.item() == loss.item()
    torch.testing.assert_close(grad2, grad, rtol=0, atol=0)
    assert bool((grad[masked] == 0).all()) and bool((grad[~masked] != 0).any())


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_sample_mask_zero_removes_the_sample(aggregation):
    student = make_logits(3, 4, 6, seed=26).requires_grad_(True)
    teacher = make_logits(3, 4, 6, seed=27)
    ids = torch.tensor([[1, 2, 3, 0], [0, 5, 4, 4], [2, 2, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]])
    opts = options(aggregation=aggregation)
    loss, metrics = opsd_loss(student, teacher, ids, mask, torch.tensor([1.0, 0.0, 1.0]), **opts)
    keep = [0, 2]
    loss_without, _ = opsd_loss(student[keep], teacher[keep], ids[keep], mask[keep], **opts)
    torch.testing.assert_close(loss, loss_without)
    (grad,) = torch.autograd.grad(loss, student)
    assert bool((grad[1] == 0).all())
    assert metrics["valid_tokens"].item() == 6


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_all_masked_gives_zero_with_a_gradient_path_and_no_nan(aggregation):
    student = make_logits(2, 3, 5, seed=28).requires_grad_(True)
    teacher = make_logits(2, 3, 5, seed=29)
    ids = torch.zeros(2, 3, dtype=torch.long)
    for response_mask, sample_mask in ((torch.zeros(2, 3), None), (torch.ones(2, 3), torch.zeros(2))):
        loss, metrics = opsd_loss(student, teacher, ids, response_mask, sample_mask,
                                  old_logps=torch.zeros(2, 3, dtype=F64), **options(aggregation=aggregation))
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.equal(grad, torch.zeros_like(grad))
        assert all(torch.isfinite(v).all() for v in metrics.values())
        assert metrics["valid_tokens"].item() == 0


def test_combine_masks_rejects_a_sample_mask_of_the_wrong_length():
    with pytest.raises(ValueError):
        combine_masks(torch.ones(2, 3), torch.ones(3))


# ---------------------------------------------------------------- chunking, teacher gradient, config, dtypes
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "sampled_token"])
def test_chunked_equals_plain(divergence, support):
    student = make_logits(2, 7, 9, seed=30)
    teacher = make_logits(2, 7, 9, seed=31)
    ids = torch.randint(0, 9, (2, 7), generator=torch.Generator().manual_seed(32))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
    old = token_logps(student, ids, temperature=0.9) - 0.4 * make_logits(2, 7, seed=33)
    opts = options(divergence=divergence, support=support, temperature=0.9)

    def run(chunk_size):
        s = student.clone().requires_grad_(True)
        loss, metrics = opsd_loss(s, teacher, ids, mask, old_logps=old, chunk_size=chunk_size, **opts)
        (grad,) = torch.autograd.grad(loss, s)
        return loss, grad, metrics

    plain_loss, plain_grad, plain_metrics = run(None)
    for chunk_size in (1, 3, 7):
        loss, grad, metrics = run(chunk_size)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, plain_grad, rtol=1e-12, atol=1e-14)
        for key in plain_metrics:
            torch.testing.assert_close(metrics[key], plain_metrics[key], rtol=1e-12, atol=1e-14)
    if divergence != "sampled_token":
        s = student.clone().requires_grad_(True)
        per_token = distillation_divergence(s, teacher, divergence=divergence, support=support, top_k=3,
                                            alpha=0.5, temperature=0.9, chunk_size=2)
        want = distillation_divergence(student, teacher, divergence=divergence, support=support, top_k=3,
                                       alpha=0.5, temperature=0.9)
        torch.testing.assert_close(per_token, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "sampled_token"])
def test_no_gradient_reaches_the_teacher(divergence, chunk_size):
    student = make_logits(2, 4, 6, seed=34).requires_grad_(True)
    teacher = make_logits(2, 4, 6, seed=35).requires_grad_(True)
    ids = torch.tensor([[1, 2, 3, 0], [0, 5, 4, 4]])
    loss, _ = opsd_loss(student, teacher, ids, torch.ones(2, 4), chunk_size=chunk_size,
                        **options(divergence=divergence))
    student_grad, teacher_grad = torch.autograd.grad(loss, [student, teacher], allow_unused=True)
    assert teacher_grad is None
    assert student_grad is not None and bool((student_grad != 0).any())


def test_option_names_are_the_loss_config_fields():
    cfg = LossConfig(top_k=4, divergence="jsd", jsd_alpha=0.25, aggregation="seq_mean_token_mean")
    student = make_logits(2, 3, 10, seed=36)
    teacher = make_logits(2, 3, 10, seed=37)
    ids = torch.tensor([[1, 2, 3], [0, 5, 4]])
    mask = torch.ones(2, 3)
    from_config, _ = opsd_loss(student, teacher, ids, mask, **cfg.model_dump(), temperature=1.0)
    per_token = ref_per_token(student, teacher, divergence="jsd", support="topk_tail", top_k=4, alpha=0.25,
                              temperature=1.0)
    assert from_config.item() == pytest.approx(per_token.mean(dim=1).mean().item(), rel=1e-10)


def test_bf16_inputs_are_computed_in_float32():
    student32 = make_logits(2, 5, 40, seed=38, dtype=torch.float32)
    teacher32 = make_logits(2, 5, 40, seed=39, dtype=torch.float32)
    student16 = student32.bfloat16().requires_grad_(True)
    teacher16 = teacher32.bfloat16()
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(40))
    for divergence in ("reverse_kl", "jsd", "sampled_token"):
        loss, metrics = opsd_loss(student16, teacher16, ids, torch.ones(2, 5),
                                  **options(divergence=divergence, top_k=8, temperature=0.7), chunk_size=2)
        assert loss.dtype == torch.float32 and metrics["divergence"].dtype == torch.float32
        # the same bf16 values, upcast by hand, give the same float32 result
        want, _ = opsd_loss(student16.detach().float(), teacher16.float(), ids, torch.ones(2, 5),
                            **options(divergence=divergence, top_k=8, temperature=0.7))
        torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-7)
        (grad,) = torch.autograd.grad(loss, student16)
        assert grad.dtype == torch.bfloat16 and bool(torch.isfinite(grad.float()).all())
    assert token_logps(student16, ids, temperature=1.0).dtype == torch.float32


def test_a_bf16_teacher_beside_a_float32_student_is_compared_in_float32():
    student = make_logits(2, 3, 12, seed=43, dtype=torch.float32)
    teacher16 = make_logits(2, 3, 12, seed=44, dtype=torch.float32).bfloat16()
    for chunk_size in (None, 2):
        got = distillation_divergence(student, teacher16, divergence="jsd", support="topk_tail", top_k=4, alpha=0.5,
                                      temperature=1.0, chunk_size=chunk_size)
        want = ref_per_token(student.double(), teacher16.double(), divergence="jsd", support="topk_tail", top_k=4,
                             alpha=0.5, temperature=1.0)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_bad_options_raise():
    student = make_logits(1, 2, 5, seed=41)
    teacher = make_logits(1, 2, 5, seed=42)
    base = dict(divergence="reverse_kl", support="topk_tail", top_k=2, alpha=0.5, temperature=1.0)
    for bad in (dict(divergence="sampled_token"), dict(divergence="kl"), dict(support="topk"),
                dict(divergence="jsd", alpha=1.5), dict(temperature=0.0), dict(chunk_size=0)):
        with pytest.raises(ValueError):
            distillation_divergence(student, teacher, **{**base, **bad})


# ---------------------------------------------------------------- SDPO compatibility (loss.sdpo_compat)
# A port of the SDPO reference's loss (lasgroup/SDPO), written here from its description on full-vocabulary
# probabilities: top-k + tail distillation with the tail 1 - sum p_topk never below 1 - exp(-1e-7)
# (verl/trainer/ppo/core_algos.py, compute_self_distillation_loss), the IS ratio exp(logp - logp_old) truncated at
# is_clip, the token-level rollout weight exp(logp_old - logp_rollout) truncated at 2 and detached
# (verl/trainer/ppo/rollout_corr_helper.py), each micro-batch's token mean over its kept tokens, scaled by
# 1 / (micro-batches per mini-batch) (verl/workers/actor/dp_actor.py).
def sdpo_port_categories(logits, top_ids, temperature):
    """[..., V] -> [..., k + 1]: the top-k probabilities and the reference's floored tail."""
    probs = torch.softmax(logits / temperature, dim=-1)
    top = probs.gather(-1, top_ids)
    mass = top.sum(-1, keepdim=True)
    smallest_tail = -math.expm1(-1e-7)
    # where the top-k mass exceeds exp(-1e-7) the reference's tail is the constant floor (no gradient)
    tail = torch.where(mass > math.exp(-1e-7), torch.full_like(mass, smallest_tail), 1.0 - mass)
    return torch.cat([top, tail], dim=-1)


def sdpo_port_per_token(student, teacher, *, divergence, alpha, top_k, temperature):
    ids = student.detach().topk(top_k, dim=-1).indices
    s = sdpo_port_categories(student, ids, temperature)
    q = sdpo_port_categories(teacher.detach(), ids, temperature)
    if divergence == "reverse_kl":
        return (s * torch.log(s / q)).sum(-1)
    if divergence == "forward_kl":
        return (q * torch.log(q / s)).sum(-1)
    m = alpha * q + (1 - alpha) * s
    return alpha * (q * torch.log(q / m)).sum(-1) + (1 - alpha) * (s * torch.log(s / m)).sum(-1)


def sdpo_port_minibatch_loss(micro_batches, *, divergence, alpha, top_k, temperature, is_clip, rollout_clip):
    total = 0.0
    for mb in micro_batches:
        per_token = sdpo_port_per_token(mb["student"], mb["teacher"], divergence=divergence, alpha=alpha,
                                        top_k=top_k, temperature=temperature)
        logp = torch.log_softmax(mb["student"] / temperature, dim=-1).gather(-1, mb["ids"].unsqueeze(-1)).squeeze(-1)
        # on-policy (the first mini-batch) the reference's old log-probs are the current ones: ratio 1
        old = logp.detach() if mb["old"] is None else mb["old"]
        ratio = torch.exp((logp - old).detach().clamp(-20, 20)).clamp(max=is_clip)
        rollout_weight = torch.exp((old - mb["rollout"]).clamp(-20, 20)).clamp(max=rollout_clip).detach()
        kept = mb["mask"].to(F64) * mb["sample_mask"].to(F64).unsqueeze(-1)
        total = total + (per_token * ratio * rollout_weight * kept).sum() / kept.sum().clamp(min=1)
    return total / len(micro_batches)


def sdpo_case(top_k=3, vocab=6, temperature=0.8):
    """One rank's mini-batch of two micro-batches with 3 and 8 kept tokens, where every convention matters:
    a position whose student tail is ~1e-20 (teacher diffuse), one whose teacher tail on the student's top-k is
    ~1e-20 (student diffuse), rollout and IS log-ratios above log 2, and a dropped sample."""
    lengths = ([1, 2], [4, 4, 3])
    micro_batches = []
    for index, rows in enumerate(lengths):
        width = max(rows)
        student = make_logits(len(rows), width, vocab, seed=60 + index)
        teacher = make_logits(len(rows), width, vocab, seed=70 + index)
        ids = torch.randint(0, vocab, (len(rows), width), generator=torch.Generator().manual_seed(80 + index))
        mask = torch.tensor([[t < n for t in range(width)] for n in rows])
        micro_batches.append(dict(student=student, teacher=teacher, ids=ids, mask=mask,
                                  sample_mask=torch.ones(len(rows))))
    a, b = micro_batches
    a["student"][1, 1] = torch.tensor([40.0, 39.0, 38.0, -10.0, -11.0, -12.0], dtype=F64) * temperature
    b["teacher"][0, 2] = torch.where(b["student"][0, 2] >= b["student"][0, 2].topk(top_k).values[-1], 40.0, -10.0)
    b["sample_mask"] = torch.tensor([1.0, 0.0, 1.0])  # 4 + 3 kept tokens (and the dropped row's 4 are not)
    for mb, offsets_seed in zip(micro_batches, (90, 91)):
        current = token_logps(mb["student"], mb["ids"], temperature=temperature)
        mb["old"] = None
        mb["rollout"] = current - 0.8 * make_logits(*mb["ids"].shape, seed=offsets_seed, scale=1.0)
    # the second micro-batch as if a mini-batch had already updated the student: an IS ratio applies
    b["old"] = token_logps(b["student"], b["ids"], temperature=temperature) - 0.8 * make_logits(3, 4, seed=92,
                                                                                                   scale=1.0)
    b["rollout"] = b["old"] - 0.8 * make_logits(3, 4, seed=93, scale=1.0)
    return micro_batches


def run_minibatch(micro_batches, cfg, *, sdpo_compat_normalizers, temperature, chunk_size=None):
    """This project's loss of the mini-batch (summed over micro-batches) and each micro-batch's gradient."""
    def kept_lengths(mb):
        return [int(n) for n, keep in zip(mb["mask"].sum(-1), mb["sample_mask"]) if keep]

    normalizers = micro_batch_normalizers([n for mb in micro_batches for n in kept_lengths(mb)],
                                          [kept_lengths(mb) for mb in micro_batches], mode=cfg.aggregation,
                                          sdpo_compat=sdpo_compat_normalizers)
    students = [mb["student"].clone().requires_grad_(True) for mb in micro_batches]
    options = {**cfg.model_dump(), "chunk_size": chunk_size}
    total = sum(opsd_loss(s, mb["teacher"], mb["ids"], mb["mask"], mb["sample_mask"], **options,
                          temperature=temperature, normalizer=normalizer, old_logps=mb["old"],
                          rollout_logps=mb["rollout"])[0]
                for s, mb, normalizer in zip(students, micro_batches, normalizers))
    return total.detach(), torch.autograd.grad(total, students)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_sdpo_compat_matches_a_port_of_the_reference_and_the_default_differs(divergence, alpha, chunk_size):
    temperature = 0.8
    micro_batches = sdpo_case(temperature=temperature)
    compat = LossConfig(sdpo_compat=True, divergence=divergence, jsd_alpha=alpha, top_k=3)
    assert compat.rollout_ratio_clip == 2.0 and compat.importance_ratio_clip == 2.0

    students = [mb["student"].clone().requires_grad_(True) for mb in micro_batches]
    port = sdpo_port_minibatch_loss([{**mb, "student": s} for mb, s in zip(micro_batches, students)],
                                    divergence=divergence, alpha=alpha, top_k=3, temperature=temperature,
                                    is_clip=2.0, rollout_clip=2.0)
    port_grads = torch.autograd.grad(port, students)
    port = port.detach()

    loss, grads = run_minibatch(micro_batches, compat, sdpo_compat_normalizers=True, temperature=temperature,
                                chunk_size=chunk_size)
    torch.testing.assert_close(loss, port, rtol=1e-9, atol=1e-12)
    for got, want in zip(grads, port_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)

    # The default (exact tail, true mini-batch token mean) differs here, and so does each convention alone:
    # the tail by nats for the KLs; the mixture JSD is bounded by log 2, and a tail of 1e-20 or 1e-7 beside
    # the other side's real mass barely moves it (the floor still shows, far above rounding).
    default = LossConfig(divergence=divergence, jsd_alpha=alpha, top_k=3, rollout_ratio_clip=2.0)
    tail_difference = 1e-9 if divergence == "jsd" else 1e-2
    for cfg, compat_normalizers, at_least in ((default, False, 1e-2), (default, True, tail_difference),
                                              (compat, False, 1e-2)):
        other, _ = run_minibatch(micro_batches, cfg, sdpo_compat_normalizers=compat_normalizers,
                                 temperature=temperature, chunk_size=chunk_size)
        assert abs(float(other) - port.item()) > at_least * abs(port.item())


@pytest.mark.parametrize("divergence,alpha", DIVERGENCES)
def test_the_floored_tail_is_the_exact_one_above_the_floor_and_differs_below(divergence, alpha):
    student = make_logits(2, 3, 8, seed=94)
    teacher = make_logits(2, 3, 8, seed=95)
    kwargs = dict(divergence=divergence, support="topk_tail", top_k=3, alpha=alpha, temperature=1.0)
    floored = distillation_divergence(student, teacher, tail="floored", **kwargs)
    torch.testing.assert_close(floored, distillation_divergence(student, teacher, **kwargs), rtol=1e-12, atol=1e-13)
    # A student tail of ~1e-20 under a diffuse teacher and a teacher tail of ~1e-20 under a diffuse student:
    # the floor changes either KL by ~34 nats x the diffuse side's tail; the mixture JSD by far less.
    student[0, 0] = torch.tensor([40.0, 39.0, 38.0, -10.0, -11.0, -12.0, -13.0, -14.0], dtype=F64)
    teacher[1, 1] = torch.where(student[1, 1] >= student[1, 1].topk(3).values[-1], 40.0, -10.0)
    floored = distillation_divergence(student, teacher, tail="floored", **kwargs)
    exact = distillation_divergence(student, teacher, **kwargs)
    want = sdpo_port_per_token(student, teacher, divergence=divergence, alpha=alpha, top_k=3, temperature=1.0)
    torch.testing.assert_close(floored, want, rtol=1e-10, atol=1e-12)
    assert float((exact - floored).abs().max()) > (1e-9 if divergence == "jsd" else 0.5)
    with pytest.raises(ValueError):
        distillation_divergence(student, teacher, tail="clamped", **kwargs)


def test_micro_batch_normalizers_by_hand():
    # One mini-batch over two ranks: kept response lengths 3, 0, 5 (this rank's two micro-batches) and 2, 6.
    whole = [3, 0, 5, 2, 6]
    mine = [[3], [0, 5]]
    assert micro_batch_normalizers(whole, mine, mode="token_mean", world_size=2) == [8.0, 8.0]
    assert micro_batch_normalizers(whole, mine, mode="seq_mean_token_mean", world_size=2) == [2.0, 2.0]
    # SDPO: each micro-batch's own count times the rank's 2 micro-batches; the ranks' average does the rest
    assert micro_batch_normalizers(whole, mine, mode="token_mean", world_size=2, sdpo_compat=True) == [6.0, 10.0]
    assert micro_batch_normalizers(whole, mine, mode="seq_mean_token_sum", world_size=2, sdpo_compat=True) == [2.0, 2.0]
    # a micro-batch with nothing kept divides by 1 x 3 (its loss is 0), never by 0
    assert micro_batch_normalizers([4], [[4], [], [0]], mode="token_mean", sdpo_compat=True) == [12.0, 3.0, 3.0]


def test_sdpo_compat_normalizers_give_the_mean_of_micro_batch_token_means():
    per_token = make_logits(5, 4, seed=96)
    lengths = [1, 4, 2, 4, 3]
    mask = torch.tensor([[t < n for t in range(4)] for n in lengths])
    micro_rows = [[0], [1, 2], [3, 4]]
    normalizers = micro_batch_normalizers(lengths, [[lengths[i] for i in rows] for rows in micro_rows],
                                          mode="token_mean", sdpo_compat=True)
    summed = sum(aggregate(per_token[rows], mask[rows], mode="token_mean", normalizer=n)
                 for rows, n in zip(micro_rows, normalizers))
    means = [aggregate(per_token[rows], mask[rows], mode="token_mean") for rows in micro_rows]
    torch.testing.assert_close(summed, sum(means) / 3, rtol=1e-12, atol=1e-14)
    assert abs(float(summed) - float(aggregate(per_token, mask, mode="token_mean"))) > 1e-2
