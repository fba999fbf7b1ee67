"""`opsd sweep plan`: the grid, the resources, the compute and the checkpoint storage of a sweep, before it runs.

Compute comes from measured phase times when a finished trial of the same model exists (its steps.parquet:
median seconds per training step and per evaluation, scaled by the tokens each phase handles), else from a
stated per-token model:

    device-seconds per trial = tokens x size_b x SECONDS_PER_TOKEN_BILLION[device]

with tokens = steps x rollouts per step x mean response tokens (training: rollout, teacher forward, student
forward and backward) plus the evaluations' sampled tokens, and the mean response taken as half its maximum.
The GPU constant is set so that the papers' setting (Qwen3-8B, 50 steps of 32 x 8 rollouts up to 16k tokens,
evaluations every 5 steps) gives their ~20 B200-hours per run (METHOD.md section 5); the CPU one was measured
with SmolLM2-135M on the 2-core machine of the README. Either is a rough guide, and says so.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from orchestrator.sweep_file import GridPoint, SweepFile
from orchestrator.sweep_state import read_step_rows

# Device-seconds per (token x billion parameters), calibrated as the module docstring says.
SECONDS_PER_TOKEN_BILLION = {"cuda": 4.8e-5, "cpu": 0.40}
# Checkpoint bytes per parameter: module weights, fp32 Adam moments (and fp32 master weights with bf16),
# and the EMA teacher.
BYTES_PER_PARAM = {"float32": 4 + 8 + 4, "bfloat16": 2 + 12 + 2}
FINAL_BYTES_PER_PARAM = {"float32": 4 + 4, "bfloat16": 2 + 2}
_SIZE_IN_NAME = re.compile(r"(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", re.IGNORECASE)
EMBEDDED_SIZE_B = 0.135


@dataclass
class TrialEstimate:
    point: GridPoint
    size_b: float | None
    tokens: float
    device_hours: float | None
    source: str  # "measured: <trial folder>" or "per-token model"


def model_size_b(point: GridPoint) -> float | None:
    """Billions of parameters: the sweep's `size_b`, else read from the model's name (Qwen3-8B -> 8)."""
    if point.config.model.size_b is not None:
        return point.config.model.size_b
    if point.config.model.path.startswith("embedded:"):
        return EMBEDDED_SIZE_B
    match = _SIZE_IN_NAME.search(point.config.model.path.split("/")[-1])
    if not match:
        return None
    value = float(match.group(1))
    return value if match.group(2).lower() == "b" else value / 1000


def trial_tokens(point: GridPoint) -> float:
    cfg = point.config
    mean_response = cfg.rollout.max_response_tokens / 2
    train = cfg.steps * cfg.rollout.prompts_per_step * cfg.rollout.n_samples * mean_response
    evals = cfg.steps // cfg.eval.every_steps + 1 + (cfg.steps % cfg.eval.every_steps != 0)
    val_problems = cfg.data.max_val_problems or 100
    eval_response = (cfg.eval.max_response_tokens or cfg.rollout.max_response_tokens) / 2
    per_eval = val_problems * (cfg.eval.n_samples + 1 + cfg.eval.teacher_n_samples) * eval_response
    return train + evals * per_eval


def measured_reference(point: GridPoint, search_roots: list[Path]) -> tuple[Path, float] | None:
    """A finished trial of the same model under `search_roots`, and its seconds per token."""
    import json

    for root in search_roots:
        for summary_path in sorted(root.glob("**/trial.json")):
            try:
                summary = json.loads(summary_path.read_text())
            except (OSError, ValueError):
                continue
            if summary.get("model") != point.config.model.path or summary.get("status", "completed") != "completed":
                continue
            config_path = summary_path.parent / "config.json"
            if not config_path.is_file():
                continue
            from trainer.config import TrialConfig

            try:
                ref = TrialConfig.model_validate(json.loads(config_path.read_text()))
            except Exception:
                continue
            rows = read_step_rows(summary_path.parent / "steps.parquet")
            train = [sum(v for k, v in r.items() if k.startswith("time/") and v) for r in rows if r["phase"] == "train"]
            if not train:
                continue
            ref_point = GridPoint("ref", "ref", ref.context.name, ref.seed, ref)
            wall = float(summary.get("wall_seconds") or 0)
            step_s = statistics.median(train)
            # Everything outside the training steps (start-up, evaluations) per evaluated token.
            other_s = max(wall - step_s * len(train), 0.0)
            ref_train_tokens = ref.steps * ref.rollout.prompts_per_step * ref.rollout.n_samples \
                * ref.rollout.max_response_tokens / 2
            per_token = (step_s * ref.steps + other_s) / max(trial_tokens(ref_point), 1.0) if ref_train_tokens else None
            if per_token:
                return summary_path.parent, per_token
    return None


def estimate(sweep: SweepFile, points: list[GridPoint], search_roots: list[Path]) -> list[TrialEstimate]:
    out = []
    res = sweep.trial_resources
    devices = res.gpus or res.cpus  # GPU-hours on GPUs, core-hours on CPUs
    for point in points:
        size = model_size_b(point)
        tokens = trial_tokens(point)
        ref = measured_reference(point, search_roots)
        if ref is not None:
            folder, per_token = ref
            hours = tokens * per_token * devices / 3600
            out.append(TrialEstimate(point, size, tokens, hours, f"measured: {folder}"))
        elif size is not None:
            per_token = SECONDS_PER_TOKEN_BILLION[point.config.device] * size
            out.append(TrialEstimate(point, size, tokens, tokens * per_token / 3600, "per-token model"))
        else:
            out.append(TrialEstimate(point, None, tokens, None, "unknown size: give models[].size_b"))
    return out


def checkpoint_bytes(sweep: SweepFile, estimates: list[TrialEstimate]) -> tuple[float, float]:
    """(peak while running, kept after the sweep) bytes of checkpoints; the peak assumes `max_concurrent_trials`
    trials (or all of them) run at once."""
    keep = sweep.checkpoints.keep_last
    running = sweep.max_concurrent_trials or len(estimates)
    per_trial_running, per_trial_final = [], []
    for e in estimates:
        params = (e.size_b or 0) * 1e9
        dtype = e.point.config.model.dtype
        per_trial_running.append(params * BYTES_PER_PARAM[dtype] * keep)
        final = {"full": params * BYTES_PER_PARAM[dtype] * keep, "weights": params * FINAL_BYTES_PER_PARAM[dtype],
                 "none": 0.0}[sweep.checkpoints.when_done]
        per_trial_final.append(final)
    biggest_running = sorted(per_trial_running, reverse=True)[:running]
    return sum(per_trial_final) + sum(biggest_running), sum(per_trial_final)


def plan_table(sweep: SweepFile, estimates: list[TrialEstimate]) -> Table:
    res = sweep.trial_resources
    unit = "GPU-h" if res.gpus else "CPU-h"
    table = Table(title=f"sweep {sweep.name}: {len(estimates)} trials "
                  f"({len(sweep.models)} models x {len(sweep.contexts)} contexts x {len(sweep.seeds)} seeds), "
                  f"each {res.gpus} GPUs, {res.cpus} CPUs, {res.sandbox_workers} sandbox workers",
                  title_justify="left")
    for column in ("trial", "size (B)", "steps", "tokens", unit, "estimate from"):
        table.add_column(column, justify="left" if column in ("trial", "estimate from") else "right")
    for e in estimates:
        table.add_row(e.point.trial_id, "-" if e.size_b is None else f"{e.size_b:g}", str(e.point.config.steps),
                      f"{e.tokens / 1e6:.1f}M" if e.tokens >= 1e5 else f"{e.tokens / 1e3:.0f}k", "-" if e.device_hours is None else f"{e.device_hours:.1f}", e.source)
    return table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
