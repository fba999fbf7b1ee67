"""A trial while it runs on one rank (`TrialRuntime`) and how it is started and closed (`start_runtime`).

`start_runtime(cfg)` loads the problems and splits them (trainer/data.py), tokenises the student prompts
(trainer/prompts.py), reads the hints a context needs (trainer/hints.py), and on rank 0 starts the sandbox
(`sandbox.Executor` + `sandbox.Grader`) and the vLLM rollout engine (trainer/rollout.py); every rank builds
the student (trainer/student.py, DeepSpeed) and its EMA self-teacher (trainer/teacher.py). Leaving the
context closes the engine and the sandbox. `opsd_step` (trainer/trial.py) and `evaluate`
(trainer/evaluate.py) work on the runtime; neither builds anything.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from sandbox.executor import Executor, Limits
from sandbox.grader import Grader
from trainer.config import TrialConfig
from trainer.contexts import needs_hints
from trainer.data import PromptSampler, Split, load_problems, make_split
from trainer.distributed import init_distributed, rank_device, wait_for_main
from trainer.errors import TrialConfigError
from trainer.hints import load_hints
from trainer.models import load_causal_lm, load_tokenizer, resolve_model
from trainer.prompts import drop_long_prompts, student_prompt_ids
from trainer.rollout import RolloutEngine
from trainer.student import Student
from trainer.teacher import EmaTeacher


@dataclass
class TrialRuntime:
    """What a running trial holds on one rank: its settings, data, models and engines.

    Rank 0 (`is_main`) samples with the rollout engine and grades with the sandbox; on the other ranks
    `engine` and `grader` are None and the rank only trains (every rank holds a student shard and a teacher).
    """

    cfg: TrialConfig
    rank: int
    tokenizer: Any
    engine: RolloutEngine | None
    grader: Grader | None
    student: Student
    teacher: EmaTeacher
    split: Split
    sampler: PromptSampler
    prompt_ids: dict[str, list[int]]  # the student's chat-templated prompt per problem id
    hints: dict[str, str]
    pad_id: int
    model_path: Path
    # Where this rank's student and teacher compute (`cuda:LOCAL_RANK` on GPU): every tensor the step hands to a
    # forward or to the loss is made here, since DeepSpeed's engine passes its inputs through unchanged.
    device: torch.device = torch.device("cpu")
    # What the data gave: problems loaded, dropped as over-long (`data/prompts_skipped_too_long` and their ids),
    # the split's sizes, and for a context with hints the problems without one (trial.json holds it).
    data_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def world_size(self) -> int:
        return self.student.dist.world_size

    def sampling_seed(self, step: int, purpose: str) -> int:
        """A vLLM seed per (trial seed, step, purpose): a resumed step samples exactly what it sampled before."""
        digest = hashlib.sha256(f"{self.cfg.seed}/{step}/{purpose}".encode()).digest()
        return int.from_bytes(digest[:4], "little") // 2  # leaves room for vLLM's per-sample offsets

    def push_student_weights(self) -> dict[str, float]:
        """Every rank calls (reading a ZeRO-3 student is collective, a bucket of parameters at a time); rank 0
        loads the weights into vLLM, waking the engine if it sleeps."""
        named = self.student.named_full_parameters()
        if not self.is_main:
            for _ in named:
                pass
            return {"push/seconds": 0.0}
        return self.engine.push_weights(named)

    def push_teacher_weights(self) -> dict[str, float]:
        """Rank 0: the EMA teacher's weights into the rollout engine, which holds them until the next
        `push_student_weights` (no rank keeps a copy of the student meanwhile)."""
        return self.engine.push_weights(self.teacher.named_weights())

    def sleep_engine(self) -> None:
        """With `rollout.sleep_between_phases` (GPU), rank 0's engine frees its GPU memory for the training
        phase; `push_student_weights` wakes it. Otherwise nothing happens."""
        if self.is_main and self.cfg.rollout.sleep_between_phases:
            self.engine.sleep()


@contextlib.contextmanager
def start_runtime(cfg: TrialConfig) -> Iterator[TrialRuntime]:
    """Load data, model, rollout engine, sandbox, student and teacher; close them all on exit."""
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    loaded = load_problems(cfg.data)
    problems, skipped = drop_long_prompts(loaded, tokenizer, max_tokens=cfg.rollout.max_prompt_tokens,
                                          thinking=cfg.model.thinking)
    if not problems:
        raise TrialConfigError(f"every problem's prompt is longer than rollout.max_prompt_tokens="
                               f"{cfg.rollout.max_prompt_tokens} ({skipped['data/prompts_skipped_too_long']} skipped)")
    split = make_split(problems, cfg.data)
    sampler = PromptSampler(split.train, seed=cfg.seed)
    prompt_ids = {p.id: student_prompt_ids(tokenizer, p, thinking=cfg.model.thinking) for p in problems}
    # A built-in llm_peer_hints tells the teacher "Correct solution:": its hints must have passed their tests.
    hints = (load_hints(problems, cfg.context.hints_path, require_graded=cfg.context.template is None)
             if needs_hints(cfg.context) else {})
    data_summary = {"data/problems_loaded": len(loaded), **skipped, **split.summary(),
                    **({"data/problems_without_hint": sum(1 for p in problems if not hints[p.id].strip())}
                       if needs_hints(cfg.context) else {})}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # First of all, so that "cuda" is this rank's GPU before anything is loaded onto it.
    rank = init_distributed(cfg.device, collective_timeout_s=cfg.deepspeed.collective_timeout_s,
                            main_wait_timeout_s=cfg.deepspeed.main_wait_timeout_s).rank

    with contextlib.ExitStack() as stack:
        grader = engine = None
        if rank == 0:
            grader, engine = start_sandbox_and_rollout_engine(cfg, model_path, stack)
        wait_for_main()  # vLLM's start-up (minutes for a large model) is rank 0's alone; DeepSpeed's is collective
        torch.manual_seed(cfg.seed)
        model = load_causal_lm(model_path, dtype=cfg.model.dtype, device=rank_device(cfg.device))
        teacher = EmaTeacher.from_model(model, ema_rate=cfg.teacher.ema_rate, offload=cfg.teacher.offload,
                                        device=cfg.device)
        student = Student(model, optim=cfg.optim, deepspeed_config=cfg.deepspeed, device=cfg.device)
        yield TrialRuntime(cfg=cfg, rank=rank, tokenizer=tokenizer, engine=engine, grader=grader, student=student,
                           teacher=teacher, split=split, sampler=sampler, prompt_ids=prompt_ids, hints=hints,
                           data_summary=data_summary,
                           pad_id=pad_id, model_path=model_path, device=rank_device(cfg.device))


def start_sandbox_and_rollout_engine(cfg: TrialConfig, model_path: Path,
                                      stack: contextlib.ExitStack) -> tuple[Grader, RolloutEngine]:
    executor = stack.enter_context(Executor(
        cfg.sandbox.workers, isolation=cfg.sandbox.isolation, limits=Limits(memory_mb=cfg.sandbox.memory_mb)))
    grader = Grader(executor, code_block=cfg.rollout.code_block, time_limit_s=cfg.sandbox.time_limit_s)
    max_model_len = max(cfg.rollout.max_prompt_tokens, cfg.context.max_teacher_prompt_tokens) \
        + cfg.rollout.max_response_tokens
    engine = stack.enter_context(RolloutEngine(
        model_path, dtype=cfg.model.dtype, seed=cfg.seed, max_model_len=max_model_len, device=cfg.device,
        kv_cache_gib=cfg.rollout.kv_cache_gib, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        enforce_eager=cfg.rollout.enforce_eager,
        weight_sync=cfg.rollout.weight_sync, sleep_mode=cfg.rollout.sleep_between_phases))
    print(f"rollout engine ready in {engine.startup_seconds:.1f} s", flush=True)
    if engine.max_model_len < max_model_len:
        # As in the reference's verl runs: the training forwards read past the model's position limit (RoPE has
        # no hard end); vLLM cannot, so a sample there stops at the limit as if it hit max_tokens.
        print(f"note: prompts + responses can reach {max_model_len:,} tokens, beyond the model's "
              f"{engine.max_model_len:,} positions; vLLM samples stop at {engine.max_model_len:,} tokens in all, "
              "the training forwards read the whole sequence", flush=True)
    return grader, engine
