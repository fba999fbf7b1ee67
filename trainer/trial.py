"""One OPSD trial: measure the initial gap, run the steps of METHOD.md section 1, evaluate, checkpoint.

`opsd_step` is the method, top to bottom, and every rank runs it; what it calls are small functions
elsewhere in `trainer/`, and what it works on is a `TrialRuntime` (trainer/runtime.py). `run_trial` is the
loop around it. A trial writes OUT/config.json, OUT/steps.parquet, OUT/trial.json, OUT/rollouts/step-N.jsonl
and OUT/checkpoints/, and rank 0 keeps OUT/progress.json current while it runs (trainer/records.py).
Rerunning it on the same OUT resumes after the last checkpoint with the same data order and sampling seeds,
so the resumed steps reproduce an uninterrupted run's metrics (float32, CPU).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sandbox.grader import GradeRequest
from trainer.aggregation import micro_batch_normalizers
from trainer.batch import PackedBatch, forward_response_hidden, forward_response_logits, pack
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrialConfig
from trainer.contexts import GradedRollout, teacher_prompts_for_group
from trainer.data import TrainProblem
from trainer.distributed import broadcast_from_main, get_rank, run_local_ranks, wait_for_main
from trainer.evaluate import evaluate
from trainer.head_loss import opsd_loss_from_hidden, token_logps_from_hidden
from trainer.losses import opsd_loss, token_logps
from trainer.layout import TrialFolder
from trainer.records import (
    PhaseTimer,
    Progress,
    StepLog,
    claim_out_dir,
    data_line,
    mark_failed,
    mean_or_zero,
    trial_summary,
    write_json,
    write_rollouts,
)
from trainer.rollout import Rollout
from trainer.runtime import TrialRuntime, start_runtime
from trainer.minibatches import split_minibatches


@dataclass
class Sample:
    """One rollout ready for the loss: the same response after the student's and the teacher's prompts."""

    prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]
    rollout_logps: list[float]
    has_context: bool


@dataclass
class RolloutShare:
    """What steps 1-3 made of one engine's share of a step's prompts; every rank gets every share, in rank
    order, which is prompt order."""

    samples: list[Sample]
    records: list[dict[str, Any]]  # one per rollout, for OUT/rollouts/step-N.jsonl
    context_rows: list[dict[str, float]]  # one per prompt
    passed: list[bool]  # per rollout
    train_test_fractions: list[float]
    truncated: list[bool]
    prompt_tokens: int  # the engine's prompt tokens (a prompt sampled n times counts n times)
    generated_tokens: int


def opsd_step(trial: TrialRuntime, step: int, timer: PhaseTimer | None = None) -> tuple[dict[str, Any], list[dict]]:
    """One OPSD training step (METHOD.md section 1); every rank runs it, `timer` times its phases.

    Every rank with an engine samples, grades and builds the contexts (1-3) of its share of the prompts, and
    every rank gets all of the step's samples; every rank trains on its share of each mini-batch (4-7), then
    pushes its weights and updates its EMA teacher (8). Returns (metrics, records) on rank 0: the step's
    metrics and one record per rollout (response, verdict, feedback, teacher prompt, the rank that sampled
    it), for the caller to log; the other ranks return empty ones."""
    cfg, timer = trial.cfg, timer or PhaseTimer()
    batch = trial.sampler.next_batch(cfg.rollout.prompts_per_step)  # every rank keeps the data order
    shares = None
    if trial.engine is not None:
        # This engine's contiguous share of the prompts (all of them with one engine). Each sample's seed comes
        # from its place in the whole step, so the shares together draw what one engine would.
        mine = trial.share(len(batch))
        problems = [batch[i] for i in mine]
        # 1. Rollouts: n samples per prompt from the student, whose current weights the engine holds.
        with timer("rollout"):
            groups = trial.engine.generate(
                [trial.prompt_ids[tp.id] for tp in problems], n=cfg.rollout.n_samples,
                temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                max_tokens=cfg.rollout.max_response_tokens,
                seed=trial.sampling_seed(step, "rollout") + mine.start * cfg.rollout.n_samples)
        # 2. Grade every rollout on its problem's train tests: reward 1 when all pass, world feedback otherwise.
        with timer("sandbox"):
            verdicts = trial.grader.grade_many([
                GradeRequest(tp.problem, r.text, tp.train_tests, r.finish_reason == "length")
                for tp, group in zip(problems, groups) for r in group])
        # 3. The self-teacher's privileged context for each rollout, chat-templated and truncated.
        with timer("teacher_context"):
            share = _with_teacher_prompts(trial, problems, groups, verdicts)
        # Every engine's share, in prompt order: the slowest engine sets when training starts.
        with timer("rollout_gather"):
            shares = trial.gather_from_engines(share)
    shares = trial.share_with_all(shares)
    samples = [sample for share in shares for sample in share.samples]
    timer.add_tokens(rollout_prompt=sum(share.prompt_tokens for share in shares),
                     rollout_generated=sum(share.generated_tokens for share in shares))
    trial.sleep_engine()  # with rollout.sleep_between_phases, vLLM's GPU memory is the trainer's until step 8

    # 4-7. Mini-batches of the samples (one AdamW step each), micro-batches of each for this rank; the
    # importance ratio against the policy that sampled them corrects later mini-batches for earlier steps.
    minibatches = _minibatches(trial, len(samples), step)
    old_logps = None
    # The rollout correction uses them too (the SDPO reference's old_log_probs), not the student after earlier ones.
    if len(minibatches) > 1 and (cfg.loss.importance_ratio_clip is not None or cfg.loss.rollout_ratio_clip is not None):
        with timer("old_logps"), torch.no_grad():
            old_logps = _student_token_logps(trial, samples, [m for _, mine in minibatches for m in mine], timer)
    micro_rows, mini_losses, grad_norms, optim_metrics = [], [], [], {}
    for items, mine in minibatches:
        normalizers = micro_batch_normalizers(_kept_lengths(samples, items), [_kept_lengths(samples, m) for m in mine],
                                              mode=cfg.loss.aggregation, world_size=trial.world_size,
                                              sdpo_compat=cfg.loss.sdpo_compat)
        mini_loss = 0.0
        for micro, normalizer in zip(mine, normalizers):
            student_batch, teacher_batch = _pack_both(trial, [samples[i] for i in micro], timer)
            targets = (student_batch.response_ids, student_batch.response_mask,
                       torch.tensor([samples[i].has_context for i in micro], device=trial.device))
            loss_options = dict(
                **cfg.loss.model_dump(), temperature=cfg.rollout.temperature, normalizer=normalizer,
                old_logps=None if old_logps is None else _padded([old_logps[i] for i in micro], student_batch),
                rollout_logps=_padded([samples[i].rollout_logps for i in micro], student_batch))
            if cfg.loss.chunk_size is not None:
                # 4. The self-teacher (EMA weights, no gradient) reads the response after its privileged prompt,
                # up to its last hidden states.
                with timer("teacher_forward"):
                    teacher_hidden = forward_response_hidden(trial.teacher.forward_hidden, teacher_batch)
                # 5-6. The student's hidden states on the same tokens; both LM heads, the divergence per token and
                # the masked aggregate, loss.chunk_size positions' logits at a time.
                with timer("student_forward_backward"):
                    student_hidden = forward_response_hidden(trial.student.forward_hidden, student_batch)
                    loss, loss_metrics = opsd_loss_from_hidden(
                        student_hidden, teacher_hidden, *targets, student_head=trial.student.lm_head(),
                        teacher_head=trial.teacher.lm_head(), **loss_options)
                    trial.student.backward(loss)
            else:  # 4-6 unfused (ZeRO-3 partitions the heads): every response position's logits, then the loss
                with timer("teacher_forward"):
                    teacher_logits = forward_response_logits(trial.teacher.forward_logits, teacher_batch)
                with timer("student_forward_backward"):
                    student_logits = forward_response_logits(trial.student.forward_logits, student_batch)
                    loss, loss_metrics = opsd_loss(student_logits, teacher_logits, *targets, **loss_options)
                    trial.student.backward(loss)
            mini_loss += float(loss.detach())
            micro_rows.append({key: float(value) for key, value in loss_metrics.items()})
        # 7. One AdamW step over the mini-batch's accumulated gradients.
        with timer("optimizer"):
            optim_metrics = trial.student.step()
        mini_losses.append(mini_loss)
        grad_norms.append(optim_metrics["grad_norm"] or 0.0)

    # 8. Push the student's new weights into the rollout engine; move the EMA teacher towards the student.
    with timer("weight_push"):
        push_metrics = trial.push_student_weights()
    with timer("ema_update"):
        ema_metrics = trial.teacher.update(trial.student.named_full_parameters())

    if not trial.is_main:
        return {}, []
    context_rows = [row for share in shares for row in share.context_rows]
    metrics = {
        "reward": mean_or_zero([float(passed) for share in shares for passed in share.passed]),
        "train_test_frac": mean_or_zero([f for share in shares for f in share.train_test_fractions]),
        "rollouts": len(samples),
        "response_tokens_mean": mean_or_zero([len(s.response_ids) for s in samples]),
        "truncated_fraction": mean_or_zero([float(t) for share in shares for t in share.truncated]),
        **{key: mean_or_zero([row[key] for row in context_rows]) for key in context_rows[0]},
        **_loss_metrics(micro_rows), "loss": mean_or_zero(mini_losses), "grad_norm": mean_or_zero(grad_norms),
        "optimizer_steps": len(minibatches), "lr": optim_metrics["lr"],
        **ema_metrics, "push_seconds": push_metrics["push/seconds"], **timer.metrics(),
    }
    return metrics, [record for share in shares for record in share.records]


def _with_teacher_prompts(trial: TrialRuntime, batch: Sequence[TrainProblem], groups: list[list[Rollout]],
                          verdicts: list) -> RolloutShare:
    """Step 3 for prompt groups: a Sample per rollout, context metrics per group, a record per rollout."""
    cfg = trial.cfg
    graded = GradedRollout.groups([[r.text for r in group] for group in groups], verdicts)
    flat_verdicts = iter(verdicts)
    samples, context_rows, records = [], [], []
    for tp, group, graded_group in zip(batch, groups, graded):
        teacher_ids, has_context, context_metrics = teacher_prompts_for_group(
            trial.tokenizer, graded_group, problem=tp.problem, context=cfg.context, hint=trial.hints.get(tp.id),
            thinking=cfg.model.thinking)
        context_rows.append(context_metrics)
        for r, t_ids, keep, v in zip(group, teacher_ids, has_context, flat_verdicts):
            samples.append(Sample(trial.prompt_ids[tp.id], t_ids, r.token_ids, r.logps, keep))
            records.append({"problem_id": tp.id, "rank": trial.rank, "response": r.text, "verdict": v.verdict,
                            "feedback": v.feedback, "has_context": keep,
                            "teacher_prompt": trial.tokenizer.decode(t_ids),
                            "prompt_tokens": len(trial.prompt_ids[tp.id]), "response_tokens": len(r.token_ids),
                            "teacher_prompt_tokens": len(t_ids)})
    rollouts = [r for group in groups for r in group]
    return RolloutShare(
        samples, records, context_rows, passed=[v.passed for v in verdicts],
        train_test_fractions=[v.fraction_passed for v in verdicts],
        truncated=[r.finish_reason == "length" for r in rollouts],
        prompt_tokens=sum(len(trial.prompt_ids[tp.id]) * len(group) for tp, group in zip(batch, groups)),
        generated_tokens=sum(len(r.token_ids) for r in rollouts))


def _minibatches(trial: TrialRuntime, n_samples: int, step: int) -> list[tuple[list[int], list[list[int]]]]:
    """The step's mini-batches as (every rank's sample indices, this rank's micro-batches of indices).

    Every rank draws the same shuffle (seeded by trial seed and step), so each knows the whole mini-batch,
    whose kept tokens the loss normaliser counts, without any communication."""
    cfg = trial.cfg

    def for_rank(rank: int) -> list[list[list[int]]]:
        return split_minibatches(n_samples, cfg.optim.mini_batch_size, cfg.optim.micro_batch_size,
                                rng=np.random.default_rng([cfg.seed, step]), rank=rank, world_size=trial.world_size)

    everyone = [for_rank(rank) for rank in range(trial.world_size)]
    return [([i for rank_split in everyone for micro in rank_split[index] for i in micro], mine)
            for index, mine in enumerate(everyone[trial.rank])]


def _pack_both(trial: TrialRuntime, samples: list[Sample], timer: PhaseTimer) -> tuple[PackedBatch, PackedBatch]:
    """The samples' responses after the student's prompts and after the teacher's (their tokens counted)."""
    responses = [s.response_ids for s in samples]
    student_batch = pack([s.prompt_ids for s in samples], responses, pad_id=trial.pad_id, device=trial.device)
    teacher_batch = pack([s.teacher_prompt_ids for s in samples], responses, pad_id=trial.pad_id,
                         device=trial.device)
    _count_tokens(timer, "student_forward_backward", student_batch)
    _count_tokens(timer, "teacher_forward", teacher_batch)
    return student_batch, teacher_batch


def _count_tokens(timer: PhaseTimer, phase: str, batch: PackedBatch) -> None:
    """The real tokens a forward over `batch` runs on, and its positions with padding (records.TOKEN_COLUMNS)."""
    timer.add_tokens(**{phase: int(batch.attention_mask.sum()), f"{phase}_padded": batch.attention_mask.numel()})


def _student_token_logps(trial: TrialRuntime, samples: list[Sample], micro_batches: list[list[int]],
                         timer: PhaseTimer) -> dict[int, torch.Tensor]:
    """Sample index -> the student's log-probs of its response tokens [len], micro-batch by micro-batch."""
    out = {}
    for micro in micro_batches:
        student_batch = pack([samples[i].prompt_ids for i in micro], [samples[i].response_ids for i in micro],
                             pad_id=trial.pad_id, device=trial.device)
        _count_tokens(timer, "old_logps", student_batch)
        temperature, chunk_size = trial.cfg.rollout.temperature, trial.cfg.loss.chunk_size
        if chunk_size is not None:
            hidden = forward_response_hidden(trial.student.forward_hidden, student_batch)
            logps = token_logps_from_hidden(hidden, trial.student.lm_head(), student_batch.response_ids,
                                            temperature=temperature, chunk_size=chunk_size)
        else:
            logits = forward_response_logits(trial.student.forward_logits, student_batch)
            logps = token_logps(logits, student_batch.response_ids, temperature=temperature)
        for row, i in enumerate(micro):
            out[i] = logps[row, : len(samples[i].response_ids)].detach()
    return out


def _kept_lengths(samples: list[Sample], indices: list[int]) -> list[int]:
    """Response lengths of the samples whose loss is kept (their context added something)."""
    return [len(samples[i].response_ids) for i in indices if samples[i].has_context]


def _padded(rows: list, batch: PackedBatch) -> torch.Tensor:
    """Per-token values of each row (lists of floats, or tensors), zero-padded to the batch's response width:
    [B, R] float32 on the batch's device."""
    device = batch.response_ids.device
    out = torch.zeros((len(rows), batch.response_ids.shape[1]), dtype=torch.float32, device=device)
    for i, row in enumerate(rows):
        values = torch.as_tensor(row, dtype=torch.float32, device=device)
        out[i, : len(values)] = values
    return out


def _loss_metrics(micro_rows: list[dict[str, float]]) -> dict[str, float]:
    """The step's per-token loss metrics: each micro-batch's weighted by its kept tokens."""
    tokens = sum(row["valid_tokens"] for row in micro_rows)

    def per_token(key: str) -> float:
        return sum(row[key] * row["valid_tokens"] for row in micro_rows) / tokens if tokens else 0.0

    return {"kl": per_token("divergence"), "importance_weight_mean": per_token("importance_weight_mean"),
            "importance_clip_fraction": per_token("importance_clip_fraction"), "loss_tokens": tokens}


# ------------------------------------------------------------------------------------------------ the trial


def run_trial(cfg: TrialConfig, out_dir: Path) -> dict[str, Any]:
    """Run (or resume) the trial into `out_dir`; returns the summary also written to trial.json.

    With `deepspeed.world_size` N > 1 and no launcher around this process, N local ranks are started
    (gloo on CPU, NCCL on GPU); each rank (or rank 0 alone, `rollout.engines: main`) holds a rollout engine
    and sandbox workers, and every rank trains.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_out_dir(cfg, out_dir)
    try:
        if cfg.deepspeed.world_size > 1 and "RANK" not in os.environ:
            # Each rank gets its share of this process's CPUs, not all of them each (oversubscribed threads).
            threads = max(1, len(os.sched_getaffinity(0)) // cfg.deepspeed.world_size)
            results = run_local_ranks(_run_rank, cfg.deepspeed.world_size, cfg.model_dump(mode="json"),
                                      str(out_dir), device=cfg.device, torch_threads=threads,
                                      timeout_s=7 * 24 * 3600, collective_timeout_s=cfg.deepspeed.collective_timeout_s,
                                      main_wait_timeout_s=cfg.deepspeed.main_wait_timeout_s)
            return results[0]
        return _run_rank(0, cfg.model_dump(mode="json"), str(out_dir))
    except BaseException as err:
        # Rank 0 reports its own failure; this catches the others (and a rank killed from outside).
        mark_failed(TrialFolder(out_dir).progress, err)
        raise


def _run_rank(rank: int, cfg_json: dict, out: str) -> dict[str, Any]:
    cfg, out_dir = TrialConfig.model_validate(cfg_json), Path(out)
    progress = Progress(TrialFolder(out_dir).progress if get_rank() == 0 else None, steps=cfg.steps)
    try:
        summary = _run_steps(cfg, out_dir, progress)
    except BaseException as err:
        progress.failed(err)
        raise
    progress.completed()
    return summary


def _run_steps(cfg: TrialConfig, out_dir: Path, progress: Progress) -> dict[str, Any]:
    started = time.time()
    folder = TrialFolder(out_dir)
    log = StepLog(folder.steps)
    checkpoints = folder.checkpoints
    around = progress.timer()  # the phases between steps: reported, not logged
    with start_runtime(cfg) as trial:
        main = trial.is_main
        if main:
            print(data_line(cfg, trial.data_summary), flush=True)
        resume_from = latest_checkpoint(checkpoints)
        if resume_from is not None:
            progress.phase("resume")
            state = load_checkpoint(resume_from, student=trial.student, teacher=trial.teacher)
            trial.sampler.load_state_dict(state.sampler_state)
            trial.push_student_weights()
            first_step, initial, latest_eval = state.step + 1, state.metadata["initial_eval"], state.metadata["latest_eval"]
            log.truncate_after(state.step)
            if main:
                print(f"resuming {out_dir} after step {state.step}")
                _print_eval(state.step, latest_eval)
        else:
            first_step = 1
            with around("initial_eval"):
                initial = latest_eval = _evaluate(trial)
            if main:
                log.append(0, "eval", initial)
                log.flush()
                _print_eval(0, initial)
            with around("checkpoint"):
                _save(trial, checkpoints, 0, initial, latest_eval)

        for step in range(first_step, cfg.steps + 1):
            progress.step(step)
            started_step = time.perf_counter()
            metrics, records = opsd_step(trial, step, progress.timer())
            if main:
                # The whole step's wall time: its phases' time/ columns plus what runs between them.
                log.append(step, "train", {**metrics, "step_seconds": round(time.perf_counter() - started_step, 4)})
                write_rollouts(folder.rollouts(step), records)
                print(f"step {step}/{cfg.steps}  loss {metrics['loss']:.4f}  kl {metrics['kl']:.4f}  "
                      f"reward {metrics['reward']:.3f}  "
                      f"({sum(v for k, v in metrics.items() if k.startswith('time/')):.1f}s)", flush=True)
            if step % cfg.eval.every_steps == 0 or step == cfg.steps:
                with around("eval"):
                    latest_eval = _evaluate(trial)
                if main:
                    log.append(step, "eval", latest_eval)
                    _print_eval(step, latest_eval)
            if main:
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                with around("checkpoint"):
                    _save(trial, checkpoints, step, initial, latest_eval)

    summary = trial_summary(cfg, trial.model_path, initial, latest_eval, time.time() - started,
                            trial.data_summary)
    if main:
        write_json(folder.summary_path, summary)
    return summary


def _evaluate(trial: TrialRuntime) -> dict[str, Any]:
    """Every rank with an engine evaluates its share of the validation problems (`evaluate` gathers them),
    which leaves the self-teacher's weights in its engine; then every rank pushes the student's back
    (collective under ZeRO-3, a bucket at a time) and gets the metrics. A rank without an engine waits for the
    evaluation (tens of minutes at the paper's lengths) in `wait_for_main`, not in the push's gathers."""
    metrics = evaluate(trial) if trial.engine is not None else None
    wait_for_main()
    trial.push_student_weights()
    return broadcast_from_main(metrics)


def _save(trial: TrialRuntime, root: Path, step: int, initial: dict, latest_eval: dict) -> None:
    save_checkpoint(root, step=step, student=trial.student, teacher=trial.teacher,
                    sampler_state=trial.sampler.state_dict(),
                    metadata={"initial_eval": initial, "latest_eval": latest_eval})


def _print_eval(step: int, ev: dict) -> None:
    print(f"eval @ step {step}: all tests passed: student {ev['student_acc']:.3f}, at T=1 {ev['student_acc_t1']:.3f}, "
          f"self-teacher {ev['teacher_acc']:.3f}, gap {ev['gap']:+.3f} | fraction of tests: student "
          f"{ev['student_test_frac']:.3f}, at T=1 {ev['student_test_frac_t1']:.3f}, self-teacher "
          f"{ev['teacher_test_frac']:.3f}, gap {ev['gap_test_frac']:+.3f}", flush=True)
