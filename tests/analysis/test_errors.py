"""Degenerate input gets one clear line, not a traceback: through the API and through `opsd analyze`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.errors import AnalysisError
from analysis.report import run_analysis
from tests.analysis.conftest import trials_from

OPSD = str(Path(sys.executable).parent / "opsd")


def _write(frame: pd.DataFrame, folder: Path) -> Path:
    frame.to_parquet(folder / "trials.parquet", index=False)
    return folder / "trials.parquet"


def _good() -> pd.DataFrame:
    gaps = [0.0, 0.1, 0.2, 0.3]
    return trials_from([(f"c{i}", [g, g + 0.01], [0.5 * g, 0.5 * g + 0.02]) for i, g in enumerate(gaps)])


def _one_config():
    return _good().query("context == 'c0'")


def _equal_gaps():
    return trials_from([(f"c{i}", [0.1, 0.1], [0.05 * i, 0.05 * i]) for i in range(4)])


def _missing_columns():
    return _good().drop(columns=["initial_gap", "seed"])


def _no_completed():
    return _good().assign(status=["failed", "running"] * 4)


def _nans():
    frame = _good()
    frame.loc[[2, 5], "improvement"] = np.nan
    return frame


# case: (builder, message the user reads, in full or as a regular expression)
CASES = {
    "one_config": (_one_config, r"cannot fit the law: 1 configuration \(model × context\); a line needs at least 2 "
                                r"configurations of different gaps, intervals and leave-one-out at least 3, .*"
                                r"the papers use 6 contexts per model: add contexts to the sweep$"),
    "all_gaps_equal": (_equal_gaps, r"cannot fit the law: all 4 configurations have the same gap \(0\.1\), no slope "
                                    r"can be fitted: add contexts whose gaps differ"),
    "missing_columns": (_missing_columns, r"trials file lacks column\(s\): seed, initial_gap"),
    "no_completed": (_no_completed, r"no completed trials \(8 row\(s\), statuses: failed, running\)"),
    "nans": (_nans, r"column improvement has NaN or non-numeric values in completed trials: "
                    r"trial_id=fam/c1/0, trial_id=fam/c2/1"),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every case through the command line, the processes started together to share the start-up time."""
    root = tmp_path_factory.mktemp("bad")
    procs = {}
    for name, (build, _) in CASES.items():
        build().to_parquet(root / f"{name}.parquet", index=False)
        procs[name] = subprocess.Popen([OPSD, "analyze", str(root / f"{name}.parquet"), "--out", str(root / name)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return {name: (p.wait(timeout=180), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_api_raises_analysis_error_with_the_message(case, tmp_path):
    build, message = CASES[case]
    build().to_parquet(tmp_path / "trials.parquet", index=False)
    with pytest.raises(AnalysisError, match=message) as info:
        run_analysis(tmp_path, tmp_path / "out", n_bootstrap=0)
    assert info.value.user_facing
    assert not (tmp_path / "out" / "law.json").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_cli_exits_2_with_one_line(case, cli_runs):
    returncode, stdout, stderr = cli_runs[case]
    assert returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr
    assert lines[0].startswith("opsd analyze: error: ")
    assert re.search(CASES[case][1], lines[0]), lines[0]


def test_results_path_that_does_not_exist_or_is_an_empty_folder(tmp_path):
    with pytest.raises(AnalysisError, match="results not found"):
        run_analysis(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(AnalysisError, match="holds no trials.parquet"):
        run_analysis(tmp_path, tmp_path / "out")


def test_duplicate_trials_and_a_model_in_two_families_are_named(tmp_path):
    frame = pd.concat([_good(), _good().iloc[[0]]], ignore_index=True)
    with pytest.raises(AnalysisError, match="more than one completed trial.*trial_id=fam/c0/0"):
        run_analysis(_write(frame, tmp_path), tmp_path / "out", n_bootstrap=0)
    frame = _good()
    frame.loc[0, "model_family"] = "other"
    with pytest.raises(AnalysisError, match="model\\(s\\) fam-1b appear with more than one model_family"):
        run_analysis(_write(frame, tmp_path), tmp_path / "out", n_bootstrap=0)


def test_weighted_fit_with_single_seeds_says_why(tmp_path):
    frame = _good().query("seed == 0")
    with pytest.raises(AnalysisError, match="weighted fit needs at least 2 seeds per configuration"):
        run_analysis(_write(frame, tmp_path), tmp_path / "out", weighted=True, n_bootstrap=0)


