"""`opsd sweep run|resume|status|collect|plan`: a grid of OPSD trials on Ray Tune, and its results."""

from __future__ import annotations

import argparse
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
    from orchestrator.sweep_file import load_sweep
    from orchestrator.sweep_state import prepare_sweep_dir, sweep_location

    sweep, points = load_sweep(args.sweep_file)
    check_memory(Path(args.sweep_file), sweep, memory_estimates(sweep, points))  # before any GPU-hour is spent
    local, remote = sweep_location(sweep, args.storage)
    state = prepare_sweep_dir(sweep, points, local, Path(args.sweep_file), remote=remote)
    return _drive(state, args)


def _resume(args: argparse.Namespace) -> int:
    from orchestrator.sweep_state import open_sweep

    return _drive(open_sweep(args.sweep_dir, "driver"), args)


def _drive(state, args: argparse.Namespace) -> int:
    from orchestrator.collect import collect
    from orchestrator.tune_run import run_sweep
    from orchestrator.wandb_log import offline_runs, sync_command

    console = _console(stderr=True)
    failed = run_sweep(state, address=args.address, allow_pending=args.allow_pending, console=console,
                       num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    trials_path, steps_path, counts = collect(state)
    if state.remote:
        console.print(f"storage: {state.remote} (this machine's mirror: {state.dir})")
    console.print()
    console.print(f"trials: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}")
    console.print(f"results: {trials_path} and {steps_path} (`opsd analyze {state.dir} --out report/`)")
    console.print(f"logs: {state.dir}/trials/*/logs/attempt-*.log; Ray and Tune: {state.dir / 'driver.log'}")
    if offline_runs(state.wandb_dir):
        console.print(f"W&B offline runs: {len(offline_runs(state.wandb_dir))}; upload with `{sync_command(state.wandb_dir)}`")
    if failed:
        console.print(f"[red]{failed} trial(s) failed[/]; see `opsd sweep status {state.dir}`, then "
                      f"`opsd sweep resume {state.dir}` to retry them")
    return 1 if failed else 0


def _status(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from orchestrator.sweep_state import open_sweep
    from orchestrator.sweep_status import status_table, sweep_status

    state = open_sweep(args.sweep_dir)
    statuses = sweep_status(state)
    if args.json:
        for s in statuses:
            print(json.dumps(dataclasses.asdict(s)))
        return 0
    console = _console()
    console.print(status_table(state, statuses))
    for s in statuses:
        if s.failure:
            console.print(f"{s.trial_id}: {s.failure}")
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
    estimates = mark_shared(estimate(sweep, points, [], references=references), {**together, **linked})
    console.print(plan_table(sweep, estimates))
    used = {e.source.removeprefix("measured: ") for e in estimates}
    for line in rates_lines([r for r in references if str(r.folder) in used]):
        console.print(line)
    # Whole lines (the terminal wraps them), so that each can be found with grep.
    for line in dict.fromkeys(recipe_line(p.config) for p in points):
        console.print(line, soft_wrap=True)
    for line in data_lines(points):
        console.print(line, soft_wrap=True)
    own = [e for e in estimates if not e.shared_with]
    known = [e.device_hours for e in own if e.device_hours is not None]
    unit = "GPU-hours" if sweep.trial_resources.gpus else "CPU-core-hours"
    total = f"{sum(known):.1f} {unit}" + ("" if len(known) == len(own) else f" for the {len(known)} trials of known size")
    peak, kept = checkpoint_bytes(sweep, own)
    at_once = sweep.max_concurrent_trials or len(own)
    shared_note = ""
    if len(own) < len(estimates):
        by = sorted({e.shared_with for e in estimates if e.shared_with})
        shared_note = f" ({len(estimates) - len(own)} shared with {', '.join(by)}: trained there, not here)"
    console.print(f"{len(points)} trials{shared_note}, about {total}; checkpoints: up to {human_bytes(peak)} with "
                  f"{at_once} trials running at once, {human_bytes(kept)} kept after (checkpoints.when_done: "
                  f"{sweep.checkpoints.when_done})", soft_wrap=True)
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
