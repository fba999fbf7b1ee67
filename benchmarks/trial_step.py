"""One OPSD step on the embedded SmolLM2, phase by phase, and the share of its wall time that is glue.

The real trial code path: `trainer.runtime.start_runtime` (vLLM engine, sandbox, DeepSpeed student, EMA
self-teacher) and `trainer.trial.opsd_step` with its PhaseTimer, on HumanEval with the CPU demo sweep's sizes
(`--prompts` prompts x `--samples` rollouts of at most `--max-tokens` tokens, one mini-batch, micro-batches
of 4, `peer_solution_feedback`). One warm-up step, then `--steps` measured steps, each timed from the call
of `opsd_step` to its return. Medians over the measured steps are printed.

Glue, from the phase timers:

    glue = step wall time - model arithmetic - sandbox
    model arithmetic = rollout (vLLM generation) + old_logps + teacher_forward + student_forward_backward
                       + optimizer + ema_update (the EMA is parameter arithmetic, like the optimizer's)
    sandbox = grading the rollouts

so glue is teacher_context (feedback text, chat templates, tokenising), weight_push (serialising the
student's weights and loading them into vLLM) and the time between the timers (data order, packing and
padding the batches, metrics). Printed with its three parts, against the goal of < 10% of the step.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/trial_step.py --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARITHMETIC = ("rollout", "old_logps", "teacher_forward", "student_forward_backward", "optimizer", "ema_update")
SANDBOX = ("sandbox",)
GLUE_PHASES = ("teacher_context", "weight_push")
# The token count each arithmetic phase's tokens/s is given over (trainer.records.TOKEN_COLUMNS).
TOKENS_OF = {"rollout": "rollout_generated", "old_logps": "old_logps", "teacher_forward": "teacher_forward",
             "student_forward_backward": "student_forward_backward"}


def trial_config(args: argparse.Namespace):
    from trainer.config import TrialConfig

    return TrialConfig.model_validate({
        "name": "trial-step-bench", "steps": args.steps + 1, "seed": 0,
        "model": {"path": "embedded:smollm2-135m-instruct", "dtype": "float32"},
        "data": {"source": "humaneval", "split": "tests"},
        "context": {"name": "peer_solution_feedback", "max_teacher_prompt_tokens": 2048},
        "rollout": {"prompts_per_step": args.prompts, "n_samples": args.samples, "max_response_tokens": args.max_tokens,
                    "max_prompt_tokens": 768},
        "optim": {"lr": 1.0e-5, "mini_batch_size": args.prompts * args.samples, "micro_batch_size": 4},
        "teacher": {"ema_rate": 0.05},
        "sandbox": {"workers": 2},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from trainer.records import PhaseTimer
    from trainer.runtime import start_runtime
    from trainer.trial import opsd_step

    cfg = trial_config(args)
    started = time.perf_counter()
    rows = []
    with start_runtime(cfg) as trial:
        startup = time.perf_counter() - started
        for step in range(1, args.steps + 2):
            timer = PhaseTimer()
            step_started = time.perf_counter()
            metrics, _ = opsd_step(trial, step, timer)
            wall = time.perf_counter() - step_started
            if step > 1:  # the first step is the warm-up
                rows.append({"wall": wall, "seconds": dict(timer.seconds), "tokens": dict(timer.tokens),
                             "loss": metrics["loss"]})
            print(f"step {step}: {wall:.1f} s{' (warm-up)' if step == 1 else ''}", flush=True)

    def median(values) -> float:
        return statistics.median(values)

    phases = list(dict.fromkeys(p for r in rows for p in r["seconds"]))
    wall = median(r["wall"] for r in rows)
    arithmetic = [sum(r["seconds"].get(p, 0.0) for p in ARITHMETIC) for r in rows]
    sandbox = [sum(r["seconds"].get(p, 0.0) for p in SANDBOX) for r in rows]
    glue = [r["wall"] - a - s for r, a, s in zip(rows, arithmetic, sandbox)]
    untimed = [r["wall"] - sum(r["seconds"].values()) for r in rows]
    glue_share = [g / r["wall"] for g, r in zip(glue, rows)]

    print(f"\nSmolLM2-135M float32, {args.prompts} prompts x {args.samples} rollouts of at most {args.max_tokens} "
          f"tokens, one mini-batch, micro-batches of 4; {os.cpu_count()} CPUs, no GPU, load average "
          f"{os.getloadavg()[0]:.1f}; start-up {startup:.0f} s; medians of {len(rows)} steps after 1 warm-up")
    print(f"{'phase':<28}{'seconds':>9}{'share':>8}{'tokens':>9}{'tokens/s':>10}  counted as")
    for phase in phases:
        seconds = median(r["seconds"].get(phase, 0.0) for r in rows)
        column = TOKENS_OF.get(phase)
        tokens = median(r["tokens"].get(column, 0) for r in rows) if column else None
        rate = median(r["tokens"].get(column, 0) / r["seconds"][phase] for r in rows) if column else None
        kind = "arithmetic" if phase in ARITHMETIC else "sandbox" if phase in SANDBOX else "glue"
        print(f"{phase:<28}{seconds:>9.2f}{seconds / wall:>8.1%}{'-' if tokens is None else f'{tokens:.0f}':>9}"
              f"{'-' if rate is None else f'{rate:.0f}':>10}  {kind}")
    print(f"{'between the timers':<28}{median(untimed):>9.2f}{median(untimed) / wall:>8.1%}{'-':>9}{'-':>10}  glue")
    print(f"{'step (wall)':<28}{wall:>9.2f}{1:>8.1%}")
    print(f"\nmodel arithmetic {median(arithmetic):.2f} s, sandbox {median(sandbox):.2f} s, glue {median(glue):.2f} s "
          f"= {median(glue_share):.1%} of the step (median of per-step shares; goal < 10%): teacher_context "
          f"{median(r['seconds'].get('teacher_context', 0.0) for r in rows):.2f} s, weight_push "
          f"{median(r['seconds'].get('weight_push', 0.0) for r in rows):.2f} s, between the timers "
          f"{median(untimed):.2f} s")


if __name__ == "__main__":
    main()
