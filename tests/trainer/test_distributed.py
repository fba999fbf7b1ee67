"""The trainer's process groups: each rank's own GPU before anything is loaded, the timeouts a trial asks for,
and the group the other ranks wait for rank 0 in."""

from __future__ import annotations

import datetime

import pytest
import torch

from trainer import runtime
from trainer.config import TrialConfig
from trainer.distributed import DistInfo, all_gather_from_ranks, rank_device, run_local_ranks


def test_a_ranks_device_is_its_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("cuda") == torch.device("cuda", 3)  # "cuda" alone would be whichever GPU is current
    assert rank_device("cpu") == torch.device("cpu")


def test_the_process_groups_exist_before_the_model_is_loaded_onto_the_ranks_gpu(tiny_model_dir, monkeypatch):
    """Under torchrun or Ray (RANK set), rank 3 must select cuda:3 (init_distributed does) before the model is
    loaded, and load it there: loading onto "cuda" first puts every rank's copy on GPU 0. Its vLLM engine
    (one on every rank) starts before, on the same GPU: an "mp" engine's worker would otherwise use the first."""
    calls = []

    class Loaded(Exception):
        pass

    def init(device, **timeouts):
        calls.append(("init", device, timeouts))
        return DistInfo(rank=3, world_size=4, local_rank=3, backend="nccl")

    def engine(cfg, model_path, stack, **kwargs):
        calls.append(("engine", kwargs["device_index"], kwargs["cpu_cores"]))
        return None, None

    def load(path, *, dtype, device):
        calls.append(("load", device))
        raise Loaded

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(runtime, "init_distributed", init)
    monkeypatch.setattr(runtime, "load_causal_lm", load)
    monkeypatch.setattr(runtime, "wait_for_main", lambda: calls.append(("wait",)))
    monkeypatch.setattr(runtime, "start_sandbox_and_rollout_engine", engine)
    cfg = TrialConfig.model_validate({"model": {"path": str(tiny_model_dir)}, "data": {"max_problems": 2},
                                      "deepspeed": {"collective_timeout_s": 60, "main_wait_timeout_s": 7200}})
    cfg = cfg.model_copy(update={"device": "cuda"})  # the config refuses nothing here; no GPU is touched
    with pytest.raises(Loaded), runtime.start_runtime(cfg):
        pass
    assert calls == [("init", "cuda", {"collective_timeout_s": 60, "main_wait_timeout_s": 7200}),
                     ("engine", 3, None), ("wait",), ("load", torch.device("cuda", 3))]


def _sleep_on_rank_0_then_train(rank: int, seconds: float) -> float:
    """Rank 0 works alone for `seconds` (longer than the training timeout), then both ranks all-reduce."""
    import time

    import torch.distributed as dist

    from trainer.distributed import broadcast_from_main

    if rank == 0:
        time.sleep(seconds)
    value = broadcast_from_main("from rank 0" if rank == 0 else None)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # a training collective: both ranks arrive together
    assert value == "from rank 0"
    return float(total)


def test_waiting_for_rank_0_is_not_bound_by_the_training_timeout():
    """Two gloo ranks whose training collectives time out after 2 s: rank 0 works alone for 5 s, rank 1 waits
    for it in the wait group (timeout an hour), then they all-reduce as training does."""
    started = datetime.datetime.now()
    totals = run_local_ranks(_sleep_on_rank_0_then_train, 2, 5.0, collective_timeout_s=2.0, main_wait_timeout_s=3600,
                             timeout_s=120)
    assert totals == [3.0, 3.0] and (datetime.datetime.now() - started).total_seconds() > 5


def _broadcast_in_default_group(rank: int, seconds: float) -> None:
    import time

    import torch.distributed as dist

    if rank == 0:
        time.sleep(seconds)
    dist.broadcast_object_list([None], src=0)


def test_the_training_timeout_applies_to_the_default_group():
    """The same wait in a training collective fails after the training timeout: what a rank 0 evaluation
    inside an NCCL collective did (10 minutes, DeepSpeed's default)."""
    from trainer.errors import DistributedError

    with pytest.raises(DistributedError, match="(?i)timed out|timeout"):
        run_local_ranks(_broadcast_in_default_group, 2, 6.0, collective_timeout_s=2.0, timeout_s=120)


def _gather_after(rank: int, seconds: float) -> list:
    """Rank 1 finishes its share `seconds` later than rank 0 (past the training timeout); both gather."""
    import time

    from trainer.distributed import all_gather_from_ranks

    if rank == 1:
        time.sleep(seconds)
    return all_gather_from_ranks({"rank": rank, "items": list(range(rank + 2))})


def test_every_rank_gets_every_ranks_share_in_rank_order():
    """The gather of each engine's share goes through the wait group: a slower rank is waited for beyond the
    training timeout; a single process gets its own share alone."""
    gathered = run_local_ranks(_gather_after, 2, 3.0, collective_timeout_s=1.0, timeout_s=120)
    assert gathered == [[{"rank": 0, "items": [0, 1]}, {"rank": 1, "items": [0, 1, 2]}]] * 2
    assert all_gather_from_ranks("alone") == ["alone"]
