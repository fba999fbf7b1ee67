"""Screening N contexts at once (`opsd screen`) against N separate gap-only trials (`opsd trial --set steps=0`).

Both measure each context's initial gap at the same sizes (validation problems, samples per problem, tokens)
and seed on the embedded SmolLM2 and HumanEval, each as a user runs it: one `opsd` process per command, wall
time from start to exit. The screen starts one engine and samples the student once; each gap-only trial starts
its own engine (and builds its DeepSpeed student), samples the student at the validation decoding and at
train-time decoding, and its one context's self-teacher. Prints both times, their ratio, and each context's
student and self-teacher accuracy from both, which must agree (same seeds, same samples).

    .venv/bin/python benchmarks/screen_vs_trials.py --out /tmp/screen-bench
    .venv/bin/python benchmarks/screen_vs_trials.py --out /tmp/screen-bench --contexts none,llm_peer_hints --val-problems 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONTEXTS = "none,expert_preamble,feedback,llm_peer_hints,own_solution_feedback,peer_solution_feedback"
# Launcher variables a test process may hold; a command started from a shell has none of them.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def trial_settings(args: argparse.Namespace) -> dict:
    """The demo's trial at the benchmark's sizes; both sides read this same file."""
    return {
        "name": "screen-bench", "steps": 0, "seed": 0,
        "model": {"path": args.model, "dtype": "float32"},
        "data": {"source": "humaneval", "split": "tests", "max_val_problems": args.val_problems},
        "context": {"name": "none", "max_teacher_prompt_tokens": 2048},
        "rollout": {"max_response_tokens": args.max_tokens, "max_prompt_tokens": 1024},
        "eval": {"n_samples": args.samples, "teacher_n_samples": args.samples},
    }


def timed(cmd: list[str], log: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for the trial file, results and logs")
    parser.add_argument("--contexts", default=CONTEXTS, help="comma-separated contexts (default: the six built-ins)")
    parser.add_argument("--val-problems", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2, help="samples per problem (eval.n_samples and "
                        "eval.teacher_n_samples)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    args = parser.parse_args()

    import yaml

    args.out.mkdir(parents=True, exist_ok=True)
    trial = args.out / "trial.yaml"
    trial.write_text(yaml.safe_dump(trial_settings(args)))
    opsd = [sys.executable, "-m", "orchestrator.cli"]
    contexts = [c for c in args.contexts.split(",") if c]

    # Convert the embedded model once (cached), so neither side pays for it.
    from trainer.config import ModelConfig
    from trainer.models import resolve_model

    resolve_model(ModelConfig(path=args.model))

    screen_s = timed([*opsd, "screen", str(trial), "--out", str(args.out / "screen"), "--contexts", args.contexts],
                     args.out / "screen.out")
    screened = {row["context"]: row for row in json.loads((args.out / "screen" / "screen.json").read_text())["rows"]}
    trial_s, trials = {}, {}
    for context in contexts:
        out = args.out / f"trial-{context}"
        trial_s[context] = timed([*opsd, "trial", str(trial), "--out", str(out), "--set", f"context.name={context}"],
                                 args.out / f"trial-{context}.out")
        trials[context] = json.loads((out / "trial.json").read_text())

    total = sum(trial_s.values())
    print(f"{len(contexts)} contexts, {args.val_problems} validation problems x {args.samples} samples, "
          f"at most {args.max_tokens} tokens, {args.model}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'context':<24}{'trial s':>9}  student acc screen/trial  teacher acc screen/trial")
    for context in contexts:
        s, t = screened[context], trials[context]
        print(f"{context:<24}{trial_s[context]:>9.1f}  {s['initial_student_acc_t1']:.3f} / {t['initial_student_acc_t1']:.3f}"
              f"{'':>13}{s['initial_teacher_acc']:.3f} / {t['initial_teacher_acc']:.3f}")
    print(f"screen, all {len(contexts)} contexts at once: {screen_s:.1f} s")
    print(f"{len(contexts)} gap-only trials, one after another: {total:.1f} s")
    print(f"ratio screen / trials: {screen_s / total:.2f} (goal: at most 0.5)")
    agree = all(screened[c]["initial_student_acc_t1"] == trials[c]["initial_student_acc_t1"]
                and screened[c]["initial_teacher_acc"] == trials[c]["initial_teacher_acc"] for c in contexts)
    print(f"same student and self-teacher accuracy on both sides: {agree}")
    (args.out / "result.json").write_text(json.dumps({
        "screen_s": screen_s, "trials_s": trial_s, "trials_total_s": total, "ratio": screen_s / total,
        "agree": agree, "sizes": trial_settings(args)}, indent=2))


if __name__ == "__main__":
    main()
