"""The screen of a guided sweep: every configuration's initial gap, measured before any trial trains.

One screen per model (trainer/screen.py: one engine, one student pass, every context's self-teacher), with
the settings of the model's first trial in the sweep folder (its trial.yaml: the same problems, split, engine
and sampling seeds as that trial's first evaluation) and the contexts of the model's trials. It runs once, as
a Ray task holding one trial's resources (the GPUs it needs may be on any node), in a process of its own
(`python -m orchestrator.guided_screen SWEEP_DIR`) whose output goes to screen/screen.log. What it writes:

    screen/<model label>/      the screen's table and rollouts (trainer/screen.py `write_screen`)
    screen/screen.json         {"rows": one row per configuration, with `model_label`}, what the searcher reads

A sweep whose screen.json covers every configuration is not screened again (a resumed sweep).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SweepError
from orchestrator.sweep_state import SweepState

SCREEN_DIR = "screen"


def screen_path(state: SweepState) -> Path:
    return state.dir / SCREEN_DIR / "screen.json"


def screened_gaps(state: SweepState) -> dict[tuple[str, str], dict[str, Any]] | None:
    """(model label, context) -> the screen's row, when screen.json holds every configuration of the grid."""
    path = screen_path(state)
    if not path.is_file():
        return None
    rows = {(r["model_label"], r["context"]): r for r in json.loads(path.read_text())["rows"]}
    wanted = {(p["model"], p["context"]) for p in state.trials.values()}
    return rows if wanted <= set(rows) else None


def _jobs(state: SweepState):
    """(model label, the settings of its first trial, the contexts of its trials at that trial's seed)."""
    from trainer.config import TrialConfig

    def config(trial_id: str) -> TrialConfig:
        return TrialConfig.model_validate(yaml.safe_load(state.trial_files(trial_id).trial_file.read_text()))

    jobs = []
    for label in dict.fromkeys(p["model"] for p in state.trials.values()):
        ids = [t for t, p in state.trials.items() if p["model"] == label]
        seed = state.trials[ids[0]]["seed"]
        mine = [t for t in ids if state.trials[t]["seed"] == seed]
        cfg = config(ids[0])
        jobs.append((label, cfg.model_copy(update={"name": f"{state.name}-{label}-screen"}),
                     [config(t).context for t in mine]))
    return jobs


def run(sweep_dir: Path) -> None:
    """The screen itself (in the task's process): every model's, then the combined table."""
    from trainer.records import write_json
    from trainer.screen import run_screen, screen_rows, write_screen

    state = SweepState.read(sweep_dir)
    out = state.dir / SCREEN_DIR
    rows = []
    for label, cfg, contexts in _jobs(state):
        print(f"screening {label}: {', '.join(c.name for c in contexts)}", flush=True)
        result = run_screen(cfg, contexts)
        mine = [{**row, "model_label": label} for row in screen_rows(result)]
        write_screen(out / label, result, mine)
        rows += mine
    write_json(screen_path(state), {"rows": rows})


def screen_sweep(state: SweepState, console) -> dict[tuple[str, str], dict[str, Any]]:
    """Screen the sweep unless its folder already holds the screen; returns the rows by configuration."""
    import ray

    done = screened_gaps(state)
    if done is not None:
        return done
    models = len({p["model"] for p in state.trials.values()})
    configs = len({(p["model"], p["context"]) for p in state.trials.values()})
    log = state.dir / SCREEN_DIR / "screen.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"screening {configs} configurations of {models} model(s) before training (one student pass per "
                  f"model; log {log})")
    resources = {"num_cpus": state.resources.cpus, "num_gpus": state.resources.gpus}
    code = ray.get(ray.remote(**resources)(_screen_task).remote(str(state.dir), str(log)))
    if code != 0:
        raise SweepError(f"the screen of {state.name} failed (exit {code}); see {log}")
    done = screened_gaps(state)
    if done is None:
        raise SweepError(f"the screen of {state.name} did not measure every configuration; see {log}")
    return done


def _screen_task(sweep_dir: str, log: str) -> int:
    """Runs on a node with the trial's resources: the screen as a process pinned to the task's GPUs."""
    import ray

    from orchestrator.wandb_log import strip_secrets

    env = strip_secrets(dict(os.environ))
    env.update(CUDA_VISIBLE_DEVICES=",".join(str(g) for g in ray.get_gpu_ids()), PYTHONUNBUFFERED="1",
               VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    with open(log, "a") as sink:
        return subprocess.run([sys.executable, "-m", "orchestrator.guided_screen", sweep_dir], env=env,
                              stdout=sink, stderr=subprocess.STDOUT, cwd=sweep_dir).returncode


if __name__ == "__main__":
    run(Path(sys.argv[1]))
