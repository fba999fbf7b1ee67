"""Sweeps on a Ray cluster as users submit them: two nodes sharing one storage folder, and GPU pinning.

Both are minutes long (real trials), so they are `slow`: `bash scripts/test.sh -m slow tests/orchestrator`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from tests.orchestrator.test_sweep_run import attempts, trial_env
from tests.trainer.copy_task import copy_problems, write_problems

OPSD = [sys.executable, "-m", "orchestrator.cli"]
TINY_TRIAL = {
    "context": {"max_teacher_prompt_tokens": 1024},
    "rollout": {"prompts_per_step": 4, "n_samples": 2, "max_response_tokens": 16, "max_prompt_tokens": 512},
    "optim": {"lr": 1.0e-3, "mini_batch_size": 4, "micro_batch_size": 4},
    "teacher": {"ema_rate": 0.0}, "eval": {"every_steps": 2, "n_samples": 1, "teacher_n_samples": 1},
}


def write_sweep(root: Path, model: Path, *, name: str, seeds: list[int], contexts: list[str], resources: dict,
                trial: dict) -> Path:
    data = write_problems(root / "problems.jsonl", copy_problems(8))
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "storage": str(root / "storage"),
        "models": [{"path": str(model), "label": "tiny", "family": "tiny", "size_b": 0.001}],
        "contexts": contexts, "seeds": seeds, "data": {"source": "jsonl", "path": str(data)},
        "resources": resources, "wandb": {"mode": "disabled"}, "trial": {**TINY_TRIAL, **trial}}))
    return path


@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path, tiny_model_dir):
    """A head and a worker node (one CPU each, as Ray's own tests build clusters); the driver joins the
    cluster by address as on a real one; every trial writes into the one storage folder."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        path = write_sweep(tmp_path, tiny_model_dir, name="two-nodes", seeds=[0, 1], contexts=["none", "llm_peer_hints"],
                           resources={"gpus": 0, "cpus": 1, "sandbox_workers": 1}, trial={"steps": 2})
        with open(tmp_path / "run.log", "w") as log:
            result = subprocess.run([*OPSD, "sweep", "run", str(path), "--address", cluster.address],
                                    stdout=log, stderr=subprocess.STDOUT, env=trial_env(), timeout=1500)
        assert result.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
        sweep_dir = tmp_path / "storage" / "two-nodes"
        nodes = {}
        for trial_dir in sorted((sweep_dir / "trials").iterdir()):
            starts = [e for e in attempts(trial_dir) if e["event"] == "start"]
            nodes[trial_dir.name] = starts[-1]["node_id"]
        print("node per trial:", json.dumps(nodes, indent=1))
        assert len(set(nodes.values())) == 2, nodes  # trials ran on both nodes
        trials = pd.read_parquet(sweep_dir / "trials.parquet")
        assert len(trials) == 4 and (trials.status == "completed").all()
        steps = pd.read_parquet(sweep_dir / "steps.parquet")
        assert len(steps) == 4 * 4 and not steps.duplicated(["trial_id", "step", "phase"]).any()
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_each_trial_sees_exactly_its_own_gpus(tmp_path, tiny_model_dir):
    """Fake GPUs (a local Ray told it has 2): two one-GPU trials at once, each pinned to a different id."""
    path = write_sweep(tmp_path, tiny_model_dir, name="gpus", seeds=[0, 1], contexts=["none"],
                       resources={"gpus": 1, "cpus": 1, "sandbox_workers": 1},
                       trial={"steps": 0, "device": "cpu"})  # the trial computes on the CPU; Ray accounts GPUs
    seen: dict[str, str] = {}
    with open(tmp_path / "run.log", "w") as log:
        driver = subprocess.Popen([*OPSD, "sweep", "run", str(path), "--num-gpus", "2", "--num-cpus", "2"],
                                  stdout=log, stderr=subprocess.STDOUT, env=trial_env())
    deadline = time.monotonic() + 900
    while driver.poll() is None:
        assert time.monotonic() < deadline
        for p in psutil.process_iter(["pid"]):
            try:
                env = p.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if env.get("OPSD_TRIAL", "").startswith("gpus/") and p.pid == _pid_of(tmp_path, env["OPSD_TRIAL"]):
                seen[env["OPSD_TRIAL"]] = env["CUDA_VISIBLE_DEVICES"]
        time.sleep(0.5)
    assert driver.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert sorted(seen) == ["gpus/tiny-none-s0", "gpus/tiny-none-s1"], seen
    assert sorted(seen.values()) == ["0", "1"], seen  # one id each, not the same one, not both


def _pid_of(root: Path, trial: str) -> int | None:
    pids = [e["pid"] for e in attempts(root / "storage" / "gpus" / "trials" / trial.split("/")[1])
            if e["event"] == "pid"]
    return pids[-1] if pids else None


def test_resources_no_node_can_hold_are_refused_before_any_trial(tmp_path, tiny_model_dir):
    path = write_sweep(tmp_path, tiny_model_dir, name="too-big", seeds=[0], contexts=["none"],
                       resources={"gpus": 0, "cpus": 64, "sandbox_workers": 1}, trial={"steps": 0})
    result = subprocess.run([*OPSD, "sweep", "run", str(path), "--num-cpus", "2"], capture_output=True, text=True,
                            env=trial_env(), timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == ["opsd sweep: error: resources: a trial needs 64 CPUs and 0 GPUs on one node; the cluster's "
                      "nodes have 2 CPUs/0 GPUs (use a smaller preset, or --allow-pending for an autoscaling cluster)"]
    sweep_dir = tmp_path / "storage" / "too-big"
    assert os.path.isfile(sweep_dir / "driver.log")
    # Refused before the folder held the grid: the file with a preset that fits runs in the same folder.
    assert not (sweep_dir / "sweep.json").exists() and not (sweep_dir / "trials").exists()
    from orchestrator.sweep_file import load_sweep
    from orchestrator.sweep_state import prepare_sweep_dir

    fixed = yaml.safe_load(path.read_text())
    fixed["resources"] = {"gpus": 0, "cpus": 1, "sandbox_workers": 1}
    path.write_text(yaml.safe_dump(fixed))
    sweep, points = load_sweep(path)
    state = prepare_sweep_dir(sweep, points, sweep_dir, path)
    assert state.resources.cpus == 1 and list(state.trials) == ["tiny-none-s0"]


@pytest.mark.slow
def test_sweep_on_remote_storage(tmp_path, tiny_model_dir, monkeypatch):
    """Storage at a URI (s3:// on a cluster; file:// here, the same pyarrow path): trials work in node-local
    mirrors and push to it, Tune keeps its state there, and status and collect read it from anywhere."""
    remote_root = tmp_path / "bucket"
    path = write_sweep(tmp_path, tiny_model_dir, name="remote", seeds=[0, 1], contexts=["none"],
                       resources={"gpus": 0, "cpus": 1, "sandbox_workers": 1}, trial={"steps": 1})
    text = yaml.safe_load(path.read_text())
    text.update(storage=f"file://{remote_root}", wandb={"mode": "offline"},
                checkpoints={"keep_last": 1, "when_done": "weights"})
    path.write_text(yaml.safe_dump(text))
    env = {**trial_env(), "OPSD_SCRATCH": str(tmp_path / "scratch")}
    with open(tmp_path / "run.log", "w") as log:
        result = subprocess.run([*OPSD, "sweep", "run", str(path)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=1500)
    assert result.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    uri = f"file://{remote_root}/remote"
    sweep = remote_root / "remote"
    trials = pd.read_parquet(sweep / "trials.parquet")
    assert sorted(trials.trial_id) == ["tiny-none-s0", "tiny-none-s1"] and (trials.status == "completed").all()
    for trial_id in trials.trial_id:
        folder = sweep / "trials" / trial_id
        assert (folder / "trial.json").is_file() and (folder / "logs" / "attempt-1.log").is_file()
        (final,) = (folder / "checkpoints").iterdir()  # the final weights, without optimizer state
        assert (final / "WEIGHTS_ONLY").is_file() and (final / "trainer_state.json").is_file()
    assert (sweep / "tune").is_dir() and list((sweep / "wandb").glob("offline-run-*"))
    # Another machine (another scratch folder) reads the sweep from its URI alone.
    status = subprocess.run([*OPSD, "sweep", "status", uri, "--json"], capture_output=True, text=True, timeout=300,
                            env={**env, "OPSD_SCRATCH": str(tmp_path / "elsewhere")})
    assert [json.loads(line)["state"] for line in status.stdout.splitlines()] == ["completed"] * 2, status.stderr
