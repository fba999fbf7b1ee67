"""The fused LM-head loss against the unfused path it replaces: logits `hidden @ W.T + b` for every position,
then `opsd_loss` (itself tested against explicit computations in test_losses.py), with autograd through both.
Float64, so any difference beyond rounding is a bug; every loss option, tied and untied heads, chunk sizes
that do and do not divide the kept positions, padding and dropped samples; then a DeepSpeed student and an
EMA teacher on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from trainer.head_loss import opsd_loss_from_hidden, token_logps_from_hidden
from trainer.lm_head import LMHead, final_hidden_states, lm_head
from trainer.losses import opsd_loss, token_logps

F64 = torch.float64
B, T, H, V = 3, 7, 5, 11
# Response lengths 7, 4 and 6: right padding in rows 1 and 2.
MASK = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]], dtype=torch.bool)
# 7 + 4 + 6 = 17 kept positions: chunks of 1, 4 and 5 leave a remainder, 17 is one chunk, 1000 more than all.
CHUNK_SIZES = (1, 4, 5, 17, 1000)
RTOL = 1e-9


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def inputs(seed=0, *, bias=True):
    """Student and teacher hidden states and heads; logits of scale ~3, so the distributions are peaked."""
    student_hidden = randn(B, T, H, seed=seed)
    teacher_hidden = randn(B, T, H, seed=seed + 1)
    student_head = LMHead(randn(V, H, seed=seed + 2, scale=1.3), randn(V, seed=seed + 3) if bias else None)
    teacher_head = LMHead(randn(V, H, seed=seed + 4, scale=1.3), randn(V, seed=seed + 5) if bias else None)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed + 6))
    return student_hidden, teacher_hidden, student_head, teacher_head, ids


def options(**overrides):
    base = dict(divergence="reverse_kl", support="topk_tail", top_k=3, jsd_alpha=0.5, aggregation="token_mean",
                importance_ratio_clip=2.0, rollout_ratio_clip=None, temperature=0.8)
    base.update(overrides)
    return base


def with_grads(student_hidden, student_head):
    """Fresh leaves for the student's hidden states and head, so each run has its own gradients."""
    hidden = student_hidden.clone().requires_grad_(True)
    weight = student_head.weight.clone().requires_grad_(True)
    bias = None if student_head.bias is None else student_head.bias.clone().requires_grad_(True)
    return hidden, LMHead(weight, bias)


def leaves(hidden, head):
    return [t for t in (hidden, head.weight, head.bias) if t is not None]


def reference(student_hidden, teacher_hidden, student_head, teacher_head, ids, mask, sample_mask=None, **opts):
    """The unfused path: every position's logits through autograd, then opsd_loss; (loss, metrics, grads)."""
    hidden, head = with_grads(student_hidden, student_head)
    student_logits = F.linear(hidden, head.weight, head.bias)
    teacher_logits = F.linear(teacher_hidden, teacher_head.weight, teacher_head.bias)
    loss, metrics = opsd_loss(student_logits, teacher_logits, ids, mask, sample_mask, **opts)
    return loss, metrics, torch.autograd.grad(loss, leaves(hidden, head))


def fused(student_hidden, teacher_hidden, student_head, teacher_head, ids, mask, sample_mask=None, *, chunk_size,
          **opts):
    hidden, head = with_grads(student_hidden, student_head)
    loss, metrics = opsd_loss_from_hidden(hidden, teacher_hidden, ids, mask, sample_mask, student_head=head,
                                          teacher_head=teacher_head, chunk_size=chunk_size, **opts)
    return loss, metrics, torch.autograd.grad(loss, leaves(hidden, head))


def assert_same(got, want, rtol=RTOL):
    (loss, metrics, grads), (want_loss, want_metrics, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=0)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=rtol, atol=1e-14, msg=key)
    assert len(grads) == len(want_grads)
    for grad, want_grad in zip(grads, want_grads):
        # atol: gradient entries that are exactly 0 in one path may be ~1e-17 in the other
        torch.testing.assert_close(grad, want_grad, rtol=rtol, atol=1e-13)
        assert bool((want_grad != 0).any())  # a gradient that could not fail the check is no check


# ---------------------------------------------------------------- every loss option against the logits path
@pytest.mark.parametrize("support", ["topk_tail", "topk_renorm", "full"])
@pytest.mark.parametrize("divergence,alpha", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3),
                                              ("sampled_token", 0.5)])
def test_every_divergence_and_support_matches_the_logits_path(divergence, alpha, support):
    student_hidden, teacher_hidden, student_head, teacher_head, ids = inputs(seed=10)
    # The policy that sampled the batch, a little off the current one: some importance ratios are clipped.
    old = token_logps(F.linear(student_hidden, student_head.weight, student_head.bias), ids, temperature=0.8)
    old = old - 0.8 * randn(B, T, seed=17)
    opts = options(divergence=divergence, support=support, jsd_alpha=alpha, old_logps=old)
    want = reference(student_hidden, teacher_hidden, student_head, teacher_head, ids, MASK, **opts)
    assert 0 < want[1]["importance_clip_fraction"].item() < 1
    for chunk_size in CHUNK_SIZES:
        got = fused(student_hidden, teacher_hidden, student_head, teacher_head, ids, MASK, chunk_size=chunk_size,
                    **opts)
        assert_same(got, want)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize("ratios", ["none", "importance", "rollout", "both", "normalizer"])
def test_aggregations_ratios_and_sample_mask_match_the_logits_path(aggregation, ratios):
    student_hidden, teacher_hidden, student_head, teacher_head, ids = inputs(seed=20, bias=False)
    current = token_logps(F.linear(student_hidden, student_head.weight), ids, temperature=0.8)
    old = current - 0.6 * randn(B, T, seed=27)
    rollout = current - 0.1 * randn(B, T, seed=28)
    opts = {
        "none": dict(importance_ratio_clip=None),
        "importance": dict(old_logps=old, importance_ratio_clip=1.5),
        "rollout": dict(rollout_logps=rollout, rollout_ratio_clip=1.05),  # against the current student's logps
        "both": dict(old_logps=old, importance_ratio_clip=2.0, rollout_logps=rollout, rollout_ratio_clip=1.05),
        "normalizer": dict(old_logps=old, normalizer=23.0),
    }[ratios]
    opts = options(aggregation=aggregation, **opts)
    sample_mask = torch.tensor([1.0, 0.0, 1.0])  # the middle rollout's context added nothing
    want = reference(student_hidden, teacher_hidden, student_head, teacher_head, ids, MASK, sample_mask, **opts)
    for chunk_size in (3, 13, 1000):  # 13 kept positions
        got = fused(student_hidden, teacher_hidden, student_head, teacher_head, ids, MASK, sample_mask,
                    chunk_size=chunk_size, **opts)
        assert_same(got, want)
        assert bool((got[2][0][1] == 0).all())  # the dropped rollout's hidden states get no gradient


def test_a_tied_head_gives_the_embedding_matrix_both_gradients():
    """With tied embeddings the head's weight is the embedding matrix: its gradient is the sum of the lookup's
    and the head's, as autograd gives on the unfused path."""
    embedding = randn(V, H, seed=30, scale=1.3).requires_grad_(True)
    mixing = randn(H, H, seed=31) / H**0.5
    _, teacher_hidden, _, teacher_head, ids = inputs(seed=32)
    inputs_ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(33))

    def run(chunk_size):
        table = embedding.clone().detach().requires_grad_(True)
        hidden = torch.tanh(F.embedding(inputs_ids, table) @ mixing)  # a toy decoder over the same embeddings
        loss, _ = opsd_loss_from_hidden(hidden, teacher_hidden, ids, MASK, student_head=LMHead(table),
                                        teacher_head=teacher_head, chunk_size=chunk_size, **options())
        (grad,) = torch.autograd.grad(loss, table)
        return loss, grad

    want_loss, want_grad = run(None)  # None: all logits, then opsd_loss
    # The head's share alone would differ: only rows of tokens in inputs_ids get a lookup gradient.
    assert set(range(V)) - set(inputs_ids.flatten().tolist())
    for chunk_size in (2, 5, 17):
        loss, grad = run(chunk_size)
        torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=0)
        torch.testing.assert_close(grad, want_grad, rtol=RTOL, atol=1e-13)


def test_chunk_size_none_is_opsd_loss_on_all_logits():
    student_hidden, teacher_hidden, student_head, teacher_head, ids = inputs(seed=40)
    want = reference(student_hidden, teacher_hidden, student_head, teacher_head, ids, MASK, **options())
    got = fused(student_hidden, teacher_hidden, student_head, teacher_head, ids, MASK, chunk_size=None, **options())
    assert_same(got, want, rtol=0)


# ---------------------------------------------------------------- masks, gradients, dtypes
def test_masked_positions_are_never_computed_and_change_nothing():
    student_hidden, teacher_hidden, student_head, teacher_head, ids = inputs(seed=50)
    want = fused(student_hidden, teacher_hidden, student_head, teacher_head, ids, MASK, chunk_size=4, **options())
    padded = ~MASK
    student_hidden, teacher_hidden, ids = student_hidden.clone(), teacher_hidden.clone(), ids.clone()
    student_hidden[padded] = float("nan")  # never read: NaN would reach the loss or the gradients otherwise
    teacher_hidden[padded] = float("inf")
    ids[padded] = V + 100  # an id the gather would refuse
    got = fused(student_hidden, teacher_hidden, student_head, teacher_head, ids, MASK, chunk_size=4, **options())
    assert_same(got, want, rtol=0)
    assert bool((got[2][0][padded] == 0).all())


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_nothing_kept_gives_zero_with_a_zero_gradient(aggregation):
    student_hidden, teacher_hidden, student_head, teacher_head, ids = inputs(seed=55)
    hidden, head = with_grads(student_hidden, student_head)
    loss, metrics = opsd_loss_from_hidden(hidden, teacher_hidden, ids, MASK, torch.zeros(B), student_head=head,
                                          teacher_head=teacher_head, chunk_size=4, **options(aggregation=aggregation))
    assert loss.item() == 0.0 and metrics["valid_tokens"].item() == 0
    for grad in torch.autograd.grad(loss, leaves(hidden, head)):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_no_gradient_reaches_the_teacher_and_no_grad_mode_computes_none():
    student_hidden, teacher_hidden, student_head, teacher_head, ids = inputs(seed=60)
    teacher_hidden = teacher_hidden.clone().requires_grad_(True)
    teacher_head = LMHead(teacher_head.weight.clone().requires_grad_(True), teacher_head.bias)
    hidden, head = with_grads(student_hidden, student_head)
    loss, _ = opsd_loss_from_hidden(hidden, teacher_hidden, ids, MASK, student_head=head, teacher_head=teacher_head,
                                    chunk_size=4, **options())
    grads = torch.autograd.grad(loss, [hidden, teacher_hidden, teacher_head.weight], allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is None

    with torch.no_grad():
        quiet, quiet_metrics = opsd_loss_from_hidden(hidden, teacher_hidden, ids, MASK, student_head=head,
                                                     teacher_head=teacher_head, chunk_size=4, **options())
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, loss.detach(), rtol=0, atol=0)


def test_the_incoming_gradient_scales_the_precomputed_ones():
    student_hidden, teacher_hidden, student_head, teacher_head, ids = inputs(seed=65)
    got = fused(student_hidden, teacher_hidden, student_head, teacher_head, ids, MASK, chunk_size=4, **options())
    hidden, head = with_grads(student_hidden, student_head)
    loss, _ = opsd_loss_from_hidden(hidden, teacher_hidden, ids, MASK, student_head=head, teacher_head=teacher_head,
                                    chunk_size=4, **options())
    # Two uses of the loss: autograd sums their incoming gradients, -2.5 + 0.5 = -2 times the loss's own.
    grads = torch.autograd.grad(-2.5 * loss + loss * 0.5, leaves(hidden, head))
    for grad, single in zip(grads, got[2]):
        torch.testing.assert_close(grad, -2.0 * single, rtol=1e-12, atol=1e-15)


def test_bf16_hidden_states_and_heads_match_the_bf16_logits_path():
    """bf16 logits chunk by chunk are the same bf16 numbers as all at once; the loss computes in float32."""
    student_hidden, teacher_hidden, student_head, teacher_head, ids = inputs(seed=70, bias=False)
    to16 = lambda head: LMHead(head.weight.bfloat16())  # noqa: E731
    args = (student_hidden.bfloat16(), teacher_hidden.bfloat16(), to16(student_head), to16(teacher_head), ids, MASK)
    want = reference(*args, **options())
    got = fused(*args, chunk_size=4, **options())
    assert got[0].dtype == torch.float32 and [g.dtype for g in got[2]] == [torch.bfloat16] * 2
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    for grad, want_grad in zip(got[2], want[2]):
        # grad W sums 17 positions' bf16 products; the logits path rounds one float32 sum to bf16 once
        torch.testing.assert_close(grad.float(), want_grad.float(), rtol=2e-2, atol=1e-3)


def test_token_logps_from_hidden_are_the_token_logps_of_all_logits():
    student_hidden, _, student_head, _, ids = inputs(seed=80)
    want = token_logps(F.linear(student_hidden, student_head.weight, student_head.bias), ids, temperature=0.7)
    for chunk_size in (1, 4, 21, 100):
        got = token_logps_from_hidden(student_hidden, student_head, ids, temperature=0.7, chunk_size=chunk_size)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_bad_chunk_sizes_raise():
    student_hidden, teacher_hidden, student_head, teacher_head, ids = inputs(seed=90)
    with pytest.raises(ValueError):
        opsd_loss_from_hidden(student_hidden, teacher_hidden, ids, MASK, student_head=student_head,
                              teacher_head=teacher_head, chunk_size=0, **options())
    with pytest.raises(ValueError):
        token_logps_from_hidden(student_hidden, student_head, ids, temperature=1.0, chunk_size=0)


# ---------------------------------------------------------------- the forwards stopped at the hidden states
@pytest.mark.parametrize("tied", [False, True])
def test_hidden_states_through_the_head_are_the_models_response_logits(tied):
    """The teacher's forward stopped before the head, then its head: the logits its own forward gives."""
    from trainer.batch import forward_response_hidden, forward_response_logits, pack
    from trainer.teacher import EmaTeacher

    teacher = EmaTeacher(tiny_llama(tied=tied), ema_rate=0.0)
    batch = pack([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]], [[11, 12], [13, 14, 15, 16], [17]], pad_id=0)
    hidden = forward_response_hidden(teacher.forward_hidden, batch)
    head = teacher.lm_head()
    assert hidden.shape == (3, 4, 64) and not hidden.requires_grad
    assert (head.weight is teacher.model.model.embed_tokens.weight) == tied
    logits = forward_response_logits(teacher.forward_logits, batch)
    torch.testing.assert_close(F.linear(hidden, head.weight, head.bias), logits, rtol=1e-6, atol=1e-6)
    assert teacher.forward_hidden(batch.input_ids, batch.attention_mask, hidden_to_keep=2).shape == (3, 2, 64)


def test_heads_that_transform_their_logits_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="soft-capping"):
        lm_head(model)
    model.config.final_logit_softcapping = None
    assert lm_head(model).weight is model.lm_head.weight


def test_final_hidden_states_refuses_a_forward_that_skips_the_decoder():
    model = tiny_llama(tied=False)
    with pytest.raises(RuntimeError, match="ran 0 times"):
        final_hidden_states(model, lambda **kwargs: None)


# ---------------------------------------------------------------- a student step on a tiny Llama, as opsd_step takes it
def tiny_llama(*, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=tied, initializer_range=0.1)
    return LlamaForCausalLM(config).float()


@pytest.mark.parametrize("zero_stage,tied", [(0, False), (0, True), (2, True)])
def test_a_student_step_through_the_fused_loss_matches_the_logits_path(zero_stage, tied):
    """opsd_step's micro batch: the DeepSpeed student's and the EMA teacher's forwards stopped at the hidden
    states, the fused loss, the engine's backward; against both models' logits and opsd_loss. Same loss, same
    gradient on every parameter (2 layers of 9, the final norm, the embeddings, an untied head), same global
    norm. ZeRO-2 reduces each gradient once per backward: a tied embedding's two shares must arrive summed."""
    from trainer.batch import forward_response_hidden, forward_response_logits, pack
    from trainer.config import DeepSpeedConfig, LossConfig, OptimConfig
    from trainer.student import Student
    from trainer.teacher import EmaTeacher

    model = tiny_llama(tied=tied)
    teacher = EmaTeacher.from_model(model, ema_rate=0.5)
    with torch.no_grad():  # a teacher some steps away from the student, so the divergence has a gradient
        for param in teacher.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    responses = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    student_batch = pack([[1, 2, 3], [4], [2, 2, 3, 1]], responses, pad_id=0)
    teacher_batch = pack([[1, 2, 3, 20, 21, 22], [4, 23], [2, 24, 25, 26, 27, 3, 1]], responses, pad_id=0)
    sample_mask = torch.tensor([True, True, False])
    loss_options = LossConfig(top_k=5).model_dump(exclude={"chunk_size"})
    extra = dict(temperature=0.9, normalizer=7.0)

    def student_step(fused: bool):
        student = Student(copy.deepcopy(model), optim=OptimConfig(micro_batch_size=3, mini_batch_size=3),
                          deepspeed_config=DeepSpeedConfig(zero_stage=zero_stage))
        if fused:
            teacher_hidden = forward_response_hidden(teacher.forward_hidden, teacher_batch)
            student_hidden = forward_response_hidden(student.forward_hidden, student_batch)
            loss, metrics = opsd_loss_from_hidden(
                student_hidden, teacher_hidden, student_batch.response_ids, student_batch.response_mask, sample_mask,
                student_head=student.lm_head(), teacher_head=teacher.lm_head(), chunk_size=2, **loss_options, **extra)
        else:
            teacher_logits = forward_response_logits(teacher.forward_logits, teacher_batch)
            student_logits = forward_response_logits(student.forward_logits, student_batch)
            loss, metrics = opsd_loss(student_logits, teacher_logits, student_batch.response_ids,
                                      student_batch.response_mask, sample_mask, **loss_options, **extra)
        student.backward(loss)
        # ZeRO-2 reduces gradients into its own buffers at the step: there, the global norm is what is seen.
        grads = {} if zero_stage else {name: param.grad.clone() for name, param in student.module.named_parameters()}
        return loss.detach(), metrics, grads, student.step()["grad_norm"]

    loss, metrics, grads, grad_norm = student_step(fused=True)
    want_loss, want_metrics, want_grads, want_norm = student_step(fused=False)
    assert want_loss.item() > 1e-3 and metrics["valid_tokens"].item() == 7
    # float32, the same terms summed in another order (chunk by chunk, and through DeepSpeed's engine): up to
    # 1.1e-6 apart on some CPUs (AMD EPYC), within 1e-6 on others.
    torch.testing.assert_close(loss, want_loss, rtol=4e-6, atol=0)
    for key in want_metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=4e-6, atol=1e-7, msg=key)
    assert grads.keys() == want_grads.keys() and len(grads) == (0 if zero_stage else 20 + (not tied))
    for name, want_grad in want_grads.items():
        assert bool((want_grad != 0).any()), name
        # atol: a near-zero entry of the tied embedding's gradient (two paths summed) was 1.08e-7 apart on AMD EPYC
        torch.testing.assert_close(grads[name], want_grad, rtol=1e-5, atol=2e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert grad_norm == pytest.approx(want_norm, rel=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_sdpo_compat_floors_the_tail_in_the_fused_path_too(divergence):
    student_hidden, teacher_hidden, student_head, teacher_head, ids = inputs(seed=30)
    # A peaked student: its mass outside the top 3 falls below the reference's floor (about 1e-7) at some positions.
    peaked = LMHead(student_head.weight * 12, student_head.bias)
    opts = options(divergence=divergence, support="topk_tail", sdpo_compat=True)
    want = reference(student_hidden, teacher_hidden, peaked, teacher_head, ids, MASK, **opts)
    exact = reference(student_hidden, teacher_hidden, peaked, teacher_head, ids, MASK, **{**opts, "sdpo_compat": False})
    if divergence == "forward_kl":  # weighted by the teacher's real mass there, a floored student tail shows
        assert not torch.allclose(want[0], exact[0], rtol=1e-6, atol=0)
    for chunk_size in CHUNK_SIZES:
        assert_same(fused(student_hidden, teacher_hidden, peaked, teacher_head, ids, MASK, chunk_size=chunk_size,
                          **opts), want)
