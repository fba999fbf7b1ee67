"""`opsd sweep collect`: the sweep's results as two Parquet files, what `opsd analyze` reads.

- `trials.parquet`: one row per grid point: the trial's trial.json (model, family, size, context, seed, initial
  student and self-teacher accuracy, gap, final accuracy, improvement, wall time, GPU-hours) or, for a trial
  that has not finished, its status; plus the sweep, attempts, hosts, code version and resolved config, the
  sweep that trained it (`trained_in`: another one for a linked trial) and `config_key`, the digest of the
  settings that decide its results (orchestrator/shared_trials.py), by which `opsd analyze` keeps a trial
  found in several sweeps' results once.
- `steps.parquet`: every step row of every trial, each (trial, step, phase) exactly once (a resumed trial
  drops the rows past its checkpoint before it appends, and collect checks it), with the trial's grid
  coordinates so a reader needs no join.
Both are written atomically; collect needs no Ray and can run while the sweep runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import SweepError
from orchestrator.shared_trials import linked_sweep, trial_file_key
from orchestrator.sweep_state import SweepState, read_step_rows
from orchestrator.sweep_status import trial_status


def collect(state: SweepState, out_dir: Path | None = None) -> tuple[Path, Path, dict[str, int]]:
    """Write trials.parquet and steps.parquet into `out_dir` (default: the sweep folder)."""
    out_dir = Path(out_dir) if out_dir else state.dir
    out_dir.mkdir(parents=True, exist_ok=True)
    trial_rows, step_rows = [], []
    for trial_id, point in state.trials.items():
        files = state.trial_files(trial_id)
        status = trial_status(state, trial_id)
        summary = files.summary() or {}
        attempts = files.attempts()
        config = files.trial_file.read_text() if files.trial_file.is_file() else None
        row: dict[str, Any] = {
            "trial_id": trial_id, "sweep": state.name, "model": summary.get("model", point["model_path"]),
            "model_label": point["model"], "model_family": summary.get("model_family", point.get("family")),
            "model_size_b": summary.get("model_size_b", point.get("size_b")), "context": point["context"],
            "seed": point["seed"], **{k: v for k, v in summary.items() if k not in ("config", "trial_id")},
            "status": summary.get("status", status.state) if summary else status.state,
            "attempts": len(attempts), "hosts": ",".join(sorted({a["host"] for a in attempts if a.get("host")})),
            "node_ids": ",".join(sorted({a["node_id"] for a in attempts if a.get("node_id")})),
            "resolved_config": json.dumps(summary["config"]) if "config" in summary else config,
            "trained_in": linked_sweep(state.links[trial_id]) if trial_id in state.links else state.name,
            "config_key": trial_file_key(files.trial_file),
        }
        trial_rows.append(row)
        seen: set[tuple[int, str]] = set()
        for step_row in read_step_rows(files.steps):
            key = (step_row["step"], step_row["phase"])
            if key in seen:
                raise SweepError(f"{files.steps}: step {key[0]} ({key[1]}) appears twice")
            seen.add(key)
            step_rows.append({"trial_id": trial_id, "model": row["model"], "model_family": row["model_family"],
                              "model_size_b": row["model_size_b"], "context": row["context"], "seed": row["seed"],
                              **{k: v for k, v in step_row.items() if k != "trial_id"}})
    trials_path, steps_path = out_dir / "trials.parquet", out_dir / "steps.parquet"
    _write(trials_path, trial_rows)
    _write(steps_path, step_rows)
    if state.remote and out_dir == state.dir:
        remote = state.remote_sweep()
        remote.push("trials.parquet")
        remote.push("steps.parquet")
    counts: dict[str, int] = {}
    for row in trial_rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return trials_path, steps_path, counts


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]) if rows else pa.table({})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
