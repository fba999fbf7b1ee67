"""What a trial writes: one row per step and phase (`steps.parquet`), one summary (`trial.json`).

Files are replaced atomically (write beside, then rename), so a trial killed mid-write leaves the previous
complete file; a resumed trial drops rows past its checkpoint before appending, so no step is duplicated.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

# Bumped when a column changes meaning; readers check it.
STEPS_SCHEMA_VERSION = 1


def mean_or_zero(values) -> float:
    """Mean of a metric's values; 0 for none (an empty batch logs 0, not NaN)."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


class StepLog:
    """The rows of `steps.parquet`, kept in memory and rewritten whole after each step (a few KB)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            self.rows = pq.read_table(path).to_pylist()

    def truncate_after(self, step: int) -> None:
        """Forget rows of steps later than `step` (they ran after the checkpoint a resume starts from)."""
        self.rows = [row for row in self.rows if row["step"] <= step]

    def append(self, step: int, phase: str, metrics: dict[str, Any]) -> None:
        self.rows.append({"step": step, "phase": phase, "schema_version": STEPS_SCHEMA_VERSION, **metrics})

    def flush(self) -> None:
        # Rows of different phases carry different metrics: the union of columns, nulls where absent.
        columns = sorted({key for row in self.rows for key in row}, key=_column_order)
        table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in self.rows])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.path, sink.getvalue().to_pybytes())


def _column_order(name: str) -> tuple[int, str]:
    first = ("trial_id", "step", "phase")
    return (first.index(name), "") if name in first else (len(first), name)


class PhaseTimer:
    """Wall-clock seconds per named phase of one step: `with timer("rollout"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{phase}_s": round(sec, 4) for phase, sec in self.seconds.items()}
