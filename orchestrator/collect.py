"""`opsd sweep collect`: the sweep's results as two Parquet files, what `opsd analyze` reads.

- `trials.parquet`: one row per grid point: the trial's trial.json (model, family, size, context, seed, initial
  student and self-teacher accuracy, gap, final accuracy, improvement, wall time, GPU-hours) or, for a trial
  that has not finished, its status; plus the sweep, attempts, hosts, code version and resolved config, the
  sweep that trained it (`trained_in`: another one for a linked trial) and `config_key`, the digest of the
  settings that decide its results (orchestrator/shared_trials.py), by which `opsd analyze` keeps a trial
  found in several sweeps' results once. A sweep screened first (a guided sweep, or a folder whose screen/
  screen.json holds predictions) adds `screened_gap`, the prediction made before the trial trained
  (`predicted_improvement`, `pi_lo`, `pi_hi`, `prediction_law`), a guided sweep also `planned_hours` (the
  plan's device-hours, the budget's unit) and `guided_stopped` (why its searcher stopped), for `opsd analyze`'s
  predicted-vs-realized section.
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
from orchestrator.sweep_state import SweepState, read_guided, read_step_rows
from orchestrator.sweep_status import trial_status


def collect(state: SweepState, out_dir: Path | None = None) -> tuple[Path, Path, dict[str, int]]:
    """Write trials.parquet and steps.parquet into `out_dir` (default: the sweep folder)."""
    out_dir = Path(out_dir) if out_dir else state.dir
    out_dir.mkdir(parents=True, exist_ok=True)
    trial_rows, step_rows = [], []
    screened = _screen_rows(state)
    stopped = read_guided(state.dir).get("stopped") if state.guided is not None else None
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
        row.update(_prediction(state, trial_id, point, screened))
        if state.guided is not None:
            row.update(planned_hours=(state.guided.get("hours") or {}).get(trial_id), guided_stopped=stopped)
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


def _screen_rows(state: SweepState) -> dict[tuple[str, str], dict[str, Any]]:
    """The screen's rows in the sweep folder by (model label or path, context); {} without a screen."""
    path = state.dir / "screen" / "screen.json"
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text()).get("rows") or []
    return {(r.get("model_label") or r["model"], r["context"]): r for r in rows}


def _prediction(state: SweepState, trial_id: str, point: dict[str, Any],
                screened: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """The trial's screened gap and the prediction made before it trained: a guided sweep's prediction.json,
    else the screen's own prediction (`opsd screen --law`) of its configuration."""
    row = screened.get((point["model"], point["context"])) or screened.get((point["model_path"], point["context"]))
    out: dict[str, Any] = {}
    if row is not None:
        out["screened_gap"] = row["initial_gap"]
        if row.get("predicted_improvement") is not None:
            out.update(predicted_improvement=row["predicted_improvement"], pi_lo=row["pi_lo"], pi_hi=row["pi_hi"],
                       prediction_law=f"screen ({row.get('law')})")
    path = state.trial_files(trial_id).dir / "prediction.json"
    if state.guided is not None:
        saved = json.loads(path.read_text()) if path.is_file() else {}
        p = saved.get("prediction")
        out.update(predicted_improvement=p and p["predicted_improvement"], pi_lo=p and p["pi_lo"],
                   pi_hi=p and p["pi_hi"], prediction_law=p and p["law"])
    return out


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]) if rows else pa.table({})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
