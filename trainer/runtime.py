"""A trial while it runs on one rank (`TrialRuntime`) and how it is started and closed (`start_runtime`).

`start_runtime(cfg)` loads the problems and splits them (trainer/data.py), tokenises the student prompts
(trainer/prompts.py), reads the hints a context needs (trainer/hints.py), divides the trial's CPUs among its
ranks (trainer/rank_shares.py, printed at start), and on every rank that owns one (`rollout.engines`: every
rank, or rank 0 alone) starts the sandbox (`sandbox.Executor` + `sandbox.Grader`) and the vLLM rollout engine
(trainer/rollout.py), on the rank's own GPU or CPU cores; every rank builds the student (trainer/student.py,
DeepSpeed) and its EMA self-teacher (trainer/teacher.py). Leaving the context closes the engine and the
sandbox. `opsd_step` (trainer/trial.py) and `evaluate` (trainer/evaluate.py) work on the runtime; neither
builds anything.

An engine per rank is one "mp" `LLM` in each rank's process, not vLLM's `external_launcher` executor: that one
runs the engine inside the trainer's process group (its construction is a collective, closing it destroys the
trainer's default group, one engine fits per process, and on CPU it binds no cores), where separate engine
processes keep the CPU and GPU code paths and the tests' open/close cycles unchanged. What an mp engine per
rank needs is done here and in RolloutEngine: its worker on the rank's GPU (`device_ids`), its threads on the
rank's cores (`VLLM_CPU_OMP_THREADS_BIND`), distinct ports, and seeds from each sample's global index.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from sandbox.executor import Executor, Limits
from sandbox.grader import Grader
from trainer.config import TrialConfig
from trainer.contexts import needs_hints
from trainer.data import PromptSampler, Split, load_problems, make_split
from trainer.distributed import (
    all_gather_from_ranks,
    broadcast_from_main,
    init_distributed,
    rank_device,
    wait_for_main,
)
from trainer.errors import TrialConfigError
from trainer.hints import load_hints
from trainer.models import load_causal_lm, load_tokenizer, resolve_model
from trainer.prompts import drop_long_prompts, student_prompt_ids
from trainer.rank_shares import budget_line, contiguous_share, engine_ranks, rank_budgets
from trainer.rollout import RolloutEngine
from trainer.student import Student
from trainer.teacher import EmaTeacher


@dataclass
class TrialRuntime:
    """What a running trial holds on one rank: its settings, data, models and engines.

    A rank that owns an engine (every rank with `rollout.engines: every_rank`, else rank 0) samples its share
    of the prompts with it and grades them with its sandbox; elsewhere `engine` and `grader` are None and the
    rank only trains (every rank holds a student shard and a teacher).
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

    @property
    def engine_ranks(self) -> int:
        """How many ranks own an engine and share the sampling, grading and evaluation."""
        return engine_ranks(self.world_size, self.cfg.rollout.engines)

    def share(self, n: int) -> range:
        """This rank's contiguous share of n items to sample (prompts, validation problems); empty on a rank
        without an engine."""
        if self.engine is None:
            return range(0)
        return contiguous_share(n, self.rank if self.engine_ranks > 1 else 0, self.engine_ranks)

    def gather_from_engines(self, part: Any) -> list[Any]:
        """Every engine-owning rank's `part`, in rank order (so in item order, the shares being contiguous);
        called by the ranks that own an engine, on all of them at once."""
        return all_gather_from_ranks(part) if self.engine_ranks > 1 else [part]

    def share_with_all(self, parts: list[Any] | None) -> list[Any]:
        """Every rank calls: `gather_from_engines`'s result, which the ranks without an engine lack (None)."""
        return parts if self.engine_ranks > 1 else broadcast_from_main(parts)

    def sampling_seed(self, step: int, purpose: str) -> int:
        """A vLLM seed per (trial seed, step, purpose): a resumed step samples exactly what it sampled before."""
        digest = hashlib.sha256(f"{self.cfg.seed}/{step}/{purpose}".encode()).digest()
        return int.from_bytes(digest[:4], "little") // 2  # leaves room for vLLM's per-sample offsets

    def push_student_weights(self) -> dict[str, float]:
        """Every rank calls (reading a ZeRO-3 student is collective, a bucket of parameters at a time); each
        rank with an engine loads the weights into its own, waking it if it sleeps."""
        named = self.student.named_full_parameters()
        if self.engine is None:
            for _ in named:
                pass
            return {"push/seconds": 0.0}
        return self.engine.push_weights(named)

    def push_teacher_weights(self) -> dict[str, float]:
        """A rank with an engine: the EMA teacher's weights into it, which holds them until the next
        `push_student_weights` (no rank keeps a copy of the student meanwhile)."""
        return self.engine.push_weights(self.teacher.named_weights())

    def sleep_engine(self) -> None:
        """With `rollout.sleep_between_phases` (GPU), every rank's engine frees its GPU memory for the training
        phase; `push_student_weights` wakes it. Otherwise nothing happens."""
        if self.engine is not None and self.cfg.rollout.sleep_between_phases:
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
    dist = init_distributed(cfg.device, collective_timeout_s=cfg.deepspeed.collective_timeout_s,
                            main_wait_timeout_s=cfg.deepspeed.main_wait_timeout_s)
    rank = dist.rank
    cpus = sorted(os.sched_getaffinity(0))
    budgets = rank_budgets(cpus, world_size=dist.world_size, engines=cfg.rollout.engines,
                           sandbox_workers=cfg.sandbox.workers or os.cpu_count() or 1, device=cfg.device)
    if rank == 0:
        print(budget_line(budgets, cpus=len(cpus), engines=cfg.rollout.engines), flush=True)
    mine = budgets[rank]
    if mine.cores is not None:
        _pin_to_cores(mine.cores)
        torch.set_num_threads(mine.torch_threads)

    with contextlib.ExitStack() as stack:
        grader = engine = None
        if mine.engine:
            if dist.world_size > 1 and "VLLM_PORT" in os.environ:
                # vLLM scans upward from VLLM_PORT for the ports it needs: ranks starting at once from the same
                # base would race for the same ones.
                os.environ["VLLM_PORT"] = str(int(os.environ["VLLM_PORT"]) + 100 * rank)
            grader, engine = start_sandbox_and_rollout_engine(
                cfg, model_path, stack, sandbox_workers=mine.sandbox_workers, cpu_cores=mine.cores,
                device_index=dist.local_rank if cfg.device == "cuda" else None,
                label=f" (rank {rank})" if dist.world_size > 1 else "")
        wait_for_main()  # vLLM's start-up (minutes for a large model) is no collective; DeepSpeed's is
        torch.manual_seed(cfg.seed)
        model = load_causal_lm(model_path, dtype=cfg.model.dtype, device=rank_device(cfg.device))
        teacher = EmaTeacher.from_model(model, ema_rate=cfg.teacher.ema_rate, offload=cfg.teacher.offload,
                                        device=cfg.device)
        student = Student(model, optim=cfg.optim, deepspeed_config=cfg.deepspeed, device=cfg.device)
        yield TrialRuntime(cfg=cfg, rank=rank, tokenizer=tokenizer, engine=engine, grader=grader, student=student,
                           teacher=teacher, split=split, sampler=sampler, prompt_ids=prompt_ids, hints=hints,
                           data_summary=data_summary,
                           pad_id=pad_id, model_path=model_path, device=rank_device(cfg.device))


def start_sandbox_and_rollout_engine(cfg: TrialConfig, model_path: Path, stack: contextlib.ExitStack, *,
                                      sandbox_workers: int | None = None, cpu_cores: Sequence[int] | None = None,
                                      device_index: int | None = None,
                                      label: str = "") -> tuple[Grader, RolloutEngine]:
    """The sandbox (`sandbox_workers`, default `sandbox.workers`) and the engine (on the GPU `device_index` of
    this process's visible ones, or bound to `cpu_cores`; RolloutEngine), closed with `stack`."""
    executor = stack.enter_context(Executor(
        sandbox_workers or cfg.sandbox.workers, isolation=cfg.sandbox.isolation,
        limits=Limits(memory_mb=cfg.sandbox.memory_mb)))
    grader = Grader(executor, code_block=cfg.rollout.code_block, time_limit_s=cfg.sandbox.time_limit_s)
    max_model_len = max(cfg.rollout.max_prompt_tokens, cfg.context.max_teacher_prompt_tokens) \
        + cfg.rollout.max_response_tokens
    engine = stack.enter_context(RolloutEngine(
        model_path, dtype=cfg.model.dtype, seed=cfg.seed, max_model_len=max_model_len, device=cfg.device,
        kv_cache_gib=cfg.rollout.kv_cache_gib, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        enforce_eager=cfg.rollout.enforce_eager,
        weight_sync=cfg.rollout.weight_sync, sleep_mode=cfg.rollout.sleep_between_phases,
        device_index=device_index, cpu_cores=cpu_cores))
    print(f"rollout engine ready in {engine.startup_seconds:.1f} s{label}", flush=True)
    if engine.max_model_len < max_model_len:
        # As in the reference's verl runs: the training forwards read past the model's position limit (RoPE has
        # no hard end); vLLM cannot, so a sample there stops at the limit as if it hit max_tokens.
        print(f"note: prompts + responses can reach {max_model_len:,} tokens, beyond the model's "
              f"{engine.max_model_len:,} positions; vLLM samples stop at {engine.max_model_len:,} tokens in all, "
              "the training forwards read the whole sequence", flush=True)
    return grader, engine


def _pin_to_cores(cores: Sequence[int]) -> None:
    """This process's threads, and so every process and thread it starts later (its engine, its sandbox
    workers), on `cores` only."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
