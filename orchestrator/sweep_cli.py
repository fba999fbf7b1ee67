"""`opsd sweep run|resume|status|collect|plan`: a grid of OPSD trials on Ray Tune, and its results."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

EPILOG = """\
examples:
  opsd sweep plan sweeps/paper_fig1.yaml              the grid, resources, GPU-hours, storage and GPU memory
  opsd sweep run sweeps/demo.yaml                      run it (a local Ray, or RAY_ADDRESS / --address auto)
  opsd sweep status runs/sweeps/demo                   each trial's state, step, metrics and failures
  opsd sweep resume runs/sweeps/demo                   continue after the driver died (or rerun `sweep run`)
  opsd sweep collect runs/sweeps/demo                  trials.parquet and steps.parquet for `opsd analyze`

A sweep folder is <storage>/<name>/ (see `storage:` and `name:` in the sweep file): trial folders, logs,
Ray Tune's state, W&B runs and the collected Parquet files.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser(
        "sweep", help="run a grid of trials (models x contexts x seeds) on Ray Tune, and collect its results",
        description="Sweeps of OPSD trials on a Ray cluster: plan, run, watch, resume, collect.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = sweep.add_subparsers(dest="sweep_command", metavar="SUBCOMMAND", required=True)

    run = commands.add_parser(
        "run", help="run every trial of a sweep file (continues the sweep if its folder exists)",
        description="Run the grid of a sweep file on Ray Tune: one trial per model x context x seed, retried "
        "on failure, each resuming from its own checkpoint. Re-running the same command continues the sweep.",
        epilog="example:\n  opsd sweep run sweeps/demo.yaml\n  RAY_ADDRESS=auto opsd sweep run sweeps/paper_fig1.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("sweep_file", metavar="SWEEP.yaml")
    run.add_argument("--storage", help="override the sweep file's storage folder")
    _cluster_options(run)
    run.set_defaults(func=_run)

    resume = commands.add_parser(
        "resume", help="continue a sweep whose driver died (errored trials are retried)",
        description="Restore the Ray Tune experiment of a sweep folder and finish it; failed trials are retried "
        "from their checkpoints.", epilog="example:\n  opsd sweep resume runs/sweeps/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    resume.add_argument("sweep_dir", metavar="DIR", help="the sweep folder <storage>/<name>, or its URI (s3://...)")
    _cluster_options(resume)
    resume.set_defaults(func=_resume)

    status = commands.add_parser(
        "status", help="each trial's state, step, last metrics and failures",
        description="Read a sweep folder (no Ray needed) and print one row per trial.",
        epilog="example:\n  opsd sweep status runs/sweeps/demo\n  opsd sweep status runs/sweeps/demo --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("sweep_dir", metavar="DIR", help="the sweep folder <storage>/<name>, or its URI (s3://...)")
    status.add_argument("--json", action="store_true", help="one JSON object per trial")
    status.set_defaults(func=_status)

    collect = commands.add_parser(
        "collect", help="write trials.parquet and steps.parquet for `opsd analyze`",
        description="Gather every trial's summary and steps into two Parquet files (each step exactly once).",
        epilog="example:\n  opsd sweep collect runs/sweeps/demo && opsd analyze runs/sweeps/demo --out report/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    collect.add_argument("sweep_dir", metavar="DIR", help="the sweep folder <storage>/<name>, or its URI (s3://...)")
    collect.add_argument("--out", metavar="DIR", help="where to write them (default: the sweep folder)")
    collect.set_defaults(func=_collect)

    plan = commands.add_parser(
        "plan", help="the grid, resources, GPU-hours, checkpoint storage and GPU memory of sweep files",
        description="Validate sweep files and estimate their cost: from a finished trial of the same model when "
        "one is found under the storage folder (or --measured DIR), else from a stated per-token model. On GPUs, "
        "each model's memory per GPU by phase, from its config.json; a sweep that cannot fit is refused. The "
        "recipe (optimizer steps per step, length limits) and the problems (counted from the data when it is on "
        "this machine) are printed too. Several files are planned in the order they will run: a trial that an "
        "earlier one (or a finished sweep in the same storage) trains is shared, and counted once.",
        epilog="example:\n  opsd sweep plan sweeps/paper_fig1.yaml\n  opsd sweep plan sweeps/demo.yaml --measured runs/"
        "\n  opsd sweep plan sweeps/paper_fig1.yaml sweeps/paper_fig3.yaml      Fig. 3 shares three trials of Fig. 1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("sweep_files", nargs="+", metavar="SWEEP.yaml")
    plan.add_argument("--measured", action="append", default=[], metavar="DIR",
                      help="folders to search for finished trials (default: the sweep's storage)")
    plan.set_defaults(func=_plan)


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to join ('auto', or host:port); default: RAY_ADDRESS, "
                        "else a Ray started on this machine")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--num-gpus", type=int, help="GPUs of the local Ray (default: all it finds)")
    parser.add_argument("--allow-pending", action="store_true",
                        help="start even if no node can hold a trial yet (an autoscaling cluster adds one)")


def _console(stderr: bool = False):
    """rich's console; wide enough for the tables when the output is a file or a pipe (logs, CI)."""
    from rich.console import Console

    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=160)


def _run(args: argparse.Namespace) -> int:
    from orchestrator.plan import check_memory, memory_estimates
    from orchestrator.sweep_file import check_input_files, load_sweep
    from orchestrator.sweep_state import check_storage, prepare_sweep_dir, sweep_location
    from orchestrator.tune_run import check_cluster_fits, ray_session

    sweep, points = load_sweep(args.sweep_file)
    check_memory(Path(args.sweep_file), sweep, memory_estimates(sweep, points))  # before any GPU-hour is spent
    check_input_files(points)
    local, remote = sweep_location(sweep, args.storage)
    hours = _guided_hours(sweep, points, remote) if sweep.guided is not None else None
    check_storage(local, remote)
    # The cluster is checked before the sweep folder holds anything: a refused sweep leaves no grid behind.
    with ray_session(local, remote, args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus):
        if not args.allow_pending:
            check_cluster_fits(sweep.trial_resources)
        state = prepare_sweep_dir(sweep, points, local, Path(args.sweep_file), remote=remote, hours=hours)
        return _drive(state)


def _guided_hours(sweep, points, remote: str | None) -> dict[str, float | None]:
    """Each trial's device-hours as `opsd sweep plan` estimates them (the budget's unit); refuses what a guided
    sweep cannot do."""
    from orchestrator.errors import SweepError
    from orchestrator.plan import estimate

    if remote is not None:
        raise SweepError("guided: a guided sweep needs a local or shared (NFS) storage folder, not a URI: its "
                         "searcher reads the trials' results from the sweep folder")
    hours = {e.point.trial_id: e.device_hours for e in estimate(sweep, points, [])}
    unknown = [t for t, h in hours.items() if h is None]
    if unknown and sweep.guided.max_hours is not None:
        raise SweepError(f"guided.max_hours: the cost of {unknown[0]} is unknown (its model's size); give "
                         "models[].size_b")
    return hours


def _resume(args: argparse.Namespace) -> int:
    from orchestrator.sweep_state import open_sweep
    from orchestrator.tune_run import check_cluster_fits, ray_session

    state = open_sweep(args.sweep_dir, "driver")
    with ray_session(state.dir, state.remote, args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus):
        if not args.allow_pending:
            check_cluster_fits(state.resources)
        return _drive(state)


# `opsd sweep run|resume` exits with these: every trial completed; some failed for good; the sweep stopped
# before every trial had finished (Ctrl-C, SIGUSR1, a second Ctrl-C), as a shell's 128 + SIGINT.
EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def _drive(state) -> int:
    """Run the sweep on the connected Ray; whatever stops it, its attempts and driver record say so, and the
    last lines say what happened and how to continue."""
    from orchestrator.collect import collect
    from orchestrator.driver import DRIVER_FILE, DriverRecord
    from orchestrator.errors import CONFIG_ERROR_EXIT, SweepError
    from orchestrator.sweep_state import close_open_attempts
    from orchestrator.sweep_status import clock, counts, status_table, sweep_status, unfinished
    from orchestrator.tune_run import run_sweep
    from orchestrator.wandb_log import offline_runs, set_aside_incomplete, sync_command

    console = _console(stderr=True)
    remote = state.remote_sweep()
    where = state.remote or state.dir
    driver = DriverRecord.start(state.dir)
    if remote is not None:
        remote.push(DRIVER_FILE)
    outcome = "stopped"  # Tune itself failed (SweepStopped), unless set below
    try:
        run_sweep(state, driver=driver, console=console)
        outcome = "finished"
    except KeyboardInterrupt:  # a second Ctrl-C: Tune stopped without saving its state one last time
        outcome = "interrupted"
    finally:
        # The trials stop with the driver; an attempt the stop cut short has no end event of its own.
        for trial_id in close_open_attempts(state, "the sweep's driver stopped"):
            if remote is not None:
                remote.push(f"trials/{trial_id}/attempts.jsonl")
        if outcome == "finished" and unfinished(sweep_status(state)):
            outcome = "interrupted"
        driver.end(state.dir, outcome)
        if remote is not None:
            remote.push(DRIVER_FILE)
        incomplete = set_aside_incomplete(state.wandb_dir)
    statuses = sweep_status(state)  # as `opsd sweep status` now shows it: the driver has ended
    n = counts(statuses)
    code = EXIT_INTERRUPTED if outcome == "interrupted" else EXIT_FAILED if n["failed"] else EXIT_DONE
    console.print(status_table(state, statuses, width=console.width))
    if state.remote:
        console.print(f"storage: {state.remote} (this machine's mirror: {state.dir})")
    console.print()
    try:
        trials_path, steps_path, _ = collect(state)
        console.print(f"results: {trials_path} and {steps_path} (`opsd analyze {state.dir} --out report/`)")
    except SweepError as err:  # a trial's damaged steps.parquet: say which, keep the rest of the summary
        console.print(f"[red]collect: {err}[/]")
        code = code or CONFIG_ERROR_EXIT
    console.print(f"trials: {', '.join(f'{v} {k}' for k, v in n.items() if v)} in {clock(time.time() - driver.started)}")
    console.print(f"logs: {state.dir}/trials/*/logs/attempt-*.log; Ray and Tune: {state.dir / 'driver.log'}")
    runs = offline_runs(state.wandb_dir)
    if runs:
        console.print(f"W&B offline runs: {len(runs)}; upload with `{sync_command(state.wandb_dir)}`")
    if incomplete:
        console.print(f"W&B: {len(incomplete)} run(s) of attempts stopped before they finished their run are in "
                      f"{incomplete[0].parent} (not uploaded by that command)")
    for s in statuses:
        if s.state == "failed" and s.failure:
            console.print(f"[red]{s.trial_id}[/]: {s.failure}")
    if outcome == "interrupted":
        console.print(f"[yellow]interrupted[/]: {unfinished(statuses)} trial(s) unfinished; "
                      f"`opsd sweep resume {where}` continues the sweep")
    elif n["failed"]:
        console.print(f"[red]{n['failed']} trial(s) failed[/]; see `opsd sweep status {where}`, then "
                      f"`opsd sweep resume {where}` to retry them")
    return code


def _status(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from orchestrator.sweep_state import open_sweep
    from orchestrator.sweep_status import driver_line, status_table, sweep_status

    state = open_sweep(args.sweep_dir)
    statuses = sweep_status(state)
    if args.json:
        for s in statuses:
            print(json.dumps(dataclasses.asdict(s)))
        return 0
    console = _console()
    console.print(status_table(state, statuses, width=console.width))
    for s in statuses:
        if s.failure:
            console.print(f"{s.trial_id}: {s.failure}")
    line = driver_line(state, statuses)
    if line:
        console.print(line)
    return 0


def _collect(args: argparse.Namespace) -> int:
    from orchestrator.collect import collect
    from orchestrator.sweep_state import open_sweep

    trials_path, steps_path, counts = collect(open_sweep(args.sweep_dir), args.out and Path(args.out))
    print(f"wrote {trials_path} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}) and {steps_path}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from orchestrator.shared_trials import shared_between
    from orchestrator.sweep_file import load_sweep

    loaded = [(Path(f), *load_sweep(f)) for f in args.sweep_files]
    shared = shared_between([(sweep.name, sweep.storage, points) for _, sweep, points in loaded])
    console = _console()
    totals = []
    for i, (path, sweep, points) in enumerate(loaded):
        if i:
            console.print()
        together = {tid: name for (sweep_name, tid), name in shared.items() if sweep_name == sweep.name}
        totals.append(_plan_one(path, sweep, points, together, args, console))
    if len(loaded) > 1:
        n_all = sum(len(points) for _, _, points in loaded)
        trained, hours = sum(t[0] for t in totals), sum(t[1] for t in totals)
        unit = "GPU-hours" if any(s.trial_resources.gpus for _, s, _ in loaded) else "CPU-core-hours"
        console.print()
        console.print(f"together: {n_all} trials in {len(loaded)} sweeps, {trained} trained and {n_all - trained} "
                      f"shared (each counted once), about {hours:.1f} {unit}; run them in the order given (a sweep "
                      f"links a shared trial once the sweep that trains it has completed it)", soft_wrap=True)
    return 0


def _plan_one(path: Path, sweep, points, together: dict[str, str], args: argparse.Namespace,
              console) -> tuple[int, float]:
    """One sweep's plan; returns (trials it trains, their device-hours)."""
    from orchestrator.plan import (
        budget_lines,
        checkpoint_bytes,
        estimate,
        find_references,
        human_bytes,
        mark_shared,
        plan_table,
        rates_lines,
    )
    from orchestrator.plan_data import data_lines, recipe_line
    from orchestrator.shared_trials import find_links, linked_sweep

    local_storage = "://" not in sweep.storage
    roots = [Path(p) for p in args.measured] or ([Path(sweep.storage).expanduser()] if local_storage else [])
    references = find_references([r for r in roots if r.is_dir()])
    # Completed by another sweep in the storage (linked when this one runs), or by a sweep planned before it.
    linked = ({tid: linked_sweep(link) for tid, link in
               find_links(Path(sweep.storage).expanduser(), sweep.name, points).items()} if local_storage else {})
    estimates = mark_shared(estimate(sweep, points, references), {**together, **linked})
    console.print(plan_table(sweep, estimates))
    used = {e.source.removeprefix("measured: ") for e in estimates}
    for line in rates_lines([r for r in references if str(r.folder) in used]):
        console.print(line)
    # Whole lines (the terminal wraps them), so that each can be found with grep.
    for line in dict.fromkeys(recipe_line(p.config) for p in points):
        console.print(line, soft_wrap=True)
    for line in data_lines(points):
        console.print(line, soft_wrap=True)
    for line in budget_lines(sweep, points):
        console.print(line, soft_wrap=True)
    res = sweep.trial_resources
    devices, kind = (res.gpus, "GPU") if res.gpus else (res.cpus, "CPU")
    own = [e for e in estimates if not e.shared_with]
    known = [e.device_hours for e in own if e.device_hours is not None]
    unit = "GPU-hours" if res.gpus else "CPU-core-hours"
    total = f"{sum(known):.1f} {unit}" + ("" if len(known) == len(own) else f" for the {len(known)} trials of known size")
    shared_note = ""
    if len(own) < len(estimates):
        by = sorted({e.shared_with for e in estimates if e.shared_with})
        shared_note = f" ({len(estimates) - len(own)} shared with {', '.join(by)}: trained there, not here)"
    console.print(f"{len(points)} trials{shared_note}, about {total}", soft_wrap=True)
    at_once = min(sweep.max_concurrent_trials or len(own), len(own)) or 1
    if known:
        # Wall time: each trial's device-hours over its devices; trials run in waves of `at_once`.
        wall = sorted(h / devices for h in known)
        sweep_wall = max(wall[-1], sum(wall) / at_once)
        which = "max_concurrent_trials" if sweep.max_concurrent_trials else "max_concurrent_trials unset: all"
        console.print(f"wall time: about {_span(wall[0], wall[-1])} per trial ({devices} {kind}s each); "
                      f"{at_once} trials at once ({which}, if the cluster has {at_once * devices} {kind}s) take "
                      f"about {_span(sweep_wall, sweep_wall)}", soft_wrap=True)
    peak, kept = checkpoint_bytes(sweep, own)
    console.print(f"checkpoints: up to {human_bytes(peak)} with {at_once} trials at once, "
                  f"{human_bytes(kept)} kept after (checkpoints.when_done: {sweep.checkpoints.when_done})",
                  soft_wrap=True)
    console.print(f"results in {sweep.storage.rstrip('/')}/{sweep.name}")
    _plan_memory(sweep, points, path, console)
    return len(own), sum(known)


def _plan_memory(sweep, points, sweep_path: Path, console) -> None:
    """Each model's memory per GPU by phase; a sweep that cannot fit its GPUs is refused after its tables."""
    from orchestrator.plan import check_memory, memory_estimates, memory_line, memory_table

    res = sweep.trial_resources
    if not res.gpus:
        return
    if res.memory_per_gpu_bytes is None:
        console.print("GPU memory not checked: name the GPU in resources (gpu: B200 or H100, or gpu_memory_gib)")
        return
    memories = memory_estimates(sweep, points)
    for m in memories:
        console.print()
        console.print(memory_table(sweep, m))
        console.print(memory_line(m))
    check_memory(sweep_path, sweep, memories)


def _span(lo: float, hi: float) -> str:
    """Hours in words: '12 min', '2.5 h', '20 h', or a range '2.2 h to 2.5 h'."""
    def one(h: float) -> str:
        return f"{h * 60:.0f} min" if h < 1 else f"{h:.0f} h" if h >= 10 else f"{h:.1f} h"
    return one(lo) if one(lo) == one(hi) else f"{one(lo)} to {one(hi)}"
