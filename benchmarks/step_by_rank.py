"""One OPSD step and one evaluation at 1 and at 2 ranks with an engine on every rank, phase by phase, and the
ratios (2 ranks / 1 rank).

The real trial code path: `trainer.runtime.start_runtime` on every rank (its vLLM engine on its own cores,
its sandbox workers, the DeepSpeed student over gloo, the EMA teacher), `trainer.trial.opsd_step` with its
PhaseTimer, and the trial's evaluation (`trainer.trial._evaluate`), on HumanEval with the CPU demo's sizes
(`--prompts` prompts x `--samples` rollouts of at most `--max-tokens` tokens, one mini-batch, micro-batches of
4; one evaluation sample per problem on `--val-problems` problems). Per world size: one warm-up step, then
one measured step and one measured evaluation. A phase's time at 2 ranks is the slower rank's (the other
waits for it in the gather that follows).

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/step_by_rank.py

What a CPU can show: whether the work splits (each engine samples half the prompts, each sandbox grades half,
each trainer runs half the micro-batches, each evaluates half the problems) and what the split costs
(gathering the samples, two engines' start-up). On 2 cores vLLM binds one engine to one core either way (at
1 rank its automatic binding keeps a core for the scheduler), so the rollout can halve; the trainer's forwards
cannot, since 1 rank's torch already uses both cores. What it cannot show: a GPU's times, where each rank has
a device of its own, decoding is memory-bound and every rank's engine adds a whole GPU's throughput (the
plan's estimate, README "the papers' grids").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trial_settings(args: argparse.Namespace, world_size: int) -> dict:
    return {
        "name": f"step-by-rank-{world_size}", "steps": 2, "seed": 0,
        "model": {"path": args.model, "dtype": "float32"},
        "data": {"source": "humaneval", "split": "tests", "max_val_problems": args.val_problems},
        "context": {"name": "peer_solution_feedback", "max_teacher_prompt_tokens": 2048},
        "rollout": {"prompts_per_step": args.prompts, "n_samples": args.samples, "max_response_tokens": args.max_tokens,
                    "max_prompt_tokens": 768, "engines": "every_rank"},
        "optim": {"lr": 1.0e-5, "mini_batch_size": args.prompts * args.samples, "micro_batch_size": 4},
        "teacher": {"ema_rate": 0.05},
        "deepspeed": {"world_size": world_size},
        "eval": {"n_samples": 1, "teacher_n_samples": 1, "temperature": 1.0, "top_p": 1.0},
        "sandbox": {"workers": 2},
    }


def rank_main(rank: int, settings: dict) -> dict:
    """One rank: start-up, a warm-up step, a measured step and a measured evaluation."""
    from trainer.config import TrialConfig
    from trainer.records import PhaseTimer
    from trainer.runtime import start_runtime
    from trainer.trial import _evaluate, opsd_step

    started = time.perf_counter()
    with start_runtime(TrialConfig.model_validate(settings)) as trial:
        startup = time.perf_counter() - started
        for step in (1, 2):
            timer = PhaseTimer()
            step_started = time.perf_counter()
            opsd_step(trial, step, timer)
            step_wall = time.perf_counter() - step_started
        eval_started = time.perf_counter()
        _evaluate(trial)
        eval_wall = time.perf_counter() - eval_started
    return {"startup": startup, "seconds": dict(timer.seconds), "step": step_wall, "eval": eval_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--val-problems", type=int, default=8)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from trainer.distributed import run_local_ranks

    runs = {}
    for world_size in (1, 2):
        started = time.perf_counter()
        runs[world_size] = run_local_ranks(rank_main, world_size, trial_settings(args, world_size),
                                           torch_threads=max(1, len(os.sched_getaffinity(0)) // world_size),
                                           timeout_s=3600)
        print(f"{world_size} rank{'s' * (world_size > 1)}: {time.perf_counter() - started:.0f} s in all", flush=True)

    def slowest(world_size: int, key: str, phase: str | None = None) -> float:
        ranks = runs[world_size]
        return max((r["seconds"].get(phase, 0.0) if phase else r[key]) for r in ranks)

    phases = list(dict.fromkeys(p for world_size in runs for r in runs[world_size] for p in r["seconds"]))
    print(f"\n{args.model}, {args.prompts} prompts x {args.samples} rollouts of at most {args.max_tokens} tokens, "
          f"{args.val_problems} validation problems; {len(os.sched_getaffinity(0))} CPUs, no GPU, load average "
          f"{os.getloadavg()[0]:.1f}; seconds (at 2 ranks the slower rank's, and each rank's)")
    print(f"{'':<26}{'1 rank':>9}{'2 ranks':>9}{'rank 0':>9}{'rank 1':>9}{'2 / 1':>8}")

    def line(name: str, one: float, two: float, each: list[float]) -> None:
        ratio = f"{two / one:.2f}" if one >= 0.01 else "-"  # a ratio of milliseconds says nothing
        print(f"{name:<26}{one:>9.2f}{two:>9.2f}" + "".join(f"{v:>9.2f}" for v in each) + f"{ratio:>8}")

    for phase in phases:
        line(phase, slowest(1, "", phase), slowest(2, "", phase), [r["seconds"].get(phase, 0.0) for r in runs[2]])
    for key, name in (("step", "step (wall)"), ("eval", "evaluation (wall)"), ("startup", "start-up")):
        line(name, slowest(1, key), slowest(2, key), [r[key] for r in runs[2]])


if __name__ == "__main__":
    main()
