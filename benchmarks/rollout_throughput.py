"""Rollout engine on the embedded SmolLM2: start-up, generation throughput and weight-push time per dtype.

For each dtype (float32 first: the baseline), one `trainer.rollout.RolloutEngine` is started in this process,
warmed up on two short requests, then asked `--repeats` times for one batched call of `--prompts` chat
prompts (coding tasks) × 1 sample × `--max-tokens` tokens at T = 1; tokens/s counts the tokens actually
generated (some responses stop early at the end token). Then the full state dict of a transformers copy is
pushed `--repeats` times. Medians are printed, and each dtype's ratio to the float32 baseline.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/rollout_throughput.py --prompts 64 --max-tokens 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASKS = ["add two numbers", "reverse a string", "check if a number is prime", "compute fibonacci numbers",
         "sort a list of tuples by the second item", "count vowels in a string", "flatten a nested list",
         "merge two sorted lists"]


def measure(path, tokenizer, dtype: str, args) -> dict[str, float]:
    from trainer.models import load_causal_lm
    from trainer.rollout import RolloutEngine

    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Write a Python function to {TASKS[i % len(TASKS)]} (variant {i})."}],
        add_generation_prompt=True, tokenize=True, return_dict=False) for i in range(args.prompts)]
    with RolloutEngine(path, dtype=dtype, seed=0, max_model_len=2048) as engine:
        engine.generate(prompts[:2], n=1, temperature=1.0, max_tokens=8, seed=0)
        rates, seconds = [], []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            groups = engine.generate(prompts, n=1, temperature=1.0, max_tokens=args.max_tokens, seed=repeat)
            elapsed = time.perf_counter() - started
            rates.append(sum(len(g[0].token_ids) for g in groups) / elapsed)
            seconds.append(elapsed)
        model = load_causal_lm(path, dtype=dtype)
        pushes = [engine.push_weights(model.state_dict().items())["push/seconds"] for _ in range(args.repeats)]
        return {"startup_s": engine.startup_seconds, "generate_s": statistics.median(seconds),
                "tokens_per_s": statistics.median(rates), "push_s": statistics.median(pushes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from trainer.config import ModelConfig
    from trainer.models import load_tokenizer, resolve_model

    path = resolve_model(ModelConfig())
    tokenizer = load_tokenizer(path)
    results = {dtype: measure(path, tokenizer, dtype, args) for dtype in args.dtypes}
    baseline = results[args.dtypes[0]]
    print(f"SmolLM2-135M, {args.prompts} prompts x {args.max_tokens} tokens, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; medians of {args.repeats}")
    print(f"{'dtype':<10}{'start-up s':>12}{'generate s':>12}{'tokens/s':>10}{'push s':>8}{'tok/s ratio':>13}")
    for dtype, r in results.items():
        print(f"{dtype:<10}{r['startup_s']:>12.1f}{r['generate_s']:>12.1f}{r['tokens_per_s']:>10.0f}"
              f"{r['push_s']:>8.2f}{r['tokens_per_s'] / baseline['tokens_per_s']:>13.2f}")


if __name__ == "__main__":
    main()
