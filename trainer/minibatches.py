"""How one training step's rollouts split into optimizer steps (mini-batches) and micro-batches, per rank.

A pure function of counts (numpy only, no torch), so that `opsd sweep plan` can say how many optimizer steps
a training step makes without loading the training stack; trainer/student.py re-exports it.
"""

from __future__ import annotations

import math

import numpy as np


def split_minibatches(n_items: int, mini_batch_size: int, micro_batch_size: int, *,
                     rng: np.random.Generator | None, rank: int = 0, world_size: int = 1) -> list[list[list[int]]]:
    """Split one trial step's rollouts into optimizer steps and micro batches, for one rank (pure).

    Returns mini batches (one optimizer step each) → this rank's micro batches → item indices in
    [0, n_items). Items are shuffled by `rng` (None keeps their order); every rank must pass a generator in
    the same state. Each mini batch holds `mini_batch_size` items except the last; a last mini batch too
    small to give every rank an item joins the one before. A mini batch's items are dealt to ranks as evenly
    as possible and every rank gets the same number of micro batches (ZeRO-3 forwards are collective), each
    at most `micro_batch_size` items. Raises ValueError when that cannot be done without an empty micro batch.
    """
    if n_items < 0 or mini_batch_size < 1 or micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad split: n_items={n_items} mini={mini_batch_size} micro={micro_batch_size} "
                         f"rank={rank} world_size={world_size}")
    if n_items == 0:
        return []
    if n_items < world_size:
        raise ValueError(f"{n_items} items cannot give each of {world_size} ranks one")
    order = rng.permutation(n_items) if rng is not None else np.arange(n_items)
    starts = list(range(0, n_items, mini_batch_size))
    if len(starts) > 1 and n_items - starts[-1] < world_size:
        starts.pop()
    bounds = starts[1:] + [n_items]
    result = []
    for start, end in zip(starts, bounds):
        per_rank = np.array_split(order[start:end], world_size)
        n_micro = math.ceil(max(len(part) for part in per_rank) / micro_batch_size)
        if min(len(part) for part in per_rank) < n_micro:
            raise ValueError(f"a mini batch of {end - start} items over {world_size} ranks with micro batches of "
                             f"{micro_batch_size} leaves a rank an empty micro batch; use a micro batch size > 1 "
                             "or a mini batch size divisible by the world size")
        result.append([chunk.tolist() for chunk in np.array_split(per_rank[rank], n_micro)])
    return result
