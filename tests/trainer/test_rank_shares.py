"""trainer/rank_shares.py: contiguous shares of a trial's work and each rank's CPU budget."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.rank_shares import budget_line, contiguous_share, core_list, rank_budgets


@pytest.mark.parametrize("n", [0, 1, 5, 6, 7, 32])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shares_are_numpys_array_split_in_rank_order(n, world_size):
    shares = [contiguous_share(n, rank, world_size) for rank in range(world_size)]
    assert [list(s) for s in shares] == [list(a) for a in np.array_split(np.arange(n), world_size)]
    assert [i for s in shares for i in s] == list(range(n))  # concatenated in rank order: item order


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not one of 2 ranks"):
        contiguous_share(4, 2, 2)


def test_cpu_engines_on_every_rank_pin_each_rank_to_its_own_cores():
    budgets = rank_budgets([4, 5, 6, 7, 9], world_size=2, engines="every_rank", sandbox_workers=5, device="cpu")
    assert [(b.cores, b.torch_threads, b.engine, b.sandbox_workers) for b in budgets] == [
        ((4, 5, 6), 3, True, 3), ((7, 9), 2, True, 2)]
    assert core_list(budgets[0].cores) == "4-6" and core_list((1, 2, 3, 8, 10, 11)) == "1-3,8,10-11"


def test_fewer_cores_than_ranks_share_them_round_robin_and_every_rank_keeps_a_sandbox_worker():
    budgets = rank_budgets([0, 1], world_size=3, engines="every_rank", sandbox_workers=2, device="cpu")
    assert [(b.cores, b.torch_threads, b.sandbox_workers) for b in budgets] == [((0,), 1, 1), ((1,), 1, 1),
                                                                                 ((0,), 1, 1)]


def test_engine_on_rank_0_keeps_every_sandbox_worker_and_pins_nothing():
    budgets = rank_budgets(list(range(8)), world_size=2, engines="main", sandbox_workers=6, device="cpu")
    assert [(b.cores, b.torch_threads, b.engine, b.sandbox_workers) for b in budgets] == [
        (None, 4, True, 6), (None, 4, False, 0)]


def test_gpu_ranks_are_not_pinned_and_one_rank_is_the_trial():
    gpu = rank_budgets(128, world_size=8, engines="every_rank", sandbox_workers=96, device="cuda")
    assert {(b.cores, b.torch_threads, b.engine, b.sandbox_workers) for b in gpu} == {(None, 16, True, 12)}
    one = rank_budgets([0, 1], world_size=1, engines="every_rank", sandbox_workers=2, device="cpu")
    assert [(b.cores, b.torch_threads, b.engine, b.sandbox_workers) for b in one] == [(None, 2, True, 2)]


def test_budget_line():
    budgets = rank_budgets([0, 1], world_size=2, engines="every_rank", sandbox_workers=2, device="cpu")
    assert budget_line(budgets, cpus=2, engines="every_rank") == (
        "CPU budget: 2 CPUs over 2 ranks, an engine on every rank: rank 0: cores 0, 1 torch thread, vLLM engine "
        "bound to the same cores, 1 sandbox worker; rank 1: cores 1, 1 torch thread, vLLM engine bound to the "
        "same cores, 1 sandbox worker")
    gpu = rank_budgets(128, world_size=8, engines="every_rank", sandbox_workers=96, device="cuda")
    assert budget_line(gpu, cpus=128, engines="every_rank") == (
        "CPU budget: 128 CPUs over 8 ranks, an engine on every rank: ranks 0-7: not pinned, 16 torch threads, "
        "vLLM engine, 12 sandbox workers each")
    main = rank_budgets(16, world_size=2, engines="main", sandbox_workers=12, device="cuda")
    assert budget_line(main, cpus=16, engines="main") == (
        "CPU budget: 16 CPUs over 2 ranks, an engine on rank 0: rank 0: not pinned, 8 torch threads, vLLM engine, "
        "12 sandbox workers; rank 1: not pinned, 8 torch threads, no engine")
