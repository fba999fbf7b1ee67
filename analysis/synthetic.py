"""Synthetic sweep results drawn from a known law, for tests, examples and trying the analysis out.

Each configuration (model × context) has a true gap; each seed measures it with noise (`gap_noise`) and
improves by `intercept + slope·true_gap` plus seed noise (`improvement_noise`). Steps follow the student
rising towards the self-teacher. Usage: `python -m analysis.synthetic OUT_DIR [--seed S]` writes
OUT_DIR/trials.parquet and OUT_DIR/steps.parquet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

# (model, family, size in billions): the paper's families and the Qwen3 scale series.
MODELS = (
    ("Qwen3-0.6B", "qwen3", 0.6), ("Qwen3-1.7B", "qwen3", 1.7), ("Qwen3-4B", "qwen3", 4.0),
    ("Qwen3-8B", "qwen3", 8.0), ("Olmo-3-7B-Instruct", "olmo3", 7.0),
)
# How much each context lifts the self-teacher above the student (before model effects).
CONTEXT_GAPS = {"none": 0.0, "expert_preamble": 0.04, "feedback": 0.08, "llm_peer_hints": 0.12,
                "own_solution_feedback": 0.15, "peer_solution_feedback": 0.2}
LAWS = {"qwen3": (-0.003, 0.8), "olmo3": (0.005, 0.6)}  # family: (intercept, slope)


def expected_gap(context: str, size: float) -> float:
    """A configuration's gap before its own draw and the seeds' measurement noise: the context's lift, larger
    for larger models."""
    return CONTEXT_GAPS.get(context, 0.1) * (1 + 0.1 * np.log2(size + 1))


def make_trials(rng: np.random.Generator, *, models=MODELS, contexts=tuple(CONTEXT_GAPS), n_seeds: int = 3,
                laws=LAWS, gap_noise: float = 0.01, improvement_noise: float = 0.015,
                n_failed: int = 1) -> pd.DataFrame:
    """One row per trial in the trials.parquet format, plus `n_failed` failed trials and extra columns the
    analysis must ignore: gpu_hours, and true_gap (the configuration's gap before measurement noise, so that
    its true improvement is intercept + slope·true_gap of its family's law)."""
    rows = []
    for model, family, size in models:
        intercept, slope = laws[family]
        base = 0.15 + 0.05 * np.log2(size + 1)  # larger models start stronger
        for context in contexts:
            true_gap = expected_gap(context, size) + rng.normal(0, 0.01)
            for seed in range(n_seeds):
                student = float(np.clip(base + rng.normal(0, 0.01), 0, 1))
                gap = true_gap + rng.normal(0, gap_noise)
                improvement = intercept + slope * true_gap + rng.normal(0, improvement_noise)
                rows.append({
                    "trial_id": f"{model}/{context}/s{seed}", "model": model, "model_family": family,
                    "model_size_b": size, "context": context, "seed": seed,
                    "initial_student_acc": student, "initial_student_acc_t1": student,
                    "initial_teacher_acc": student + gap, "initial_gap": gap,
                    "final_student_acc": student + improvement, "improvement": improvement,
                    "status": "completed", "gpu_hours": 20.0, "true_gap": float(true_gap),
                })
    for i in range(n_failed):
        failed = dict(rows[i % len(rows)], trial_id=f"failed-{i}", seed=1000 + i, status="failed")
        failed.update(final_student_acc=np.nan, improvement=np.nan)
        rows.append(failed)
    return pd.DataFrame(rows)


def make_steps(trials: pd.DataFrame, rng: np.random.Generator, *, n_steps: int = 50,
               eval_every: int = 5) -> pd.DataFrame:
    """Evaluation rows (phase "eval") every `eval_every` steps of each completed trial: the student moves
    from its initial to its final accuracy along an exponential, the EMA self-teacher drifts up slowly. The
    student's validation and train-time decodings are taken to score alike (`student_acc_t1` = `student_acc`)."""
    rows = []
    steps = np.arange(0, n_steps + 1, eval_every)
    for trial in trials[trials["status"] == "completed"].itertuples():
        progress = (1 - np.exp(-steps / (n_steps / 3))) / (1 - np.exp(-3))
        student = trial.initial_student_acc + progress * trial.improvement + rng.normal(0, 0.01, len(steps))
        teacher = trial.initial_teacher_acc + 0.3 * progress * trial.improvement + rng.normal(0, 0.01, len(steps))
        for step, s_acc, t_acc in zip(steps, student, teacher):
            rows.append({"trial_id": trial.trial_id, "step": int(step), "phase": "eval",
                         "student_acc": float(s_acc), "student_acc_t1": float(s_acc), "teacher_acc": float(t_acc),
                         "gap": float(t_acc - s_acc)})
    return pd.DataFrame(rows)


def write_synthetic(out_dir: str | Path, *, seed: int = 0, **options) -> Path:
    """Write trials.parquet and steps.parquet of a synthetic sweep into out_dir; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    trials = make_trials(rng, **options)
    trials.to_parquet(out / "trials.parquet", index=False)
    make_steps(trials, rng).to_parquet(out / "steps.parquet", index=False)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic sweep result drawn from a known law.")
    parser.add_argument("out", help="folder to write trials.parquet and steps.parquet into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    print(write_synthetic(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
