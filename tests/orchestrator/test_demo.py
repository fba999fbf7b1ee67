"""The README's demo (scripts/demo.sh: screen, sweep, law) end to end, on a tiny model instead of SmolLM2.

Slow (minutes): `bash scripts/test.sh -m slow tests/orchestrator/test_demo.py`. Every output the demo's
summary names must exist and open: Parquet through pandas and DuckDB, figures as PNG, W&B runs read back.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.orchestrator.test_sweep_run import trial_env
from tests.orchestrator.test_wandb_log import WANDB, history
from tests.trainer.copy_task import copy_task

ROOT = Path(__file__).resolve().parents[2]
SIX = ["none", "expert_preamble", "feedback", "llm_peer_hints", "own_solution_feedback", "peer_solution_feedback"]


@pytest.mark.slow
def test_demo_screens_sweeps_and_fits(tmp_path, tiny_model_dir):
    data, model = copy_task(tmp_path, tiny_model_dir)
    demo = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text())
    demo.update(name="tiny-demo", models=[{"path": str(model), "label": "copier", "family": "tiny", "size_b": 0.001}],
                data={"source": "jsonl", "path": str(data)},
                resources={"gpus": 0, "cpus": 1, "sandbox_workers": 1}, max_concurrent_trials=2)
    demo["trial"].update(steps=1, rollout={"prompts_per_step": 4, "n_samples": 2, "max_response_tokens": 16,
                                           "max_prompt_tokens": 512},
                         optim={"lr": 1.0e-3, "mini_batch_size": 8, "micro_batch_size": 4},
                         eval={"every_steps": 1, "n_samples": 1, "teacher_n_samples": 2})
    sweep_file = tmp_path / "demo.yaml"
    sweep_file.write_text(yaml.safe_dump(demo))
    out = tmp_path / "out"
    result = subprocess.run(["bash", "scripts/demo.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                            env={**trial_env(), "OPSD_DEMO_SWEEP": str(sweep_file)}, timeout=1800)
    terminal = result.stdout + result.stderr
    assert result.returncode == 0, terminal[-4000:]
    for noise in ("Traceback", "WARNING", "INFO", "(pid=", "vllm", "Token authentication"):
        assert noise not in terminal, (noise, terminal[-3000:])
    assert "done in" in terminal
    # The upload command the sweep printed, as a user would paste it (wandb's --dry-run uploads nothing).
    (sync,) = set(re.findall(r"upload with `(wandb sync [^`]+)`", " ".join(terminal.split())))
    dry = subprocess.run(["bash", "-c", f"{sync.replace('wandb', shlex.quote(WANDB), 1)} --dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and "Would sync 3 run(s)" in dry.stdout + dry.stderr, dry.stdout + dry.stderr

    screen = pd.read_parquet(out / "screen" / "screen.parquet")
    assert sorted(screen.context) == sorted(SIX)
    assert screen.initial_student_acc_t1.nunique() == 1  # one student pass for every context

    import duckdb

    sweep_dir = out / "tiny-demo"
    for name, rows in (("trials.parquet", 3), ("steps.parquet", 3 * 3)):
        frame = pd.read_parquet(sweep_dir / name)
        ((count,),) = duckdb.sql(f"SELECT count(*) FROM '{sweep_dir / name}'").fetchall()
        assert len(frame) == count == rows, name
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert (trials.status == "completed").all() and sorted(trials.context) == sorted(demo["contexts"])

    report = out / "report"
    for figure in ("fig1_law.png", "fig2_dynamics.png"):  # fig3_scale needs several model sizes
        assert (report / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    text = (report / "report.md").read_text()
    assert "3 configurations" in text  # the report says how little a 3-point fit means
    assert (report / "predictions.csv").is_file()
    runs = sorted((sweep_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and all([r["trial_step"] for r in history(run)] == [0, 1] for run in runs)
    assert os.path.getsize(sweep_dir / "driver.log") > 0
    # Third-party noise belongs in the trial logs; a warning raised by the project's own code belongs nowhere.
    ours = re.compile(r"/(trainer|sandbox|orchestrator|analysis)/\w+\.py:\d+: \w*Warning")
    logs = list((sweep_dir / "trials").glob("*/logs/*.log")) + [out / "screen" / "screen.log"]
    assert len(logs) >= 4
    for log in logs:
        assert not ours.search(log.read_text(errors="replace")), log
