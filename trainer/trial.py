"""One OPSD trial: build its parts, measure the initial gap, run the steps of METHOD.md section 1, evaluate.

`opsd_step` is the method, top to bottom; everything it calls is a small function elsewhere in `trainer/`.
A trial writes OUT/config.json, OUT/steps.parquet, OUT/trial.json, OUT/rollouts/step-N.jsonl and
OUT/checkpoints/, and keeps OUT/progress.json current while it runs (trainer/records.py `Progress`). Rerunning it on the same OUT resumes after the last checkpoint with the same data order and
sampling seeds, so the resumed steps reproduce an uninterrupted run's metrics (float32, CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from sandbox.executor import Executor, Limits
from sandbox.grader import GradeRequest, Grader
from trainer.batch import forward_response_logits, pack
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrialConfig, TrialConfigError
from trainer.contexts import GradedRollout, needs_hints, validate_context
from trainer.data import PromptSampler, Split, TrainProblem, load_problems, make_split
from trainer.distributed import run_local_ranks
from trainer.evaluate import evaluate
from trainer.hints import load_hints
from trainer.losses import opsd_loss, token_logps
from trainer.models import count_parameters_b, load_causal_lm, load_tokenizer, model_family, resolve_model
from trainer.prompts import drop_long_prompts, student_prompt_ids, teacher_prompts_for_group
from trainer.records import PhaseTimer, Progress, StepLog, code_version, mark_failed, mean_or_zero, write_json
from trainer.rollout import RolloutEngine
from trainer.student import Student, iter_minibatches
from trainer.teacher import EmaTeacher


@dataclass
class Sample:
    """One rollout ready for the loss: the same response after the student's and the teacher's prompts."""

    prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]
    rollout_logps: list[float]
    has_context: bool


@dataclass
class TrialParts:
    """Everything a running trial holds. Built by `build_parts`, closed by its context manager."""

    cfg: TrialConfig
    tokenizer: Any
    engine: RolloutEngine | None  # rank 0 samples and grades; other ranks only train
    student: Student
    teacher: EmaTeacher
    executor: Executor | None
    grader: Grader | None
    split: Split
    sampler: PromptSampler
    prompt_ids: dict[str, list[int]]
    hints: dict[str, str]
    pad_id: int
    model_path: Path
    # Set by every rank before an evaluation, for rank 0 to restore the engine after the teacher's turn.
    student_weights: dict[str, torch.Tensor] | None = None

    def sampling_seed(self, step: int, purpose: str) -> int:
        """A vLLM seed per (trial seed, step, purpose): a resumed step samples exactly what it sampled before."""
        digest = hashlib.sha256(f"{self.cfg.seed}/{step}/{purpose}".encode()).digest()
        return int.from_bytes(digest[:4], "little") // 2  # leaves room for vLLM's per-sample offsets

    @property
    def is_main(self) -> bool:
        return self.engine is not None

    def push_student_weights(self) -> dict[str, float]:
        """Every rank calls (reading a ZeRO-3 student is collective); rank 0 loads the weights into vLLM."""
        named = self.student.named_parameters_for_push()
        if self.engine is None:
            for _ in named:
                pass
            return {"push/seconds": 0.0}
        return self.engine.push_weights(named)

    @contextlib.contextmanager
    def teacher_weights_in_engine(self) -> Iterator[None]:
        """The EMA teacher's weights in the rollout engine for the body; the student's again afterwards.

        Rank 0 only: the student's weights come back from `student_weights`, a copy taken by every rank
        before the evaluation, since reading a ZeRO-3 student needs all ranks."""
        self.engine.push_weights(self.teacher.state_dict().items())
        try:
            yield
        finally:
            self.engine.push_weights(self.student_weights.items())


def opsd_step(parts: TrialParts, step: int, timer: PhaseTimer | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One OPSD training step (METHOD.md section 1); `timer` times its phases (a fresh one by default).

    Returns (metrics, records): the step's metrics and one record per rollout (response, verdict, feedback,
    teacher prompt); the caller logs them. Ranks other than 0 return empty ones."""
    cfg, timer = parts.cfg, timer or PhaseTimer()
    batch: list[TrainProblem] = parts.sampler.next_batch(cfg.rollout.prompts_per_step)
    if not parts.is_main:
        # Ranks other than 0 receive rank 0's samples and train on their share of each mini-batch.
        samples = broadcast_from_main(None)
        train_on_samples(parts, samples, step=step, timer=timer)
        parts.push_student_weights()
        parts.teacher.update(parts.student.named_parameters_for_push())
        return {}, []

    # 1. Rollouts: n samples per prompt from the student, whose current weights the engine holds.
    with timer("rollout"):
        groups = parts.engine.generate(
            [parts.prompt_ids[tp.id] for tp in batch], n=cfg.rollout.n_samples, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_response_tokens,
            seed=parts.sampling_seed(step, "rollout"))

    # 2. Grade every rollout on its problem's train tests: reward 1 when all pass, world feedback otherwise.
    with timer("sandbox"):
        verdicts = parts.grader.grade_many([
            GradeRequest(tp.problem, r.text, tp.train_tests, r.finish_reason == "length")
            for tp, group in zip(batch, groups) for r in group])

    # 3. The self-teacher's privileged context for each rollout, chat-templated and truncated.
    samples, context_rows, records = [], [], []
    with timer("teacher_context"):
        n = cfg.rollout.n_samples
        for k, (tp, group) in enumerate(zip(batch, groups)):
            graded = [GradedRollout(text=r.text, passed=v.passed, feedback=v.feedback)
                      for r, v in zip(group, verdicts[k * n:(k + 1) * n])]
            teacher_ids, has_context, context_metrics = teacher_prompts_for_group(
                parts.tokenizer, graded, problem=tp.problem, context=cfg.context, hint=parts.hints.get(tp.id),
                thinking=cfg.model.thinking)
            context_rows.append(context_metrics)
            for r, t_ids, keep, v in zip(group, teacher_ids, has_context, verdicts[k * n:(k + 1) * n]):
                samples.append(Sample(parts.prompt_ids[tp.id], t_ids, r.token_ids, r.logps, keep))
                records.append({"problem_id": tp.id, "response": r.text, "verdict": v.verdict,
                                "feedback": v.feedback, "has_context": keep,
                                "teacher_prompt": parts.tokenizer.decode(t_ids)})

    # 4-7. Teacher and student logits on the same response tokens, top-k reverse KL, masked token mean,
    # one AdamW step per mini-batch (the importance ratio corrects later mini-batches for the drift).
    broadcast_from_main(samples)
    loss_metrics = train_on_samples(parts, samples, step=step, timer=timer)

    # 8. Push the student's new weights into the rollout engine; move the EMA teacher towards the student.
    with timer("weight_push"):
        push_metrics = parts.push_student_weights()
    with timer("ema_update"):
        ema_metrics = parts.teacher.update(parts.student.named_parameters_for_push())

    metrics = {
        "reward": mean_or_zero([float(v.passed) for v in verdicts]),
        "train_test_frac": mean_or_zero([v.fraction_passed for v in verdicts]),
        "rollouts": len(samples),
        "response_tokens_mean": mean_or_zero([len(s.response_ids) for s in samples]),
        "truncated_fraction": mean_or_zero([float(r.finish_reason == "length") for g in groups for r in g]),
        **{key: mean_or_zero([row[key] for row in context_rows]) for key in context_rows[0]},
        **loss_metrics, **ema_metrics, "push_seconds": push_metrics["push/seconds"], **timer.metrics(),
    }
    return metrics, records


def train_on_samples(parts: TrialParts, samples: list[Sample], *, step: int, timer: PhaseTimer) -> dict[str, float]:
    """Steps 4-7 over one step's samples: mini-batches (one optimizer step each) of micro-batches."""
    cfg = parts.cfg
    rank, world_size = parts.student.dist.rank, parts.student.dist.world_size

    def split_for(r: int) -> list[list[list[int]]]:
        return iter_minibatches(len(samples), cfg.optim.mini_batch_size, cfg.optim.micro_batch_size,
                                rng=np.random.default_rng([cfg.seed, step]), rank=r, world_size=world_size)

    minibatches = split_for(rank)
    everyone = [split_for(r) for r in range(world_size)]
    loss_options = cfg.loss.model_dump()
    old_logps = None
    if len(minibatches) > 1 and cfg.loss.is_clip is not None:
        # The policy that sampled the batch, as the trainer computes it, before this step's first update.
        with timer("old_logps"), torch.no_grad():
            old_logps = {i: lp for micro in (m for mini in minibatches for m in mini)
                         for i, lp in zip(micro, _student_token_logps(parts, [samples[j] for j in micro]))}
    micro_rows: list[dict[str, float]] = []  # loss terms and metrics of each micro-batch
    mini_losses, grad_norms = [], []
    for index, mini in enumerate(minibatches):
        kept = [samples[i] for r in range(world_size) for micro in everyone[r][index] for i in micro
                if samples[i].has_context]
        # Micro-batches of all ranks add up to the mini-batch's token mean (or sequence mean); DeepSpeed
        # averages gradients over ranks, hence the factor world_size.
        if cfg.loss.aggregation == "token_mean":
            normalizer = max(sum(len(s.response_ids) for s in kept), 1) / world_size
        else:
            normalizer = max(sum(1 for s in kept if s.response_ids), 1) / world_size
        mini_loss = 0.0
        for micro in mini:
            micro_samples = [samples[i] for i in micro]
            student_batch = pack([s.prompt_ids for s in micro_samples], [s.response_ids for s in micro_samples],
                                 pad_id=parts.pad_id)
            teacher_batch = pack([s.teacher_prompt_ids for s in micro_samples],
                                 [s.response_ids for s in micro_samples], pad_id=parts.pad_id)
            with timer("teacher_forward"):
                teacher_logits = forward_response_logits(parts.teacher.forward_logits, teacher_batch)
            with timer("student_forward_backward"):
                student_logits = forward_response_logits(parts.student.forward_logits, student_batch)
                width = student_batch.response_ids.shape[1]
                loss, metrics = opsd_loss(
                    student_logits, teacher_logits, student_batch.response_ids, student_batch.response_mask,
                    torch.tensor([s.has_context for s in micro_samples]), **loss_options,
                    temperature=cfg.rollout.temperature,
                    old_logps=None if old_logps is None else _padded([old_logps[i] for i in micro], width),
                    rollout_logps=_padded([s.rollout_logps for s in micro_samples], width),
                    normalizer=normalizer)
                parts.student.backward(loss)
            mini_loss += float(loss)
            micro_rows.append({key: float(value) for key, value in metrics.items()})
        with timer("optimizer"):
            step_metrics = parts.student.step()
        mini_losses.append(mini_loss)
        grad_norms.append(step_metrics["grad_norm"] or 0.0)

    # Per-token metrics are weighted by the kept tokens of each micro-batch: the step's mean per token.
    tokens = sum(row["valid_tokens"] for row in micro_rows)

    def per_token(key: str) -> float:
        return sum(row[key] * row["valid_tokens"] for row in micro_rows) / tokens if tokens else 0.0

    return {"loss": mean_or_zero(mini_losses), "kl": per_token("divergence"),
            "is_weight_mean": per_token("is_weight_mean"), "is_clip_fraction": per_token("is_clip_fraction"), "loss_tokens": tokens, "grad_norm": mean_or_zero(grad_norms),
            "optimizer_steps": len(minibatches), "lr": step_metrics["lr"]}


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a no-op in a single process)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _student_token_logps(parts: TrialParts, samples: list[Sample]) -> list[torch.Tensor]:
    batch = pack([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id=parts.pad_id)
    logits = forward_response_logits(parts.student.forward_logits, batch)
    logps = token_logps(logits, batch.response_ids, temperature=parts.cfg.rollout.temperature)
    return [logps[i, : len(s.response_ids)].detach() for i, s in enumerate(samples)]


def _padded(rows: list, width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        values = torch.as_tensor(row, dtype=torch.float32)
        out[i, : len(values)] = values
    return out


# ------------------------------------------------------------------------------------------------ set-up


@contextlib.contextmanager
def build_parts(cfg: TrialConfig) -> Iterator[TrialParts]:
    """Load data, model, rollout engine, sandbox, student and teacher; close them all on exit."""
    validate_context(cfg.context)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    problems = load_problems(cfg.data)
    problems, skipped = drop_long_prompts(problems, tokenizer, max_tokens=cfg.rollout.max_prompt_tokens,
                                          thinking=cfg.model.thinking)
    if not problems:
        raise TrialConfigError(f"every problem's prompt is longer than rollout.max_prompt_tokens="
                               f"{cfg.rollout.max_prompt_tokens} ({skipped['data/prompts_skipped_too_long']} skipped)")
    split = make_split(problems, cfg.data)
    sampler = PromptSampler(split.train, seed=cfg.seed)
    prompt_ids = {p.id: student_prompt_ids(tokenizer, p, thinking=cfg.model.thinking) for p in problems}
    hints = load_hints(problems, cfg.context.hints_path) if needs_hints(cfg.context) else {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    with contextlib.ExitStack() as stack:
        executor = grader = engine = None
        if int(os.environ.get("RANK", "0")) == 0:
            executor, grader, engine = _start_rollout_and_sandbox(cfg, model_path, stack)
        torch.manual_seed(cfg.seed)
        model = load_causal_lm(model_path, dtype=cfg.model.dtype, device=cfg.device)
        teacher = EmaTeacher.from_model(model, ema_rate=cfg.teacher.ema_rate, offload=cfg.teacher.offload,
                                        device=cfg.device)
        student = Student(model, optim=cfg.optim, deepspeed_config=cfg.deepspeed, device=cfg.device)
        yield TrialParts(cfg=cfg, tokenizer=tokenizer, engine=engine, student=student, teacher=teacher,
                         executor=executor, grader=grader, split=split, sampler=sampler, prompt_ids=prompt_ids,
                         hints=hints, pad_id=pad_id, model_path=model_path)


def _start_rollout_and_sandbox(cfg: TrialConfig, model_path: Path,
                               stack: contextlib.ExitStack) -> tuple[Executor, Grader, RolloutEngine]:
    executor = stack.enter_context(Executor(
        cfg.sandbox.workers, isolation=cfg.sandbox.isolation, limits=Limits(memory_mb=cfg.sandbox.memory_mb)))
    grader = Grader(executor, code_block=cfg.rollout.code_block, time_limit_s=cfg.sandbox.time_limit_s)
    max_model_len = max(cfg.rollout.max_prompt_tokens, cfg.context.max_teacher_prompt_tokens) \
            + cfg.rollout.max_response_tokens
    engine = stack.enter_context(RolloutEngine(
        model_path, dtype=cfg.model.dtype, seed=cfg.seed, max_model_len=max_model_len, device=cfg.device,
        kv_cache_gib=cfg.rollout.kv_cache_gib, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization))
    return executor, grader, engine


# ------------------------------------------------------------------------------------------------ the trial


def run_trial(cfg: TrialConfig, out_dir: Path) -> dict[str, Any]:
    """Run (or resume) the trial into `out_dir`; returns the summary also written to trial.json.

    With `deepspeed.world_size` N > 1 and no launcher around this process, N local ranks are started
    (gloo on CPU, NCCL on GPU); rank 0 holds the rollout engine and the sandbox, every rank trains.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim_out_dir(cfg, out_dir)
    try:
        if cfg.deepspeed.world_size > 1 and "RANK" not in os.environ:
            results = run_local_ranks(_run_rank, cfg.deepspeed.world_size, cfg.model_dump(mode="json"),
                                      str(out_dir), device=cfg.device, timeout_s=7 * 24 * 3600)
            return results[0]
        return _run_rank(0, cfg.model_dump(mode="json"), str(out_dir))
    except BaseException as err:
        # Rank 0 reports its own failure; this catches the others (and a rank killed from outside).
        mark_failed(out_dir / "progress.json", err)
        raise


def _run_rank(rank: int, cfg_json: dict, out: str) -> dict[str, Any]:
    cfg, out_dir = TrialConfig.model_validate(cfg_json), Path(out)
    progress = Progress(out_dir / "progress.json" if int(os.environ.get("RANK", "0")) == 0 else None,
                        steps=cfg.steps)
    try:
        summary = _run_steps(cfg, out_dir, progress)
    except BaseException as err:
        progress.failed(err)
        raise
    progress.completed()
    return summary


def _run_steps(cfg: TrialConfig, out_dir: Path, progress: Progress) -> dict[str, Any]:
    started = time.time()
    log = StepLog(out_dir / "steps.parquet")
    checkpoints = out_dir / "checkpoints"
    around = progress.timer()  # the phases between steps, reported but not logged
    with build_parts(cfg) as parts:
        main = parts.is_main
        resume_from = latest_checkpoint(checkpoints)
        if resume_from is not None:
            progress.phase("resume")
            state = load_checkpoint(resume_from, student=parts.student, teacher=parts.teacher)
            parts.sampler.load_state_dict(state.sampler_state)
            parts.push_student_weights()
            first_step, initial, latest_eval = state.step + 1, state.metadata["initial_eval"], state.metadata["latest_eval"]
            log.truncate_after(state.step)
            if main:
                print(f"resuming {out_dir} after step {state.step}")
                _print_eval(state.step, latest_eval)
        else:
            first_step = 1
            with around("initial_eval"):
                initial = latest_eval = _evaluate_on_main(parts, step=0)
            if main:
                log.append(0, "eval", initial)
                log.flush()
                _print_eval(0, initial)
            with around("checkpoint"):
                _save(parts, checkpoints, 0, initial, latest_eval)

        for step in range(first_step, cfg.steps + 1):
            progress.step(step)
            metrics, records = opsd_step(parts, step, progress.timer())
            if main:
                log.append(step, "train", metrics)
                _write_rollouts(out_dir / "rollouts" / f"step-{step:06d}.jsonl", records)
                print(f"step {step}/{cfg.steps}  loss {metrics['loss']:.4f}  kl {metrics['kl']:.4f}  "
                      f"reward {metrics['reward']:.3f}  "
                      f"({sum(v for k, v in metrics.items() if k.startswith('time/')):.1f}s)", flush=True)
            if step % cfg.eval.every_steps == 0 or step == cfg.steps:
                with around("eval"):
                    latest_eval = _evaluate_on_main(parts, step=step)
                if main:
                    log.append(step, "eval", latest_eval)
                    _print_eval(step, latest_eval)
            if main:
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                with around("checkpoint"):
                    _save(parts, checkpoints, step, initial, latest_eval)

    summary = _summary(cfg, parts.model_path, initial, latest_eval, time.time() - started)
    if main:
        write_json(out_dir / "trial.json", summary)
    return summary


def _evaluate_on_main(parts: TrialParts, *, step: int) -> dict[str, Any]:
    """Rank 0 evaluates; every rank first copies the student's full weights (collective under ZeRO-3), which
    rank 0 pushes back into the engine after the self-teacher's turn, and every rank gets the metrics."""
    parts.student_weights = dict(parts.student.named_parameters_for_push())
    try:
        return broadcast_from_main(evaluate(parts, step=step) if parts.is_main else None)
    finally:
        parts.student_weights = None


def _save(parts: TrialParts, root: Path, step: int, initial: dict, latest_eval: dict) -> None:
    save_checkpoint(root, step=step, student=parts.student, teacher=parts.teacher,
                    sampler_state=parts.sampler.state_dict(),
                    metadata={"initial_eval": initial, "latest_eval": latest_eval})


def _claim_out_dir(cfg: TrialConfig, out_dir: Path) -> None:
    """Write config.json, or check that the folder holds this very trial (a resume) and not another."""
    path = out_dir / "config.json"
    resolved = cfg.model_dump(mode="json")
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != resolved:
            changed = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
            raise TrialConfigError(
                f"{out_dir} holds a trial with other settings (differing sections: {', '.join(changed)}); "
                "use another --out folder")
        return
    write_json(path, resolved)


def _write_rollouts(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _print_eval(step: int, ev: dict) -> None:
    print(f"eval @ step {step}: all tests passed: student {ev['student_acc']:.3f}, at T=1 {ev['student_acc_t1']:.3f}, "
          f"self-teacher {ev['teacher_acc']:.3f}, gap {ev['gap']:+.3f} | fraction of tests: student "
          f"{ev['student_test_frac']:.3f}, at T=1 {ev['student_test_frac_t1']:.3f}, self-teacher "
          f"{ev['teacher_test_frac']:.3f}, gap {ev['gap_test_frac']:+.3f}", flush=True)


def _summary(cfg: TrialConfig, model_path: Path, initial: dict, final: dict, seconds: float) -> dict[str, Any]:
    name = cfg.model.path
    size = cfg.model.size_b if cfg.model.size_b is not None else count_parameters_b(model_path)
    gpus = cfg.deepspeed.world_size if cfg.device == "cuda" else 0
    return {
        "trial_id": cfg.name, "model": name, "model_family": cfg.model.family or model_family(name),
        "model_size_b": size, "context": cfg.context.name, "seed": cfg.seed, "status": "completed",
        "steps": cfg.steps,
        "initial_student_acc": initial["student_acc"], "initial_teacher_acc": initial["teacher_acc"],
        "initial_student_acc_t1": initial["student_acc_t1"], "initial_gap": initial["gap"],
        "initial_student_test_frac": initial["student_test_frac"],
        "initial_teacher_test_frac": initial["teacher_test_frac"], "initial_gap_test_frac": initial["gap_test_frac"],
        "final_student_acc": final["student_acc"], "final_teacher_acc": final["teacher_acc"],
        "final_student_test_frac": final["student_test_frac"],
        "improvement": final["student_acc"] - initial["student_acc"],
        "improvement_test_frac": final["student_test_frac"] - initial["student_test_frac"],
        "accuracy_metric": "all-pass mean@n (student_acc); fraction of tests passed in *_test_frac",
        "wall_seconds": round(seconds, 1), "gpu_hours": gpus * seconds / 3600.0, "device": cfg.device,
        "config": cfg.model_dump(mode="json"), "code_version": code_version(),
    }
