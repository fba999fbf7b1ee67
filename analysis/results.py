"""Loading and validating sweep results: `trials.parquet` (one row per trial) and `steps.parquet`.

trials.parquet needs the columns in `TRIAL_COLUMNS`; only rows with status "completed" count, and any other
columns (the orchestrator adds GPU-hours, config, code version, ...) are ignored. steps.parquet, used only by
the dynamics figure, needs `STEP_COLUMNS`; `model`, `model_family`, `context` and `seed` are taken from it when
present, else joined from trials.parquet through `trial_id`.

Several results (sweeps) are read as one by `load_all_results`, each trial kept once: `opsd sweep collect`
writes `trained_in` (the sweep that trained a trial; another one for a trial linked from it) and `config_key`
(the digest of the settings that decide its results), so a trial seen in two sweeps' results is recognised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.errors import AnalysisError

TRIAL_COLUMNS: dict[str, str] = {
    "model": "str",
    "model_family": "str",
    "model_size_b": "float",
    "context": "str",
    "seed": "int",
    "initial_student_acc": "float",
    "initial_teacher_acc": "float",
    "initial_gap": "float",
    "final_student_acc": "float",
    "improvement": "float",
    "status": "str",
}
STEP_COLUMNS: dict[str, str] = {
    "trial_id": "str",
    "step": "int",
    "phase": "str",
    "student_acc": "float",
    "teacher_acc": "float",
}
# Columns that identify a trial's place in the grid; steps.parquet may carry them or borrow them from trials.
STEP_JOIN_COLUMNS = ("model", "model_family", "model_size_b", "context", "seed")
# steps.parquet columns renamed by the trainer (old -> new); files written before are read under the new names
# for one version.
RENAMED_STEP_COLUMNS = {"is_weight_mean": "importance_weight_mean", "is_clip_fraction": "importance_clip_fraction"}
COMPLETED = "completed"


def read_table(path: Path, *, what: str) -> pd.DataFrame:
    """One table from .parquet, .csv, .json or .jsonl, chosen by the file's suffix.

    A .json file holds a list of records or one record (a trial's trial.json is one row)."""
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"{what} not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            records = json.loads(path.read_text())
            return pd.DataFrame([records] if isinstance(records, dict) else records)
    except (OSError, ValueError) as err:  # pyarrow and pandas raise subclasses of these on corrupt files
        raise AnalysisError(f"cannot read {what} {path}: {str(err).splitlines()[0]}") from err
    raise AnalysisError(f"{what} {path}: unknown format {suffix!r} (use .parquet, .csv, .json or .jsonl)")


# The two accuracy measures a trial reports (METHOD.md section 4): all tests passed (the default columns) and
# the fraction of tests passed (`*_test_frac`). `use_measure` puts the chosen one under the default names.
MEASURES = ("all_pass", "tests")
_TEST_FRAC_COLUMNS = {
    "initial_student_acc": "initial_student_test_frac", "initial_teacher_acc": "initial_teacher_test_frac",
    "initial_gap": "initial_gap_test_frac", "final_student_acc": "final_student_test_frac",
    "improvement": "improvement_test_frac", "student_acc": "student_test_frac", "teacher_acc": "teacher_test_frac",
    "gap": "gap_test_frac", "initial_student_acc_t1": "initial_student_test_frac_t1",
    "student_acc_t1": "student_test_frac_t1",
}
# How each measure is named on axes and in tables.
MEASURE_NAMES = {"all_pass": "all tests passed", "tests": "fraction of tests passed"}


def use_measure(frame: pd.DataFrame | None, measure: str) -> pd.DataFrame | None:
    """`frame` with the columns of `measure` under the default names ('all_pass': unchanged)."""
    if frame is None or measure == "all_pass":
        return frame
    if measure != "tests":
        raise AnalysisError(f"unknown accuracy measure {measure!r}; measures: {', '.join(MEASURES)}")
    frame = frame.copy()
    for name, test_frac in _TEST_FRAC_COLUMNS.items():
        if test_frac in frame.columns:
            frame[name] = frame[test_frac]
    return frame


def load_results(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read RESULTS (a folder holding trials.parquet and maybe steps.parquet, or a trials file itself).

    Returns `(trials, steps)`: all trial rows as stored (validate with `completed_trials`), and the step rows
    or None when there is no steps.parquet beside the trials.
    """
    path = Path(path)
    if path.is_dir():
        trials_path = path / "trials.parquet"
        if not trials_path.is_file():
            if any(path.glob("**/trial.json")):
                return collect_trial_folders(path)
            raise AnalysisError(f"{path} holds no trials.parquet and no trial folders (*/trial.json)")
    elif path.exists():
        trials_path = path
    else:
        raise AnalysisError(f"results not found: {path}")
    trials = read_table(trials_path, what="trials file")
    steps_path = trials_path.parent / "steps.parquet"
    steps = read_steps(steps_path) if steps_path.is_file() else None
    return trials, steps


def load_all_results(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame | None, int]:
    """Several RESULTS (each read by `load_results`) as one, every trial once; returns (trials, steps, the rows
    left out as a trial already read).

    With several results each row's `trial_id` gets its result's folder name in front (two sweeps may use the
    same ids), and a trial found twice is kept where it is first read: the same `trained_in` and trial id (a
    trial one sweep trained and another linked), or the same model, context, seed and `config_key` (the same
    settings trained twice)."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        trials, steps = load_results(paths[0])
        return trials, steps, 0
    all_trials, all_steps, seen_labels = [], [], set()
    for i, path in enumerate(paths):
        trials, steps = load_results(path)
        label = (path if path.is_dir() else path.parent).name or f"results{i}"
        label = label if label not in seen_labels else f"{label}-{i}"
        seen_labels.add(label)
        own_ids = trials["trial_id"].astype(str) if "trial_id" in trials.columns else \
            pd.Series([f"row{j}" for j in range(len(trials))], index=trials.index)
        all_trials.append(trials.assign(trial_id=label + "/" + own_ids, source_trial_id=own_ids))
        if steps is not None and "trial_id" in steps.columns:
            all_steps.append(steps.assign(trial_id=label + "/" + steps["trial_id"].astype(str)))
    trials = pd.concat(all_trials, ignore_index=True)
    duplicate = np.zeros(len(trials), dtype=bool)
    for columns in (("trained_in", "source_trial_id"), ("config_key", "model", "context", "seed")):
        if columns[0] not in trials.columns:
            continue
        known = trials[columns[0]].notna().to_numpy()
        keys = pd.Series(["\x1f".join(str(v) for v in row) for row in trials[list(columns)].itertuples(index=False)])
        duplicate |= known & keys.duplicated().to_numpy()
    kept = trials.loc[~duplicate].drop(columns="source_trial_id").reset_index(drop=True)
    steps = pd.concat(all_steps, ignore_index=True) if all_steps else None
    return kept, steps, int(duplicate.sum())


def decodings(trials: pd.DataFrame) -> dict[str, str | None]:
    """The decodings the trials' evaluations used, when every trial used the same: {"train": "T=1, top-p 1"
    (the self-teacher and the student's attempts for the gap), "validation": "T=0.6, top-p 0.95" (the
    student's mean@n)}; None where the results do not say (no resolved config) or the trials differ."""
    configs = []
    for column in ("resolved_config", "config"):
        if column in trials.columns:
            for value in trials[column].dropna():
                try:  # a JSON dump of the resolved config, its trial.yaml (YAML) or, from trial.json, a mapping
                    configs.append(yaml.safe_load(value) if isinstance(value, str) else dict(value))
                except (TypeError, ValueError, yaml.YAMLError):
                    continue
            break

    def one(describe) -> str | None:
        try:
            found = {describe(c) for c in configs}
        except (KeyError, TypeError):
            return None
        return found.pop() if len(found) == 1 else None

    return {"train": one(lambda c: f"T={c['eval']['teacher_temperature']:g}, top-p {c['rollout']['top_p']:g}"),
            "validation": one(lambda c: f"T={c['eval']['temperature']:g}, top-p {c['eval']['top_p']:g}")}


def read_steps(path: Path) -> pd.DataFrame:
    """A steps file, with columns of an older trainer under their current names (`RENAMED_STEP_COLUMNS`)."""
    steps = read_table(path, what="steps file")
    old = {o: n for o, n in RENAMED_STEP_COLUMNS.items() if o in steps.columns and n not in steps.columns}
    return steps.rename(columns=old)


def collect_trial_folders(root: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Trials and steps of the `opsd trial` output folders below `root` (each holds trial.json and
    steps.parquet); a folder's path relative to `root` is its trial_id."""
    trials, steps = [], []
    for summary in sorted(root.glob("**/trial.json")):
        trial_id = summary.parent.relative_to(root).as_posix() or summary.parent.name
        record = read_table(summary, what="trial summary").assign(trial_id=trial_id)
        trials.append(record)
        step_file = summary.parent / "steps.parquet"
        if step_file.is_file():
            steps.append(read_steps(step_file).assign(trial_id=trial_id))
    return pd.concat(trials, ignore_index=True), (pd.concat(steps, ignore_index=True) if steps else None)


def _row_names(frame: pd.DataFrame, mask: np.ndarray, limit: int = 5) -> str:
    """Rows named by trial_id when there is one, else by their 0-based position in the file."""
    if "trial_id" in frame.columns:
        names = [f"trial_id={v}" for v in frame.loc[mask, "trial_id"].astype(str)]
    else:
        names = [f"row {i}" for i in np.flatnonzero(mask)]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def completed_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The completed trials, checked and typed, with the columns of `TRIAL_COLUMNS` (+ trial_id if present).

    Raises AnalysisError naming missing columns, the rows holding NaN or non-numeric values, duplicate
    (model, context, seed) trials, a model listed under two families or sizes, or an empty result.
    """
    missing = [c for c in TRIAL_COLUMNS if c not in trials.columns]
    if missing:
        raise AnalysisError(f"trials file lacks column(s): {', '.join(missing)}")
    frame = trials.reset_index(drop=True)
    done = frame["status"].astype(str).str.lower().eq(COMPLETED).to_numpy()
    if not done.any():
        statuses = ", ".join(sorted(frame["status"].astype(str).unique())) or "none"
        raise AnalysisError(f"no completed trials ({len(frame)} row(s), statuses: {statuses})")
    keep = [c for c in ("trial_id", *TRIAL_COLUMNS) if c in frame.columns]
    out = frame.loc[done, keep].copy()
    for col, kind in TRIAL_COLUMNS.items():
        if kind in ("float", "int"):
            values = pd.to_numeric(out[col], errors="coerce")
            bad = values.isna().to_numpy() | ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
            if bad.any():
                rows = np.zeros(len(frame), dtype=bool)
                rows[np.flatnonzero(done)[bad]] = True
                raise AnalysisError(
                    f"column {col} has NaN or non-numeric values in completed trials: {_row_names(frame, rows)}")
            out[col] = values.astype(float if kind == "float" else "int64")
        else:
            bad = out[col].isna().to_numpy()
            if bad.any():
                rows = np.zeros(len(frame), dtype=bool)
                rows[np.flatnonzero(done)[bad]] = True
                raise AnalysisError(f"column {col} is empty in completed trials: {_row_names(frame, rows)}")
            out[col] = out[col].astype(str)
    dup = out.duplicated(["model", "context", "seed"], keep=False).to_numpy()
    if dup.any():
        rows = np.zeros(len(frame), dtype=bool)
        rows[np.flatnonzero(done)[dup]] = True
        raise AnalysisError(f"more than one completed trial for the same model, context and seed: "
                            f"{_row_names(frame, rows)}")
    for col in ("model_family", "model_size_b"):
        per_model = out.groupby("model")[col].nunique()
        if (per_model > 1).any():
            models = ", ".join(per_model.index[per_model > 1])
            raise AnalysisError(f"model(s) {models} appear with more than one {col}")
    return out.reset_index(drop=True)


def join_steps(steps: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Step rows of completed trials with model, family, size, context and seed attached.

    Keeps phase "eval" rows when there are any (the dynamics figure shows evaluations), else all rows.
    """
    missing = [c for c in STEP_COLUMNS if c not in steps.columns]
    if missing:
        raise AnalysisError(f"steps file lacks column(s): {', '.join(missing)}")
    frame = steps.copy()
    frame["trial_id"] = frame["trial_id"].astype(str)
    need = [c for c in STEP_JOIN_COLUMNS if c not in frame.columns]
    if need:
        if "trial_id" not in trials.columns:
            raise AnalysisError(f"steps file lacks {', '.join(need)} and trials file has no trial_id to join them")
        table = trials[["trial_id", *need]].drop_duplicates("trial_id").copy()
        table["trial_id"] = table["trial_id"].astype(str)
        frame = frame.merge(table, on="trial_id", how="inner")
    if "trial_id" in trials.columns:
        frame = frame[frame["trial_id"].isin(trials["trial_id"].astype(str))]
    if frame["phase"].astype(str).eq("eval").any():
        frame = frame[frame["phase"].astype(str) == "eval"]
    for col in ("step", "student_acc", "teacher_acc", "student_acc_t1", "gap"):
        if col in frame.columns:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    # The student at the self-teacher's (train-time) decoding, which the gap compares: teacher - gap when a
    # file lacks the column.
    if "student_acc_t1" not in frame.columns:
        frame["student_acc_t1"] = frame["teacher_acc"] - frame["gap"] if "gap" in frame.columns else np.nan
    elif "gap" in frame.columns:
        frame["student_acc_t1"] = frame["student_acc_t1"].fillna(frame["teacher_acc"] - frame["gap"])
    return frame.dropna(subset=["step", "student_acc", "teacher_acc"]).reset_index(drop=True)
