"""The driver of a sweep: Ray Tune runs one trial per grid point, retries failures, and can be restored.

`ray_session` connects to a Ray cluster (or starts one on this machine) and `check_cluster_fits` refuses
resources no node can hold, both before the sweep folder is written; `run_sweep` then either starts the Tune
experiment or, when the sweep folder already holds one (a driver that died, a SLURM requeue, a RayJob retry),
restores it with its errored trials resumed. While Tune runs, the terminal shows one live table read from the
sweep folder and the driver's heartbeat goes to `driver.json`; Ray's and Tune's own messages go to `driver.log`
and each trial's processes print into its own log file. Ctrl-C (or SIGUSR1) makes Tune save its state and
stop the trials; `fit()` then returns with trials unfinished, which the caller reports as an interruption.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.live import Live

from orchestrator.driver import DRIVER_FILE, DriverRecord
from orchestrator.errors import SweepError, SweepStopped
from orchestrator.remote import RemoteSweep
from orchestrator.sweep_file import Resources
from orchestrator.sweep_state import SMALL_FILES_SKIP, SweepState
from orchestrator.sweep_status import status_table, sweep_status


@contextmanager
def ray_session(sweep_dir: Path, remote: str | None, address: str | None, *, num_cpus: int | None = None,
                num_gpus: int | None = None) -> Iterator[None]:
    """Ray for the body (`init_ray`), shut down after it; a remote sweep gets its driver.log pushed."""
    import ray

    init_ray(sweep_dir, address, num_cpus=num_cpus, num_gpus=num_gpus)
    try:
        yield
    finally:
        ray.shutdown()
        if remote:
            RemoteSweep(remote, sweep_dir).push("driver.log")


def init_ray(sweep_dir: Path, address: str | None, *, num_cpus: int | None = None,
             num_gpus: int | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start Ray on this machine; Ray's noise goes to driver.log."""
    import ray

    _send_ray_logs_to(sweep_dir / "driver.log")
    # Not RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper: the raylet then kills every orphan that
    # reaches it, including the sandbox's fork servers (they detach on purpose); a trial's clean-up is ours.
    # Tune's console output is replaced by our live view; its result tables would be noise.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray's memory monitor kills a trainable's worker when the node runs low, and Tune then stops the whole
        # sweep (an OutOfMemoryError it does not retry). A trial's memory is its `opsd trial` process, which the
        # kernel's OOM killer takes first; the trainable sees that process fail, and Tune retries the trial.
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
        # "local": a Ray of its own, never one that `ray start` left its address for in /tmp/ray (which an
        # address-less ray.init joins, stopped or not): joining a cluster takes RAY_ADDRESS or --address.
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **kwargs)
    _send_ray_logs_to(sweep_dir / "driver.log")  # ray.init empties the "ray" logger's handlers


# Ray's loggers that speak in the driver; ray.init resets the top one, so the others carry the file too.
_RAY_LOGGERS = ("ray", "ray._private", "ray.tune", "ray.train", "ray.air", "ray.data", "ray.util", "ray.autoscaler")


def _send_ray_logs_to(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):  # Ray's own handlers write to the terminal
            if not isinstance(old, logging.FileHandler):
                logger.removeHandler(old)
        if not any(getattr(h, "baseFilename", None) == handler.baseFilename for h in logger.handlers):
            logger.addHandler(handler)
        logger.propagate = False


def check_cluster_fits(need: Resources) -> None:
    """Refuse a sweep whose trial fits on no node (Tune would wait for it forever)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= need.cpus and r.get("GPU", 0) >= need.gpus for r in nodes):
        return
    largest = ", ".join(f"{int(r.get('CPU', 0))} CPUs/{int(r.get('GPU', 0))} GPUs" for r in nodes) or "none"
    raise SweepError(f"resources: a trial needs {need.cpus} CPUs and {need.gpus} GPUs on one node; the cluster's "
                     f"nodes have {largest} (use a smaller preset, or --allow-pending for an autoscaling cluster)")


def placement(state: SweepState):
    """One bundle on one node holds everything the trial runs: its processes are local, not Ray tasks."""
    from ray import tune

    bundle = {"CPU": state.resources.cpus}
    if state.resources.gpus:
        bundle["GPU"] = state.resources.gpus
    return tune.PlacementGroupFactory([bundle], strategy="PACK")


def build_tuner(state: SweepState):
    from ray import tune

    from orchestrator.trainable import train_grid_point

    trainable = tune.with_resources(train_grid_point, placement(state))
    # Tune keeps its experiment state in the sweep folder, or at the sweep's URI (it reads URIs itself).
    storage = state.remote or str(state.dir)
    tune_dir = f"{storage}/{state.tune_dir.name}"
    if tune.Tuner.can_restore(tune_dir):
        return tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True), True
    run_config = tune.RunConfig(
        name=state.tune_dir.name, storage_path=storage, verbose=0,
        failure_config=tune.FailureConfig(max_failures=state.max_failures),
        # Our trials keep their own checkpoints in the sweep folder; Tune keeps only its experiment state.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    names = dict(trial_name_creator=lambda trial: trial.config["trial_id"],
                 trial_dirname_creator=lambda trial: trial.config["trial_id"])
    if state.guided is not None:
        from orchestrator.guided_search import GuidedSearcher

        # The searcher chooses each trial and ends the search itself (FINISHED): samples without limit.
        tune_config = tune.TuneConfig(search_alg=GuidedSearcher(str(state.dir)), num_samples=-1,
                                      max_concurrent_trials=state.max_concurrent_trials, **names)
        param_space = {"sweep_dir": str(state.dir), "sweep_uri": state.remote}
        return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config), False
    tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=state.max_concurrent_trials, **names)
    param_space = {"sweep_dir": str(state.dir), "sweep_uri": state.remote,
                   "trial_id": tune.grid_search(state.trials_to_train)}  # linked trials are not run again
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config), False


def run_sweep(state: SweepState, *, driver: DriverRecord, console: Console | None = None) -> None:
    """Run (or continue) the sweep on the connected Ray until every trial has finished or failed, or until
    Ctrl-C/SIGUSR1 stops it (Tune saves its state and stops the trials first); `driver` gets its heartbeat.
    Raises SweepStopped when Tune itself fails."""
    console = console or Console(stderr=True)
    if state.links:
        console.print(f"{len(state.links)} of {len(state.trials)} trials completed in other sweeps of the same "
                      f"storage are linked, not trained again: " + ", ".join(sorted(state.links)))
    if not state.trials_to_train:
        return
    if state.guided is not None:
        from orchestrator.guided_screen import screen_sweep

        screen_sweep(state, console)
    tuner, restored = build_tuner(state)
    concurrency, cluster = _concurrency(state)
    need = f"{state.resources.cpus} CPUs" + (f" and {state.resources.gpus} GPUs" if state.resources.gpus else "")
    console.print(f"[bold]{'continuing' if restored else 'starting'} sweep {state.name}[/]: "
                  f"{len(state.trials)} trials in {state.remote or state.dir}; {concurrency} at a time "
                  f"(each takes {need}; the cluster has {cluster})")
    started = time.time()
    stop = threading.Event()
    remote = state.remote_sweep()

    def table():
        return status_table(state, sweep_status(state), elapsed=time.time() - started, concurrency=concurrency,
                            width=console.width)

    # Transient: the caller prints the final table once the stop is recorded (interrupted attempts included).
    with Live(table(), console=console, refresh_per_second=1, transient=True) as live:
        def refresh() -> None:
            # A remote sweep's trials push to its URI: the view pulls their small files less often.
            while not stop.wait(10.0 if remote else 2.0):
                if driver.beat(state.dir) and remote is not None:
                    remote.push(DRIVER_FILE)
                if remote is not None:
                    remote.pull(skip=SMALL_FILES_SKIP)
                live.update(table())
        thread = threading.Thread(target=refresh, daemon=True)
        thread.start()
        try:
            tuner.fit()
        except Exception as err:  # the driver's own failure; a trial's failures are retried inside fit()
            logging.getLogger("ray.tune").exception("Ray Tune stopped the sweep")
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise SweepStopped(
                f"Ray Tune stopped the sweep: {first_line} (traceback in {state.dir / 'driver.log'}); "
                f"`opsd sweep resume {state.remote or state.dir}` continues it") from err
        finally:
            stop.set()
            thread.join()
            if remote is not None:
                remote.pull(skip=SMALL_FILES_SKIP)
            live.update(table())


def _concurrency(state: SweepState) -> tuple[int, str]:
    """How many trials the cluster runs at once, and its resources in words."""
    import ray

    total = ray.cluster_resources()
    fit = int(total.get("CPU", 1) // state.resources.cpus)
    if state.resources.gpus:
        fit = min(fit, int(total.get("GPU", 0) // state.resources.gpus))
    if state.max_concurrent_trials:
        fit = min(fit, state.max_concurrent_trials)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    cluster = f"{int(total.get('CPU', 0))} CPUs" + (f", {int(total.get('GPU', 0))} GPUs" if total.get("GPU") else "")
    return max(fit, 1), cluster + (f" on {nodes} nodes" if nodes > 1 else "")
