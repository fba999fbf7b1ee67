"""How a trial's work and CPUs are divided among its ranks (pure functions; no torch, so the plan uses them too).

- `contiguous_share(n, rank, world_size)`: the items a rank takes of n (a step's prompts, the validation
  problems): contiguous runs in rank order, so concatenating every rank's results gives item order whatever
  the number of ranks.
- `engine_ranks(world_size, engines)`: how many ranks own a vLLM engine (every rank, or rank 0 alone).
- `rank_budgets(...)`: each rank's torch threads, whether it owns a vLLM engine, its sandbox workers, and on
  a CPU trial with an engine per rank the cores it is pinned to (trainer, engine and sandbox). vLLM's CPU
  backend otherwise binds every engine to the first cores of the machine (`VLLM_CPU_OMP_THREADS_BIND=auto`:
  the first NUMA node of the process's CPUs, minus a reserved core), so two engines would share them. On GPU
  nothing is pinned: the engine works on its rank's GPU, and a cluster scheduler that gives the trial no
  cores of its own (Ray does not) would make two trials' pins collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from trainer.options import Device, Engines


def contiguous_share(n: int, rank: int, world_size: int) -> range:
    """The indices of rank `rank`'s share of n items over `world_size` ranks: contiguous, in rank order, the
    first n % world_size ranks one item more (as numpy's array_split)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of {world_size} ranks")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def engine_ranks(world_size: int, engines: Engines) -> int:
    """How many of a trial's ranks own an engine and share its sampling, grading and evaluation."""
    return world_size if engines == "every_rank" else 1


@dataclass(frozen=True)
class RankBudget:
    """What one rank of a trial may use."""

    rank: int
    torch_threads: int
    engine: bool  # owns a vLLM engine and sandbox workers
    sandbox_workers: int  # 0 without an engine
    cores: tuple[int, ...] | None  # the CPU cores it is pinned to; None: not pinned (the process's CPUs)

    def describe(self) -> str:
        """What the rank gets, in words (without its number)."""
        where = f"cores {core_list(self.cores)}" if self.cores is not None else "not pinned"
        work = (f"vLLM engine{' bound to the same cores' if self.cores is not None else ''}, "
                f"{self.sandbox_workers} sandbox worker{'s' * (self.sandbox_workers != 1)}"
                if self.engine else "no engine")
        return f"{where}, {self.torch_threads} torch thread{'s' * (self.torch_threads != 1)}, {work}"


def rank_budgets(cpus: int | Sequence[int], *, world_size: int, engines: Engines, sandbox_workers: int,
                 device: Device) -> list[RankBudget]:
    """Each rank's budget from the trial's CPUs (the core ids the trial process may use, or a count: then the
    cores are numbered 0..count-1 within the trial's) and its sandbox workers in all.

    Torch threads: the trial's CPUs divided by its ranks (a rank's cores when pinned). Sandbox workers: all
    on rank 0 with engines 'main'; split over the ranks (at least one each) with 'every_rank'. Pinning (CPU,
    'every_rank', several ranks, known core ids): contiguous runs of the cores, one per rank (a core shared
    round-robin when there are fewer cores than ranks)."""
    ids = list(range(cpus)) if isinstance(cpus, int) else sorted(cpus)
    if not ids:
        raise ValueError("a trial needs at least one CPU")
    every = engines == "every_rank"
    pin = device == "cpu" and every and world_size > 1
    budgets = []
    for rank in range(world_size):
        cores = None
        if pin:
            cores = tuple(ids[i] for i in contiguous_share(len(ids), rank, world_size)) or (ids[rank % len(ids)],)
        threads = len(cores) if cores is not None else max(1, len(ids) // world_size)
        engine = rank < engine_ranks(world_size, engines)
        if not engine:
            workers = 0
        elif every:
            workers = max(1, len(contiguous_share(sandbox_workers, rank, world_size)))
        else:
            workers = sandbox_workers
        budgets.append(RankBudget(rank, threads, engine, workers, cores))
    return budgets


def budget_line(budgets: list[RankBudget], *, cpus: int, engines: Engines) -> str:
    """The budget in one line, as a trial prints it at start and `opsd sweep plan` shows it."""
    n = len(budgets)
    owner = "" if n == 1 else ", an engine on every rank" if engines == "every_rank" else ", an engine on rank 0"
    # Consecutive ranks with the same budget in one entry ("ranks 0-7: ... each").
    runs: list[list[RankBudget]] = []
    for budget in budgets:
        if runs and runs[-1][-1].describe() == budget.describe():
            runs[-1].append(budget)
        else:
            runs.append([budget])
    entries = [f"rank {run[0].rank}: {run[0].describe()}" if len(run) == 1 else
               f"ranks {run[0].rank}-{run[-1].rank}: {run[0].describe()} each" for run in runs]
    return f"CPU budget: {cpus} CPU{'s' * (cpus != 1)} over {n} rank{'s' * (n != 1)}{owner}: " + "; ".join(entries)


def core_list(cores: Sequence[int]) -> str:
    """'0-3,8' for [0, 1, 2, 3, 8]: the form of Linux's cpu lists and of `VLLM_CPU_OMP_THREADS_BIND`."""
    parts, start = [], None
    for i, core in enumerate(cores):
        if start is None:
            start = core
        if i + 1 == len(cores) or cores[i + 1] != core + 1:
            parts.append(str(start) if start == core else f"{start}-{core}")
            start = None
    return ",".join(parts)
