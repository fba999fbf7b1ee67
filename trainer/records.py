"""What a trial writes: its resolved settings (`config.json`), one row per step and phase (`steps.parquet`),
each step's rollouts (`rollouts/step-N.jsonl`), one summary (`trial.json`), and `progress.json`, where rank 0
says what the trial is doing now (for a sweep runner watching it).

Files are replaced atomically (write beside, then rename), so a trial killed mid-write leaves the previous
complete file; a resumed trial drops rows past its checkpoint before appending, so no step is duplicated.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.config import TrialConfig
from trainer.errors import TrialConfigError
from trainer.layout import TrialFolder
from trainer.models import count_parameters_b, model_family

# Bumped when a column changes meaning; readers check it.
STEPS_SCHEMA_VERSION = 1


def mean_or_zero(values) -> float:
    """Mean of a metric's values; 0 for none (an empty batch logs 0, not NaN)."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def claim_out_dir(cfg: TrialConfig, out_dir: Path) -> None:
    """Write config.json, or check that the folder holds this very trial (a resume) and not another."""
    path = TrialFolder(out_dir).config
    resolved = cfg.model_dump(mode="json")
    if path.exists():
        previous = json.loads(path.read_text())
        try:  # read through the config, so a setting renamed since still compares equal
            previous = TrialConfig.model_validate(previous).model_dump(mode="json")
        except ValueError:
            pass
        if previous != resolved:
            changed = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
            raise TrialConfigError(
                f"{out_dir} holds a trial with other settings (differing sections: {', '.join(changed)}); "
                "use another --out folder")
        return
    write_json(path, resolved)


def write_rollouts(path: Path, records: list[dict]) -> None:
    """One JSON line per rollout of a step (response, verdict, feedback, teacher prompt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def trial_summary(cfg: TrialConfig, model_path: Path, initial: dict, final: dict, seconds: float,
                  data: dict[str, Any] | None = None) -> dict[str, Any]:
    """trial.json of a completed trial: what the analysis reads (identity, initial gap, improvement), the data
    summary (`data/*`: problems loaded, dropped as over-long, split sizes), the resolved config and the code
    version. A trial that fails writes no trial.json (progress.json says why)."""
    name = cfg.model.path
    size = cfg.model.size_b if cfg.model.size_b is not None else count_parameters_b(model_path)
    gpus = cfg.deepspeed.world_size if cfg.device == "cuda" else 0
    return {
        "trial_id": cfg.name, "model": name, "model_family": cfg.model.family or model_family(name),
        "model_size_b": size, "context": cfg.context.name, "seed": cfg.seed, "status": "completed",
        "steps": cfg.steps,
        "initial_student_acc": initial["student_acc"], "initial_teacher_acc": initial["teacher_acc"],
        "initial_student_acc_t1": initial["student_acc_t1"], "initial_gap": initial["gap"],
        "initial_student_test_frac": initial["student_test_frac"],
        "initial_teacher_test_frac": initial["teacher_test_frac"], "initial_gap_test_frac": initial["gap_test_frac"],
        "final_student_acc": final["student_acc"], "final_teacher_acc": final["teacher_acc"],
        "final_student_test_frac": final["student_test_frac"],
        "improvement": final["student_acc"] - initial["student_acc"],
        "improvement_test_frac": final["student_test_frac"] - initial["student_test_frac"],
        "accuracy_metric": "all-pass mean@n (student_acc); fraction of tests passed in *_test_frac",
        "wall_seconds": round(seconds, 1), "gpu_hours": gpus * seconds / 3600.0, "device": cfg.device,
        **(data or {}), "config": cfg.model_dump(mode="json"), "code_version": code_version(),
    }


def data_line(cfg: TrialConfig, data: dict[str, Any]) -> str:
    """One line saying what the trial's data gave (`TrialRuntime.data_summary`), printed as it starts."""
    dropped = data.get("data/prompts_skipped_too_long", 0)
    ids = data.get("data/skipped_ids") or []
    line = (f"data: {data.get('data/problems_loaded', '?')} problems loaded, {dropped} dropped (student prompt "
            f"longer than rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens:,}"
            + (f": {', '.join(ids[:5])}{' and more' if len(ids) > 5 else ''})" if ids else ")")
            + f"; {data.get('data/train_problems', '?')} train problems ({data.get('data/train_tests', '?')} tests), "
            f"{data.get('data/val_problems', '?')} validation problems ({data.get('data/val_tests', '?')} tests)")
    if "data/problems_without_hint" in data:
        line += f"; {data['data/problems_without_hint']} without a hint"
    return line


class StepLog:
    """The rows of `steps.parquet`, kept in memory and rewritten whole after each step (a few KB)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            self.rows = pq.read_table(path).to_pylist()

    def truncate_after(self, step: int) -> None:
        """Forget rows of steps later than `step` (they ran after the checkpoint a resume starts from)."""
        self.rows = [row for row in self.rows if row["step"] <= step]

    def append(self, step: int, phase: str, metrics: dict[str, Any]) -> None:
        self.rows.append({"step": step, "phase": phase, "schema_version": STEPS_SCHEMA_VERSION, **metrics})

    def flush(self) -> None:
        # Rows of different phases carry different metrics: the union of columns, nulls where absent.
        columns = sorted({key for row in self.rows for key in row}, key=_column_order)
        table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in self.rows])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.path, sink.getvalue().to_pybytes())


def _column_order(name: str) -> tuple[int, str]:
    first = ("trial_id", "step", "phase")
    return (first.index(name), "") if name in first else (len(first), name)


class PhaseTimer:
    """Wall-clock seconds per named phase of one step, `with timer("rollout"): ...`, and the tokens the
    phases processed, `timer.add_tokens(teacher_forward=n)` (summed over a step's calls).

    `on_start(phase)`, if given, is called as each phase starts (`Progress.phase` keeps progress.json current).
    A step row holds `time/<phase>_s` and `tokens/<count>` (TOKEN_COLUMNS); with several ranks, rank 0's.
    In a process that uses a CUDA GPU it also holds each phase's GPU memory (GiB, the largest over the phase's
    calls): `memory/<phase>_peak_gib`, the most this process's tensors held during the phase (PyTorch's peak
    allocation), and `memory/<phase>_used_gib`, what the whole GPU had in use at its end (vLLM's process
    included), the figures `opsd sweep plan` estimates.
    """

    def __init__(self, on_start: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.memory: dict[str, float] = {}
        self.on_start = on_start

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.on_start is not None:
            self.on_start(phase)
        cuda = _cuda_in_use()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
            if cuda is not None:
                free, total = cuda.mem_get_info()
                for name, value in ((f"{phase}_peak_gib", cuda.max_memory_allocated()), (f"{phase}_used_gib", total - free)):
                    self.memory[name] = max(self.memory.get(name, 0.0), round(value / 2**30, 3))

    def add_tokens(self, **counts: int) -> None:
        for name, n in counts.items():
            self.tokens[name] = self.tokens.get(name, 0) + int(n)

    def metrics(self) -> dict[str, float]:
        return {**{f"time/{phase}_s": round(sec, 4) for phase, sec in self.seconds.items()},
                **{f"tokens/{name}": n for name, n in self.tokens.items()},
                **{f"memory/{name}": gib for name, gib in self.memory.items()}}


def _cuda_in_use():
    """torch.cuda when this process has initialised CUDA (a GPU trial), else None; never initialises it."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


# The token counts of a train row (`tokens/<name>`), what each counts. A forward's count is the real tokens
# of its packed rows (prompt + response per rollout, padding excluded); `_padded` adds the positions it
# computed, padding included (rows x padded length, summed over micro-batches). Teacher rows hold the
# teacher's prompt, student rows the student's: the same response after different prompts.
TOKEN_COLUMNS = {
    "rollout_prompt": "prompt tokens of every rollout request (a prompt sampled n times counts n times)",
    "rollout_generated": "tokens the engine generated (each response's tokens, its end token included)",
    "old_logps": "real tokens of the student's no-gradient forward for the importance ratio",
    "old_logps_padded": "positions of that forward, padding included",
    "teacher_forward": "real tokens of the self-teacher's forwards",
    "teacher_forward_padded": "positions of those forwards, padding included",
    "student_forward_backward": "real tokens of the student's forwards (each also back-propagated)",
    "student_forward_backward_padded": "positions of those forwards and backwards, padding included",
}


class Progress:
    """OUT/progress.json: what a running trial is doing, rewritten atomically at each phase start.

    Fields: `status` ("running", "completed" or "failed"), `step` (the step running, 0 during the initial
    evaluation), `steps` (the trial's total), `phase` (the phase running: "setup" (loading data and models,
    starting vLLM and the sandbox), "resume" (loading a checkpoint), "initial_eval", then each step's phases
    as its PhaseTimer names them: "rollout", "sandbox" (grading), "teacher_context", "rollout_gather" (waiting
    for every engine's share of the rollouts), "old_logps",
    "teacher_forward", "student_forward_backward", "optimizer", "weight_push", "ema_update"; then "eval" and
    "checkpoint"), `phase_started`, `started` (this attempt), `updated` (all unix times), and `error` (one
    line) when failed. Only rank 0 keeps one; other ranks pass `path=None` and every call is a no-op.
    """

    def __init__(self, path: Path | None, *, steps: int) -> None:
        self.path = path
        now = time.time()
        self.state: dict[str, Any] = {"status": "running", "step": 0, "steps": steps, "phase": "setup",
                                      "phase_started": now, "started": now, "updated": now}
        self._write()

    def phase(self, name: str) -> None:
        """A phase starts (the PhaseTimer hook)."""
        now = time.time()
        self.state.update(phase=name, phase_started=now, updated=now)
        self._write()

    def step(self, step: int) -> None:
        """Step `step` starts; its first phase writes the file."""
        self.state["step"] = step

    def timer(self) -> PhaseTimer:
        """A PhaseTimer whose phase starts are reported here."""
        return PhaseTimer(on_start=self.phase)

    def completed(self) -> None:
        self.state.update(status="completed", updated=time.time())
        self._write()

    def failed(self, err: BaseException) -> None:
        self.state.update(status="failed", error=error_line(err), updated=time.time())
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            write_json(self.path, self.state)


def error_line(err: BaseException, limit: int = 500) -> str:
    """One line naming an exception: its type and the first line of its message, at most `limit` characters."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text[:limit]


def mark_failed(path: Path, err: BaseException) -> None:
    """Set progress.json at `path` to failed unless a rank already did (it knows the first cause)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {"step": 0, "phase": "setup", "started": time.time()}
    if state.get("status") == "failed":
        return
    state.update(status="failed", error=error_line(err), updated=time.time())
    write_json(path, state)


def code_version() -> str:
    """The code a trial ran: the git commit of the checkout this package lives in, with "-dirty" when the tree
    has uncommitted changes (untracked files too: they may be imported); outside a git checkout, the installed
    distribution's version ("opsd-sweep==0.1.0")."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "HEAD") if top and Path(top).resolve() == root else None
    if commit:
        status = git("status", "--porcelain")
        return commit + ("-dirty" if status is None or status else "")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"opsd-sweep=={version('opsd-sweep')}"
    except PackageNotFoundError:
        return "unknown"
