"""Rollout throughput on the embedded SmolLM2: our engine against a batched transformers `generate` loop.

Both sides sample the same `--prompts` chat prompts (coding tasks) from the same model folder, 1 sample per
prompt, at most `--max-tokens` new tokens, T = 1 and top-p 1 (no top-k on either side), stopping at the end
token; tokens/s counts the tokens actually generated (up to and including the end token, as vLLM's
`token_ids` hold it), over the wall time of the whole call.

- baseline: transformers `model.generate` (the trainer's `load_causal_lm`: sdpa attention), prompts
  left-padded into batches of `--hf-batch-size` (each size given is one row; the best is the baseline).
  A batch runs until its longest response ends: finished rows are carried along, which is how `generate`
  batches and what a plain loop pays.
- ours: one `trainer.rollout.RolloutEngine` (vLLM, CPU backend) per dtype, all prompts in one `generate`
  call. Then the full state dict of a transformers copy is pushed into it.

Each side first samples 8 of the prompts at full length (warm-up), then all sides take turns, `--repeats`
rounds (sampling seed = round), so a shared machine's changing load falls on all of them alike (an idle
engine waits on its socket and takes no CPU); medians are printed, and each row's ratio of tokens/s to the
baseline.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/rollout_throughput.py --prompts 32 --max-tokens 128 \
        --repeats 3 --hf-batch-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASKS = ["add two numbers", "reverse a string", "check if a number is prime", "compute fibonacci numbers",
         "sort a list of tuples by the second item", "count vowels in a string", "flatten a nested list",
         "merge two sorted lists"]
# Both sides first sample this many prompts at full length (kernels and caches for every shape they meet).
WARM_UP_PROMPTS = 8


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Write a Python function to {TASKS[i % len(TASKS)]} (variant {i})."}],
        add_generation_prompt=True, tokenize=True, return_dict=False) for i in range(n)]


def generated_tokens(row: list[int], eos_id: int) -> int:
    """New tokens up to and including the first end token (what the engine's `token_ids` hold)."""
    return row.index(eos_id) + 1 if eos_id in row else len(row)


def hf_generate(model, prompts: list[list[int]], *, batch_size: int, max_tokens: int, pad_id: int,
                eos_id: int, seed: int) -> int:
    """Sample every prompt with `model.generate` in left-padded batches; returns the tokens generated."""
    import torch

    torch.manual_seed(seed)
    total = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chunk])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=max_tokens,
                                 pad_token_id=pad_id, eos_token_id=eos_id)
        total += sum(generated_tokens(row, eos_id) for row in out[:, width:].tolist())
    return total


def timed(run) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = run()
    return time.perf_counter() - started, tokens


def summary(runs: list[tuple[float, int]], **extra) -> dict:
    return {"generate_s": statistics.median(s for s, _ in runs), "tokens": statistics.median(n for _, n in runs),
            "tokens_per_s": statistics.median(n / s for s, n in runs), **extra}


def engine_tokens(engine, prompts: list[list[int]], *, max_tokens: int, eos_id: int, seed: int) -> int:
    groups = engine.generate(prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=seed)
    # Counted like the baseline: token_ids end with the end token when the response stopped on it.
    n = sum(generated_tokens(g[0].token_ids, eos_id) for g in groups)
    if n != sum(len(g[0].token_ids) for g in groups):
        raise RuntimeError("the engine returned tokens past an end token")
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--hf-batch-size", type=int, nargs="+", default=[64],
                        help="transformers generate batch sizes (one row each; the fastest is the baseline)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="engine dtypes (float32 is the trainer's)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch

    from trainer.config import ModelConfig
    from trainer.models import load_causal_lm, load_tokenizer, resolve_model
    from trainer.rollout import RolloutEngine

    path = resolve_model(ModelConfig())
    tokenizer = load_tokenizer(path)
    prompts = chat_prompts(tokenizer, args.prompts)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    hf_names = {b: f"transformers generate, float32, batch {b}" for b in args.hf_batch_size}
    engine_names = {d: f"RolloutEngine (vLLM), {d}, batch {args.prompts}" for d in args.dtypes}
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in [*hf_names.values(), *engine_names.values()]}
    model = load_causal_lm(path, dtype="float32")
    with contextlib.ExitStack() as stack:
        engines = {d: stack.enter_context(RolloutEngine(path, dtype=d, seed=0, max_model_len=2048))
                   for d in args.dtypes}
        for b in args.hf_batch_size:
            hf_generate(model, prompts[:WARM_UP_PROMPTS], batch_size=b, max_tokens=args.max_tokens, pad_id=pad_id,
                        eos_id=eos_id, seed=0)
        for engine in engines.values():
            engine_tokens(engine, prompts[:WARM_UP_PROMPTS], max_tokens=args.max_tokens, eos_id=eos_id, seed=0)
        # Rounds of every side in turn, so a shared machine's changing load falls on all of them alike.
        for repeat in range(args.repeats):
            for b, name in hf_names.items():
                runs[name].append(timed(lambda: hf_generate(model, prompts, batch_size=b, max_tokens=args.max_tokens,
                                                            pad_id=pad_id, eos_id=eos_id, seed=repeat)))
            for d, engine in engines.items():
                runs[engine_names[d]].append(timed(lambda: engine_tokens(engine, prompts, max_tokens=args.max_tokens,
                                                                         eos_id=eos_id, seed=repeat)))
            print(f"round {repeat + 1}: " + ", ".join(f"{name} {r[-1][1] / r[-1][0]:.0f} tokens/s"
                                                     for name, r in runs.items()), flush=True)
        rows = {hf_names[b]: summary(runs[hf_names[b]], startup_s=None, push_s=None) for b in args.hf_batch_size}
        for d, engine in engines.items():
            weights = load_causal_lm(path, dtype=d).state_dict()
            pushes = [engine.push_weights(weights.items())["push/seconds"] for _ in range(args.repeats)]
            rows[engine_names[d]] = summary(runs[engine_names[d]], startup_s=engine.startup_seconds,
                                            push_s=statistics.median(pushes))
    baseline_name = max(hf_names.values(), key=lambda name: rows[name]["tokens_per_s"])
    baseline = rows[baseline_name]

    print(f"SmolLM2-135M, {args.prompts} prompts x 1 sample x at most {args.max_tokens} tokens, T=1, "
          f"{os.cpu_count()} CPUs (torch threads {torch.get_num_threads()}), load average "
          f"{os.getloadavg()[0]:.1f}; medians of {args.repeats}; baseline: {baseline_name}")
    print(f"{'path':<44}{'start-up s':>11}{'generate s':>11}{'tokens':>8}{'tokens/s':>10}{'push s':>8}"
          f"{'x baseline':>11}")
    for name, r in rows.items():
        startup = "-" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
        push = "-" if r["push_s"] is None else f"{r['push_s']:.2f}"
        print(f"{name:<44}{startup:>11}{r['generate_s']:>11.1f}{r['tokens']:>8.0f}{r['tokens_per_s']:>10.0f}"
              f"{push:>8}{r['tokens_per_s'] / baseline['tokens_per_s']:>11.2f}")
    for name in engine_names.values():
        per_round = [(n / s) / (bn / bs) for (s, n), (bs, bn) in zip(runs[name], runs[baseline_name])]
        print(f"{name} / baseline, round by round: {', '.join(f'{x:.2f}' for x in per_round)} "
              f"(median {statistics.median(per_round):.2f})")


if __name__ == "__main__":
    main()
