"""Sweep files: the grid a user writes, and one-line errors naming the field and its line before anything runs."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import SweepError
from orchestrator.sweep_file import RESOURCE_PRESETS, check_input_files, load_sweep
from orchestrator.sweep_state import prepare_sweep_dir, sweep_location

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"

BASE = """\
name: grid
storage: {storage}
models:
  - path: embedded:smollm2-135m-instruct
    overrides:
      rollout: {{n_samples: 2}}
    dtype: bfloat16
  - path: Qwen/Qwen3-8B
    seeds: [5]
    dtype: bfloat16
contexts: [none, feedback, {{name: mine, template: "{{prompt}} {{hint}}"}}]
seeds: [0, 1]
trial:
  steps: 3
  context: {{max_teacher_prompt_tokens: 1024}}
  loss: {{top_k: 5}}
  rollout: {{max_response_tokens: 8192}}
resources: b200-1
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def base(tmp_path: Path) -> str:
    return BASE.format(storage=tmp_path / "store")


def sweep_dir_of(sweep) -> Path:
    return sweep_location(sweep)[0]


def test_grid_merges_shared_settings_overrides_and_coordinates(tmp_path):
    sweep, points = load_sweep(write(tmp_path, base(tmp_path)))
    # 3 contexts x 2 seeds for the first model, 3 x 1 for the second (its own seeds).
    assert [p.trial_id for p in points] == [
        "smollm2-135m-instruct-none-s0", "smollm2-135m-instruct-none-s1", "smollm2-135m-instruct-feedback-s0",
        "smollm2-135m-instruct-feedback-s1", "smollm2-135m-instruct-mine-s0", "smollm2-135m-instruct-mine-s1",
        "qwen3-8b-none-s5", "qwen3-8b-feedback-s5", "qwen3-8b-mine-s5"]
    first, last = points[0].config, points[-1].config
    assert first.rollout.n_samples == 2 and last.rollout.n_samples == 8  # the override is the first model's only
    assert first.loss.top_k == last.loss.top_k == 5 and first.steps == 3
    assert last.context.name == "mine" and last.context.template == "{prompt} {hint}"
    assert last.context.max_teacher_prompt_tokens == 1024  # shared context settings reach every context
    assert last.seed == 5 and last.model.path == "Qwen/Qwen3-8B" and last.name == "qwen3-8b-mine-s5"
    # The b200-1 preset: one GPU, so CUDA and one trainer rank; its sandbox workers.
    preset = RESOURCE_PRESETS["b200-1"]
    assert sweep.trial_resources == preset
    assert last.device == "cuda" and last.deepspeed.world_size == 1 and last.sandbox.workers == preset.sandbox_workers


def test_cpu_preset_is_the_default(tmp_path):
    text = base(tmp_path).replace("resources: b200-1\n", "")
    sweep, points = load_sweep(write(tmp_path, text))
    assert sweep.trial_resources == RESOURCE_PRESETS["cpu"] and points[0].config.device == "cpu"


@pytest.mark.parametrize("edit, expected", [
    (("feedback,", "feedbak,"), "sweep.yaml:11: contexts[1]: context.name: unknown construction 'feedbak'"),
    (("seeds: [0, 1]", "seeds: [0, -1]"), "sweep.yaml:12: seeds: seeds must be non-negative, got [-1]"),
    (("seeds: [0, 1]", "seeds: []"), "sweep.yaml:12: seeds: List should have at least 1 item"),
    (("seeds: [5]", "seeds: [5, 5]"), "sweep.yaml:9: models[1].seeds: a seed is listed twice"),
    (("top_k: 5", "top_kk: 5"), "sweep.yaml:16: trial.loss.top_kk: Extra inputs are not permitted"),
    (("n_samples: 2", "n_samples: 0"), "sweep.yaml:6: models[0].overrides.rollout.n_samples: Input should be greater than 0"),
    (("Qwen/Qwen3-8B", "/no/such/model"), "sweep.yaml:8: models[1].path: /no/such/model does not exist"),
    (("resources: b200-1", "resources: b300"), "sweep.yaml:18: resources: unknown preset 'b300'"),
    (("resources: b200-1", "resources: {gpus: -1}"), "sweep.yaml:18: resources.gpus: Input should be greater than or equal to 0"),
    (("  steps: 3", "  seed: 3"), "sweep.yaml:13: trial: 'seed' is set by the grid"),
    (("name: grid", "name: my grid"), "sweep.yaml:1: name: use letters"),
    (("name: grid", "nmae: grid"), "sweep.yaml:1: nmae: Extra inputs are not permitted"),
])
def test_bad_sweep_files_are_refused_naming_field_and_line(tmp_path, edit, expected):
    old, new = edit
    text = base(tmp_path)
    assert old in text
    with pytest.raises(SweepError) as err:
        load_sweep(write(tmp_path, text.replace(old, new, 1)))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / expected.split(":")[0])), message
    assert expected in message, message


def test_unwritable_storage_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    sweep_file = write(tmp_path, base(tmp_path).replace(str(tmp_path / "store"), str(blocker / "sub")))
    sweep, points = load_sweep(sweep_file)
    with pytest.raises(SweepError, match=r"^storage: cannot write to .*file/sub/grid"):
        prepare_sweep_dir(sweep, points, sweep_dir_of(sweep), sweep_file)


def test_a_sweep_folder_refuses_another_grid_once_a_trial_has_started(tmp_path):
    sweep_file = write(tmp_path, base(tmp_path))
    sweep, points = load_sweep(sweep_file)
    state = prepare_sweep_dir(sweep, points, sweep_dir_of(sweep), sweep_file)
    assert len(state.trials) == 9 and (state.dir / "trials" / points[0].trial_id / "trial.yaml").is_file()
    # The same file again continues the same folder.
    prepare_sweep_dir(sweep, points, sweep_dir_of(sweep), sweep_file)
    # Before any trial started (a sweep stopped while all were pending), the folder takes a corrected grid,
    # and forgets the old one: trial folders outside the new grid and Tune's state, which would restore it.
    (state.dir / "tune").mkdir()
    other = write(tmp_path, base(tmp_path).replace("seeds: [0, 1]", "seeds: [0, 2]"))
    sweep2, points2 = load_sweep(other)
    state2 = prepare_sweep_dir(sweep2, points2, sweep_dir_of(sweep2), other)
    assert sorted(state2.trials) == sorted(p.trial_id for p in points2)
    assert sorted(d.name for d in (state.dir / "trials").iterdir()) == sorted(state2.trials)
    assert not (state.dir / "tune").exists()
    # Once a trial has started, another grid is refused ...
    state2.trial_files(points2[1].trial_id).append_attempt({"attempt": 1, "event": "start", "time": 0.0})
    with pytest.raises(SweepError, match="holds another sweep's grid, whose trials have run"):
        prepare_sweep_dir(sweep, points, sweep_dir_of(sweep), sweep_file)
    # ... and so are other settings for a trial that has started; not for one that has not.
    changed = write(tmp_path, base(tmp_path).replace("seeds: [0, 1]", "seeds: [0, 2]").replace("top_k: 5", "top_k: 7"))
    sweep3, points3 = load_sweep(changed)
    with pytest.raises(SweepError, match=f"trial {points2[1].trial_id} .* was started with other settings"):
        prepare_sweep_dir(sweep3, points3, sweep_dir_of(sweep3), changed)
    (state.dir / "trials" / points2[1].trial_id / "attempts.jsonl").unlink()
    assert prepare_sweep_dir(sweep3, points3, sweep_dir_of(sweep3), changed).trials == state2.trials


def test_cli_prints_one_line_and_exits_2(tmp_path):
    sweep_file = write(tmp_path, base(tmp_path).replace("feedback,", "feedbak,"))
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "run", str(sweep_file)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "contexts[1]" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name, trials", [("paper_fig1.yaml", 30), ("paper_fig3.yaml", 12)])
def test_paper_sweeps_plan(name, trials):
    sweep, points = load_sweep(SWEEPS / name)
    assert len(points) == trials
    assert {p.config.steps for p in points} == {50}
    cfg = points[0].config
    # METHOD.md's hyperparameters.
    assert (cfg.rollout.prompts_per_step, cfg.rollout.n_samples, cfg.rollout.temperature) == (32, 8, 1.0)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.teacher.ema_rate) == (1e-6, 0.01, 1.0, 0.01)
    assert (cfg.loss.divergence, cfg.loss.support, cfg.loss.top_k) == ("reverse_kl", "topk_tail", 20)
    assert (cfg.eval.n_samples, cfg.eval.temperature, cfg.eval.top_p) == (4, 0.6, 0.95)
    assert cfg.data.source == "livecodebench" and cfg.data.release == "v6"
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "plan", str(SWEEPS / name)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert f"{trials} trials, about " in result.stdout and "GPU-hours" in result.stdout
    if name == "paper_fig1.yaml":
        seeds = {(p.model, p.seed) for p in points}
        assert {s for m, s in seeds if m == "qwen3-8b"} == {0, 1, 2} and {s for m, s in seeds if m != "qwen3-8b"} == {0, 1}
        assert {p.context for p in points} == {"none", "expert_preamble", "feedback", "llm_peer_hints",
                                                "own_solution_feedback", "peer_solution_feedback"}


def test_plan_per_token_model_matches_the_papers_cost():
    """The stated model is calibrated on the papers' ~20 B200-hours per Qwen3-8B run."""
    from orchestrator.plan import STARTUP_SECONDS, estimate

    sweep, points = load_sweep(SWEEPS / "paper_fig3.yaml")
    estimates = {e.point.trial_id: e for e in estimate(sweep, points, [])}  # no finished trial to measure
    qwen8 = estimates["qwen3-8b-peer_solution_feedback-s0"]
    assert 15 < qwen8.device_hours < 25 and qwen8.source == "per-token model"
    # Linear in size besides the start-up: the 4B model's tokens cost half the 8B one's.
    startup = STARTUP_SECONDS["cuda"] * sweep.trial_resources.gpus / 3600
    assert estimates["qwen3-4b-peer_solution_feedback-s0"].device_hours - startup == \
        pytest.approx((qwen8.device_hours - startup) / 2)


def test_plan_per_token_model_charges_waiting_ranks_when_rank_0_alone_samples():
    """The papers' runs had an engine on every GPU (the default); with rank 0's alone, each generated token
    (rollout responses, evaluation samples) keeps the 8 GPUs 8 times as long."""
    from orchestrator.plan import STARTUP_SECONDS, estimate, eval_tokens
    from orchestrator.sweep_file import GridPoint

    sweep, points = load_sweep(SWEEPS / "paper_fig3.yaml")
    point = next(p for p in points if p.trial_id == "qwen3-8b-peer_solution_feedback-s0")
    assert point.config.rollout.engines == "every_rank" and point.config.deepspeed.world_size == 8
    cfg = point.config
    one_engine = GridPoint("one-engine", point.model, point.context, 0, cfg.model_copy(
        update={"rollout": cfg.rollout.model_copy(update={"engines": "main"})}))
    every, main = estimate(sweep, [point, one_engine], [])
    startup = STARTUP_SECONDS["cuda"] * 8 / 3600
    # 50 steps x 256 rollouts of (32,768 + 2,048 + 10,240) / 2 tokens, and the evaluations' samples.
    tokens = 50 * 256 * (32_768 + 2_048 + 10_240) / 2 + eval_tokens(point)
    generated = 50 * 256 * 32_768 / 2 + eval_tokens(point)
    assert every.tokens == main.tokens == tokens
    assert (main.device_hours - startup) / (every.device_hours - startup) == pytest.approx(
        (tokens + 7 * generated) / tokens)


def test_plan_per_token_model_on_small_cpu_trials_counts_prompts_and_start_up():
    """A trial of 2 steps of 4 rollouts of 128 tokens, small evaluations: its forwards read the prompts (up to
    768 and 2048 tokens), and start-up is most of it; sweeps/first.yaml's trials took 6.5 to 10 min on this
    2-core machine under load (load average 3-9), the demo's 3 min idle."""
    from orchestrator.plan import SECONDS_PER_TOKEN_BILLION, STARTUP_SECONDS, estimate, eval_tokens

    sweep, points = load_sweep(SWEEPS / "first.yaml")
    (e, _) = estimate(sweep, points, [])
    tokens = 2 * 2 * 2 * (128 + 768 + 2048) / 2 + eval_tokens(points[0])
    assert e.tokens == tokens
    wall_minutes = (tokens * 0.135 * SECONDS_PER_TOKEN_BILLION["cpu"] / 2 + STARTUP_SECONDS["cpu"]) / 60
    assert e.device_hours * 60 / sweep.trial_resources.cpus == pytest.approx(wall_minutes)
    assert 3 < wall_minutes < 8


def test_yaml_of_every_sweep_file_parses():
    for path in SWEEPS.glob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_plan_uses_a_finished_trial_of_the_same_model(tmp_path):
    """Measured phase times and tokens win over the per-token model, part by part; checked against a hand
    computation from a hand-made steps table."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.plan import estimate, eval_tokens, find_references, measured_seconds
    from orchestrator.sweep_file import GridPoint

    sweep_file = write(tmp_path, base(tmp_path).replace("resources: b200-1", "resources: cpu"))
    sweep, points = load_sweep(sweep_file)
    ref_point = points[0]
    cfg = ref_point.config
    # The trial that ran: 3 steps of 32 prompts x 2 samples, responses of at most 8192 tokens.
    assert (cfg.steps, cfg.rollout.prompts_per_step, cfg.rollout.n_samples, cfg.rollout.max_response_tokens) \
        == (3, 32, 2, 8192)
    done = tmp_path / "store" / "earlier" / "trials" / "t0"
    done.mkdir(parents=True)
    (done / "config.json").write_text(cfg.model_dump_json())
    # Each step: 64 rollouts of 1024 tokens (an eighth of the maximum), student prompts of 200 tokens,
    # teacher prompts of 500; 5e-4 s per generated token, 1e-4 per teacher token, 3e-4 per student token;
    # sandbox and teacher contexts 0.1 s per rollout; optimizer, push, EMA and 1 s between phases: 3 s.
    step = {"phase": "train", "rollouts": 64, "tokens/rollout_prompt": 64 * 200,
            "tokens/rollout_generated": 64 * 1024, "time/rollout_s": 64 * 1024 * 5e-4,
            "tokens/teacher_forward": 64 * 1524, "time/teacher_forward_s": 64 * 1524 * 1e-4,
            "tokens/student_forward_backward": 64 * 1224, "time/student_forward_backward_s": 64 * 1224 * 3e-4,
            "time/sandbox_s": 3.2, "time/teacher_context_s": 3.2, "time/optimizer_s": 1.0,
            "time/weight_push_s": 0.5, "time/ema_update_s": 0.5}
    step["step_seconds"] = sum(v for k, v in step.items() if k.startswith("time/")) + 1.0
    pq.write_table(pa.Table.from_pylist([{"step": s, **step} for s in (1, 2, 3)] +
                                        [{"step": 3, "phase": "eval", "student_acc": 0.5}]), done / "steps.parquet")
    # 100 s outside the steps: start-up, evaluations, checkpoints.
    wall = 3 * step["step_seconds"] + 100.0
    (done / "trial.json").write_text(json.dumps({"model": cfg.model.path, "status": "completed",
                                                 "wall_seconds": wall}))
    cpus = sweep.trial_resources.cpus

    # A longer trial of the same model: 6 steps, responses of at most 4096 tokens (512 at the same fill).
    longer = cfg.model_copy(update={"steps": 6, "rollout": cfg.rollout.model_copy(update={"max_response_tokens": 4096})})
    longer_point = GridPoint("longer", ref_point.model, ref_point.context, 0, longer)
    estimates = estimate(sweep, [*points, longer_point], find_references([tmp_path / "store"]))
    first = estimates[0]
    assert first.source == f"measured: {done}"
    # The trial's own settings give back its wall time, part by part.
    want = {"rollout": 192 * 1024 * 5e-4, "teacher_forward": 192 * 1524 * 1e-4,
            "student_forward_backward": 192 * 1224 * 3e-4, "rest_of_step": 192 * 0.1 + 3 * 3.0,
            "outside_steps": 100.0}
    assert first.phase_hours == pytest.approx({k: v * cpus / 3600 for k, v in want.items()})
    assert first.device_hours == pytest.approx(wall * cpus / 3600)
    # 384 rollouts of 512 tokens; evaluations scale by their tokens.
    want = {"rollout": 384 * 512 * 5e-4, "teacher_forward": 384 * (500 + 512) * 1e-4,
            "student_forward_backward": 384 * (200 + 512) * 3e-4, "rest_of_step": 384 * 0.1 + 6 * 3.0,
            "outside_steps": 100.0 * eval_tokens(longer_point) / eval_tokens(ref_point)}
    assert estimates[-1].phase_hours == pytest.approx({k: v * cpus / 3600 for k, v in want.items()})
    assert estimates[-1].device_hours == pytest.approx(sum(want.values()) * cpus / 3600)
    # Another model has no finished trial: the per-token model, said so, without a phase split.
    assert estimates[-2].source == "per-token model" and estimates[-2].phase_hours == {}
    # Two ranks, each with an engine: the rollout and the evaluations take half the reference's time (it had
    # one engine), the forwards and the rest what they took; with rank 0's engine alone, all as measured.
    (ref,) = find_references([tmp_path / "store"])
    two_ranks = {engines: GridPoint(engines, ref_point.model, ref_point.context, 0, cfg.model_copy(update={
        "deepspeed": cfg.deepspeed.model_copy(update={"world_size": 2}),
        "rollout": cfg.rollout.model_copy(update={"engines": engines})})) for engines in ("every_rank", "main")}
    own = measured_seconds(ref_point, ref)
    assert measured_seconds(two_ranks["every_rank"], ref) == pytest.approx(
        {**own, "rollout": own["rollout"] / 2, "outside_steps": own["outside_steps"] / 2})
    assert measured_seconds(two_ranks["main"], ref) == pytest.approx(own)
    # A reference whose 2 engines shared the work: one engine takes twice its time.
    assert measured_seconds(ref_point, dataclasses.replace(ref, engine_ranks=2)) == pytest.approx(
        {**own, "rollout": own["rollout"] * 2, "outside_steps": own["outside_steps"] * 2})
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "plan", str(sweep_file)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    assert "student fwd+bwd" in result.stdout and "0.0003 s/token" in result.stdout, result.stdout


def test_a_failure_of_tune_itself_is_one_line_with_the_way_to_continue(tmp_path, monkeypatch):
    """Tune stops the whole fit() on errors it does not retry (e.g. an OutOfMemoryError of Ray's memory
    monitor): `opsd sweep run` says so in one line, keeps the traceback in driver.log, and names `resume`."""
    import logging

    import orchestrator.tune_run as tune_run
    from orchestrator.driver import DriverRecord
    from orchestrator.errors import SweepStopped

    class StoppedTuner:
        def fit(self):
            raise RuntimeError("Caught unexpected exception: 1 worker(s) were killed due to the node running low "
                               "on memory.\nOOM kill reason: ...")

    sweep_file = write(tmp_path, base(tmp_path))
    sweep, points = load_sweep(sweep_file)
    state = prepare_sweep_dir(sweep, points, sweep_dir_of(sweep), sweep_file)
    handler = logging.FileHandler(state.dir / "driver.log")  # where init_ray sends Ray's and Tune's loggers
    logging.getLogger("ray.tune").addHandler(handler)
    monkeypatch.setattr(tune_run, "build_tuner", lambda state: (StoppedTuner(), False))
    monkeypatch.setattr(tune_run, "_concurrency", lambda state: (1, "2 CPUs"))
    try:
        with pytest.raises(SweepStopped) as err:
            tune_run.run_sweep(state, driver=DriverRecord.start(state.dir))
    finally:
        logging.getLogger("ray.tune").removeHandler(handler)
        handler.close()
    message = str(err.value)
    assert "\n" not in message and "killed due to the node running low on memory" in message
    assert f"opsd sweep resume {state.dir}" in message
    assert "OOM kill reason" in (state.dir / "driver.log").read_text()


def test_quoted_seeds_are_refused_not_read_as_numbers(tmp_path):
    with pytest.raises(SweepError, match=r"sweep.yaml:12: seeds\[0\]: Input should be a valid integer"):
        load_sweep(write(tmp_path, base(tmp_path).replace("seeds: [0, 1]", 'seeds: ["0", "1"]')))


def relative_sweep(folder: Path, model_path: str, **extra: str) -> Path:
    text = (f"name: rel\nstorage: {folder / 'store'}\nmodels: [{{path: {model_path}, label: local}}]\n"
            "contexts: [llm_peer_hints]\nseeds: [0]\n")
    for key, value in extra.items():
        text += f"{key}: {value}\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(text)
    return path


def test_relative_paths_are_read_from_the_sweep_files_folder(tmp_path, monkeypatch):
    """`models/smollm2-local` next to the sweep file is that folder, from whatever directory opsd runs in,
    and the trials get it absolute (they run in their own folders, on any node); so do data and hints."""
    project = tmp_path / "project"
    (project / "sweeps" / "models" / "smollm2-local").mkdir(parents=True)
    (project / "sweeps" / "data").mkdir()
    (project / "sweeps" / "data" / "problems.jsonl").write_text("")
    (project / "sweeps" / "data" / "hints.jsonl").write_text("")
    path = relative_sweep(project / "sweeps", "models/smollm2-local",
                          data="{source: jsonl, path: data/problems.jsonl}",
                          trial="{context: {hints_path: data/hints.jsonl}}")
    monkeypatch.chdir(tmp_path)  # elsewhere: the paths still resolve beside the sweep file
    _, (point,) = load_sweep(path)
    assert point.config.model.path == str(project / "sweeps" / "models" / "smollm2-local")
    assert point.config.data.path == str(project / "sweeps" / "data" / "problems.jsonl")
    assert point.config.context.hints_path == str(project / "sweeps" / "data" / "hints.jsonl")
    check_input_files([point])


def test_a_relative_path_found_only_from_the_current_directory_is_refused_with_the_fix(tmp_path, monkeypatch):
    (tmp_path / "models" / "smollm2-local").mkdir(parents=True)
    path = relative_sweep(tmp_path / "sweeps", "models/smollm2-local")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: models[0].path: models/smollm2-local is not in the sweep file's folder")
    assert "write ../models/smollm2-local or " + str(tmp_path / "models" / "smollm2-local") in message
    # An `org/name` found nowhere here is a Hugging Face id; a path that cannot be one is refused.
    assert load_sweep(relative_sweep(tmp_path / "hub", "Qwen/Qwen3-8B"))[1][0].config.model.path == "Qwen/Qwen3-8B"
    with pytest.raises(SweepError, match=r"models\[0\].path: \./models/none does not exist in the sweep file's"):
        load_sweep(relative_sweep(tmp_path / "dot", "./models/none"))


def test_missing_input_files_are_refused_before_ray_starts(tmp_path):
    path = relative_sweep(tmp_path, "embedded:smollm2-135m-instruct",
                          trial="{context: {hints_path: /no/such/hints.jsonl}}")
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "run", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert ("opsd sweep: error: context.hints_path: /no/such/hints.jsonl does not exist "
            "(trial local-llm_peer_hints-s0)") in result.stderr
    assert not (tmp_path / "store").exists()  # nothing written, no Ray started (it would write driver.log)


def test_the_plan_says_each_models_seeds_wall_time_and_what_the_checkpoint_peak_assumes():
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "plan", str(SWEEPS / "paper_fig1.yaml")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    out = " ".join(result.stdout.split())
    assert "30 trials (qwen3-8b: 6 contexts x 3 seeds, olmo-3-7b-instruct: 6 x 2)" in out
    # 30 trials of ~2.4 h on 8 GPUs each: all at once (max_concurrent_trials unset) needs 240 GPUs.
    assert re.search(r"wall time: about 2\.\d h to 2\.\d h per trial \(8 GPUs each\); 30 trials at once "
                     r"\(max_concurrent_trials unset: all, if the cluster has 240 GPUs\) take about 2\.\d h", out), out
    assert re.search(r"checkpoints: up to [\d.]+ TB with 30 trials at once", out)


def test_the_readmes_sweep_example_is_a_file_that_runs_here_as_written():
    """The README's first sweep is sweeps/first.yaml, complete (the embedded model, its data, small
    evaluations), valid with every input present on this machine, and the README says how long it took."""
    readme = (SWEEPS.parent / "README.md").read_text()
    section = readme[readme.index("## A sweep\n"):]
    first_block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert yaml.safe_load(first_block) == yaml.safe_load((SWEEPS / "first.yaml").read_text())
    sweep, points = load_sweep(SWEEPS / "first.yaml")
    check_input_files(points)
    assert {p.config.model.path for p in points} == {"embedded:smollm2-135m-instruct"}
    assert all(p.config.data.max_val_problems and p.config.eval.n_samples == 1 for p in points)
    assert sweep.trial_resources == RESOURCE_PRESETS["cpu"]
    assert re.search(r"`opsd sweep run sweeps/first\.yaml`, from the repository root, took \d+ min", section)


def test_guided_section_is_validated_and_its_prior_law_read_from_the_sweep_files_folder(tmp_path):
    sweep, _ = load_sweep(write(tmp_path, base(tmp_path) + "guided: {goal: best, max_trials: 4}\n"))
    assert sweep.guided.goal == "best" and sweep.guided.max_trials == 4 and sweep.guided.confidence == 0.95
    with pytest.raises(SweepError, match=r"sweep.yaml:19: guided: goal 'law' needs slope_ci_width"):
        load_sweep(write(tmp_path, base(tmp_path) + "guided:\n  goal: law\n"))
    with pytest.raises(SweepError, match=r"sweep.yaml:20: guided.goal: Input should be 'law' or 'best'"):
        load_sweep(write(tmp_path, base(tmp_path) + "guided:\n  goal: cheapest\n"))
    with pytest.raises(SweepError, match=r"sweep.yaml:20: guided.prior_law: .*old/law.json does not exist"):
        load_sweep(write(tmp_path, base(tmp_path) + "guided:\n  prior_law: old/law.json\n  goal: best\n"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "law.json").write_text("{}")
    sweep, _ = load_sweep(write(tmp_path, base(tmp_path) + "guided:\n  prior_law: old/law.json\n  goal: best\n"))
    assert sweep.guided.prior_law == str(tmp_path / "old" / "law.json")
