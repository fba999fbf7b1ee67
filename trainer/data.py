"""A trial's data: problems from a source and date window, the train/validation split, the prompt sampler.

Split "tests" (the reference's): every problem trains and evaluates; training feedback comes from a seeded
fraction of its tests (its private tests where the source marks public ones; at least one), evaluation uses
all of them. Split "problems": disjoint train and validation problems; a train problem's feedback uses all
its tests. Every random choice is seeded by `data.seed` and the problem id, so a problem's train tests do
not depend on which other problems were loaded.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from sandbox.problems import Problem, ProblemTest, SandboxError
from trainer.config import DataConfig
from trainer.errors import DataError


def _natural_key(problem_id: str) -> tuple:
    """'HumanEval/2' before 'HumanEval/10': digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", problem_id) if part)


def _window_text(cfg: DataConfig) -> str:
    from sandbox.loaders import release_window

    lo, hi = release_window(cfg.release) if cfg.release else (None, None)
    if cfg.date_from:
        lo = cfg.date_from if lo is None else max(lo, cfg.date_from)
    if cfg.date_to:
        hi = cfg.date_to if hi is None else min(hi, cfg.date_to)
    where = f"[{lo or '-inf'}, {hi or '+inf'})"
    return f"release {cfg.release} {where}" if cfg.release else where


def local_problems(cfg: DataConfig) -> tuple[list[Problem] | None, str]:
    """What `load_problems(cfg)` returns, when this machine can read it without downloading anything, and where
    it was read; (None, why not) otherwise. `opsd sweep plan` counts a sweep's problems with it."""
    from sandbox.loaders import cached_livecodebench_files

    if cfg.path is not None and not Path(cfg.path).is_file():
        return None, f"data.path {cfg.path} is not on this machine"
    files = None
    if cfg.source == "livecodebench" and cfg.path is None:
        files = cached_livecodebench_files(None)
        if files is None:
            return None, "LiveCodeBench is not in this machine's Hugging Face cache"
    where = cfg.path or ("the Hugging Face cache" if files else f"the {cfg.source} package")
    return load_problems(cfg, _files=files), where


def load_problems(cfg: DataConfig, *, _files: list[Path] | None = None) -> list[Problem]:
    """The problems of `cfg.source` inside the date window, in id order, at most `cfg.max_problems`.
    (`_files`: LiveCodeBench's shards already on this machine, read instead of downloading them.)"""
    from sandbox import loaders

    if cfg.path is not None and not Path(cfg.path).is_file():
        raise DataError(f"data.path: file not found: {cfg.path}")
    try:
        if cfg.source == "humaneval":
            problems = loaders.load_humaneval(cfg.path)
        elif cfg.source == "livecodebench":
            if cfg.path is not None:
                problems = loaders.load_livecodebench_file(cfg.path)
            elif _files is not None:
                problems = [p for f in _files for p in loaders.load_livecodebench_file(f)]
            else:
                problems = loaders.load_livecodebench_hf(release=None)
        elif cfg.source == "jsonl":
            if cfg.path is None:
                raise DataError("data.path is required with data.source 'jsonl'")
            problems = loaders.load_problems_jsonl(cfg.path)
        else:
            raise DataError(f"data.source: unknown source {cfg.source!r}")
        windowed = loaders.filter_by_date(problems, release=cfg.release, date_from=cfg.date_from,
                                          date_to=cfg.date_to)
    except SandboxError as err:
        raise DataError(str(err)) from None
    if not windowed:
        dates = sorted(p.date[:10] for p in problems if p.date)
        if not problems:
            had = "no problems at all"
        elif not dates:
            had = f"{len(problems)} problems, none of them dated"
        else:
            had = f"{len(problems)} problems dated {dates[0]} to {dates[-1]}"
        raise DataError(f"no problems in the data window {_window_text(cfg)}: source {cfg.source!r} had {had}")
    no_tests = [p.id for p in windowed if not p.tests]
    if no_tests:
        raise DataError(f"problems without tests cannot be graded: {', '.join(no_tests[:5])}")
    windowed.sort(key=lambda p: _natural_key(p.id))
    if cfg.max_problems is not None:
        windowed = windowed[: cfg.max_problems]
    return windowed


@dataclass(frozen=True)
class TrainProblem:
    """A training problem and the tests whose verdicts give rewards and feedback."""

    problem: Problem
    train_tests: tuple[ProblemTest, ...]

    @property
    def id(self) -> str:
        return self.problem.id


@dataclass(frozen=True)
class Split:
    """Train problems (with their train tests) and validation problems (all their tests)."""

    kind: str
    train: tuple[TrainProblem, ...]
    val: tuple[Problem, ...]

    def summary(self) -> dict[str, Any]:
        return {
            "data/split": self.kind,
            "data/train_problems": len(self.train),
            "data/val_problems": len(self.val),
            "data/train_tests": sum(len(t.train_tests) for t in self.train),
            "data/val_tests": sum(len(p.tests) for p in self.val),
        }


def train_tests_of(problem: Problem, *, fraction: float, seed: int) -> tuple[ProblemTest, ...]:
    """A seeded `fraction` (rounded down, at least 1) of the problem's private tests, in their order.
    Public tests (shown in the statement) are drawn from only when the problem has no other tests."""
    pool = [i for i, t in enumerate(problem.tests) if not t.public] or list(range(len(problem.tests)))
    if not pool:
        raise DataError(f"problem {problem.id} has no tests")
    k = max(1, math.floor(len(pool) * fraction + 1e-9))
    chosen = sorted(random.Random(f"{seed}/tests/{problem.id}").sample(pool, k))
    return tuple(problem.tests[i] for i in chosen)


def make_split(problems: Sequence[Problem], cfg: DataConfig) -> Split:
    """Split loaded problems as `cfg.split` says; validation is capped at `cfg.max_val_problems`."""
    problems = sorted(problems, key=lambda p: _natural_key(p.id))
    if cfg.split == "tests":
        train = tuple(TrainProblem(p, train_tests_of(p, fraction=cfg.train_test_fraction, seed=cfg.seed))
                      for p in problems)
        val = list(problems)
    elif cfg.split == "problems":
        if len(problems) < 2:
            raise DataError(f"data.split 'problems' needs at least 2 problems, got {len(problems)}")
        order = list(problems)
        random.Random(f"{cfg.seed}/problems").shuffle(order)
        n_val = min(max(1, round(len(order) * cfg.val_fraction)), len(order) - 1)
        val_ids = {p.id for p in order[:n_val]}
        train = tuple(TrainProblem(p, tuple(p.tests)) for p in problems if p.id not in val_ids)
        val = [p for p in problems if p.id in val_ids]
    else:
        raise DataError(f"data.split: unknown split {cfg.split!r}")
    if cfg.max_val_problems is not None and len(val) > cfg.max_val_problems:
        picked = set(random.Random(f"{cfg.seed}/val").sample(range(len(val)), cfg.max_val_problems))
        val = [p for i, p in enumerate(val) if i in picked]
    return Split(kind=cfg.split, train=train, val=tuple(val))


T = TypeVar("T")


class PromptSampler(Generic[T]):
    """Seeded epoch-wise shuffling: each epoch visits every item once in a fresh order; a batch that runs
    past the end of an epoch continues with the next epoch's order. The state is (epoch, position), so a
    resumed trial that loads it sees exactly the batches it would have seen."""

    def __init__(self, items: Sequence[T], *, seed: int) -> None:
        if not items:
            raise DataError("no training problems to sample prompts from")
        self.items = list(items)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)
        # Identifies the item list, so a checkpoint is never resumed on other data of the same size.
        ids = "\n".join(str(getattr(item, "id", item)) for item in self.items)
        self.digest = hashlib.sha256(ids.encode()).hexdigest()[:16]

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
        return order

    def next_batch(self, prompts_per_step: int) -> list[T]:
        if prompts_per_step <= 0:
            raise ValueError("prompts_per_step must be positive")
        batch = []
        while len(batch) < prompts_per_step:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            batch.append(self.items[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "n_items": len(self.items),
                "digest": self.digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["n_items"], state["seed"], state["digest"]) != (len(self.items), self.seed, self.digest):
            raise DataError(
                f"the sampler state is for {state['n_items']} problems with seed {state['seed']}, but this trial "
                f"has {len(self.items)} problems with seed {self.seed}"
                + (" (other problem ids)" if state["n_items"] == len(self.items) and state["seed"] == self.seed else "")
                + ": the data settings changed since the checkpoint")
        if not 0 <= state["position"] <= len(self.items):
            raise DataError(f"sampler state position {state['position']} is out of range")
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._epoch_order(self.epoch)
