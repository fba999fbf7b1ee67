"""torch.distributed for the trainer: one process without a launcher, or N local ranks for tests.

DeepSpeed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; when they are missing it goes
looking for MPI, so `init_distributed` sets them (world size 1, a free local port) before anything calls
`deepspeed.initialize`. CPU uses gloo, GPU uses NCCL. `run_local_ranks` starts N processes on this machine
(torch.multiprocessing, spawn), each with the environment of one rank, and returns what each rank returned.

Two process groups, two timeouts. The default group (NCCL on GPU) carries the training collectives
(gradient all-reduce, ZeRO gathers, DeepSpeed's barriers): each takes seconds, and its `collective_timeout_s`
lets the NCCL watchdog end a rank whose peer hangs. But rank 0 also works alone for long stretches (starting
vLLM, sampling and grading a step's rollouts, an evaluation: tens of minutes at 32k tokens; writing and
fsyncing a checkpoint) while the other ranks wait for it. Those waits go through a second group, gloo over
TCP with `main_wait_timeout_s` (default a day): `broadcast_from_main`, `wait_for_main` and
`all_gather_from_ranks` (with an engine on every rank, each rank's share of the rollouts) use it, so a long
rank-0 phase never sits inside an NCCL collective, and the next training collective starts only when every
rank has arrived. A rank that dies still ends the others' wait at once (gloo sees its sockets close).
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from trainer.errors import DistributedError
from trainer.options import Device

# The defaults of DeepSpeedConfig.collective_timeout_s and .main_wait_timeout_s (trainer/config.py).
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
DEFAULT_MAIN_WAIT_TIMEOUT_S = 24 * 3600.0

# The gloo group ranks wait for rank 0 in (see the module docstring); None in a single process.
_main_wait_group: Any = None


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_for(device: Device) -> str:
    if device == "cpu":
        return "gloo"
    elif device == "cuda":
        return "nccl"
    else:
        raise DistributedError(f"unknown device {device!r}")


def set_single_process_env() -> None:
    """Fill in the rank variables of a lone process; variables a launcher already set are kept."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def init_distributed(device: Device = "cpu", *, collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
                     main_wait_timeout_s: float = DEFAULT_MAIN_WAIT_TIMEOUT_S) -> DistInfo:
    """Initialise the default process group and the group that waits for rank 0, once (idempotent), through
    DeepSpeed's comm layer.

    Works without any launcher (world size 1) and under `run_local_ranks`, torchrun or Ray (which set the
    variables). On CUDA it first selects the GPU of LOCAL_RANK, so that "cuda" means this rank's GPU.
    Without a timeout DeepSpeed would give its default group 10 minutes (`DEEPSPEED_TIMEOUT`), which one
    evaluation on rank 0 outlasts.
    """
    import deepspeed
    import torch
    import torch.distributed as torch_dist

    from trainer.build_locks import clear_stale_build_locks

    global _main_wait_group
    set_single_process_env()
    backend = backend_for(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        clear_stale_build_locks()  # else a build stopped in an earlier run makes this wait forever
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=collective_timeout_s))
        if torch_dist.get_world_size() > 1:
            # Collective: every rank creates it, right after the default group.
            _main_wait_group = torch_dist.new_group(backend="gloo", timeout=timedelta(seconds=main_wait_timeout_s))
    return DistInfo(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), local_rank=local_rank,
                    backend=torch_dist.get_backend())


def rank_device(device: Device) -> "torch.device":
    """The torch device this rank computes on: the CPU, or its own GPU (`cuda:LOCAL_RANK`, never the bare
    "cuda", which means whichever GPU is current)."""
    import torch

    if device == "cpu":
        return torch.device("cpu")
    elif device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        raise DistributedError(f"unknown device {device!r}")


def teardown_distributed() -> None:
    """Destroy the process groups if there are any (safe to call twice)."""
    import torch.distributed as torch_dist

    global _main_wait_group
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()  # every group, the wait group included
    _main_wait_group = None


def wait_for_main() -> None:
    """Every rank waits here until all arrive, with the long timeout of the wait group: called after a phase
    rank 0 runs alone, before the next collective of the default group (a no-op in a single process)."""
    import torch.distributed as torch_dist

    if _main_wait_group is not None:
        torch_dist.barrier(group=_main_wait_group)


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank, through the wait group: the other ranks may wait here for as long as rank
    0 works alone (a no-op in a single process)."""
    import torch.distributed as torch_dist

    if _main_wait_group is None:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0, group=_main_wait_group)
    return box[0]


def all_gather_from_ranks(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank, through the wait group: a rank that finishes its share
    of the rollouts or of an evaluation first waits here for the slowest ([obj] in a single process)."""
    import torch.distributed as torch_dist

    if _main_wait_group is None:
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj, group=_main_wait_group)
    return out


def get_rank() -> int:
    """This process's trainer rank: the process group's once it is initialised, before that the launcher's
    RANK variable (run_local_ranks, torchrun and Ray set it), else 0. The one answer to "am I rank 0"."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _rank_entry(local_rank: int, fn: Callable, args: tuple, world_size: int, port: int, device: Device,
                results: Any, torch_threads: int | None, timeouts: dict[str, float]) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    try:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        init_distributed(device, **timeouts)
        try:
            value = fn(local_rank, *args)
        finally:
            teardown_distributed()
        # Bytes, not tensors: torch.multiprocessing would pass tensors as shared-memory handles that die
        # with this process before the parent has read them.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((local_rank, True, buffer.getvalue()))
    except BaseException:  # the parent re-raises with this text; a bare exit code would hide the cause
        results.put((local_rank, False, traceback.format_exc()))
        raise


def run_local_ranks(fn: Callable[..., Any], world_size: int, *args: Any, device: Device = "cpu",
                    torch_threads: int | None = None, timeout_s: float = 600.0,
                    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
                    main_wait_timeout_s: float = DEFAULT_MAIN_WAIT_TIMEOUT_S) -> list[Any]:
    """Run `fn(rank, *args)` on `world_size` spawned local processes; return their results in rank order.

    `fn` must be importable by name (a module-level function) and its result picklable. Each rank gets the
    environment variables, initialised process groups (gloo on CPU; the timeouts of `init_distributed`) and
    a clean teardown; `torch_threads` sets each rank's torch threads. A failing rank raises DistributedError
    carrying that rank's traceback. `timeout_s` bounds the whole run.
    """
    import queue
    import time

    import torch
    import torch.multiprocessing as mp

    if world_size < 1:
        raise DistributedError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    timeouts = {"collective_timeout_s": collective_timeout_s, "main_wait_timeout_s": main_wait_timeout_s}
    workers = [ctx.Process(target=_rank_entry,
                           args=(rank, fn, args, world_size, port, device, results, torch_threads, timeouts))
               for rank in range(world_size)]
    for worker in workers:
        worker.start()
    collected: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        # Read before joining: a rank blocks in put() until its (possibly large) result is consumed.
        while len(collected) + len(failures) < world_size:
            if time.monotonic() > deadline:
                if not failures:
                    failures[-1] = f"ranks did not finish within {timeout_s:.0f} s"
                break
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, w in enumerate(workers) if w.exitcode not in (None, 0)
                        and r not in failures and r not in collected]
                if dead and results.empty():
                    failures[dead[0]] = f"exited with code {workers[dead[0]].exitcode}"
                continue
            if ok:
                collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                failures[rank] = value
                # The others either fail soon (their peer is gone) or wait forever in a collective: give them
                # a moment to report, so the first cause is among the messages, then kill them below.
                deadline = min(deadline, time.monotonic() + 5.0)
        for worker in workers:
            worker.join(5.0 if failures else max(1.0, deadline - time.monotonic()))
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
    if failures or len(collected) != world_size:
        raise DistributedError("\n".join(f"rank {r} failed:\n{text}" if r >= 0 else text
                                         for r, text in sorted(failures.items()))
                               or f"only ranks {sorted(collected)} returned")
    return [collected[rank] for rank in range(world_size)]
