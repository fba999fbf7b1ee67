"""`opsd trial` (one OPSD trial without Ray) and `opsd hints` (the hint file of `llm_peer_hints`)."""

from __future__ import annotations

import argparse

TRIAL_EPILOG = """\
examples:
  opsd trial sweeps/demo_trial.yaml --out runs/demo
  opsd trial sweeps/demo_trial.yaml --out runs/demo --set steps=3 --set context.name=feedback
  opsd trial sweeps/demo_trial.yaml --out runs/gap --set steps=0     the initial gap only, for `opsd screen`

Writes OUT/steps.parquet (one row per step and phase), OUT/trial.json (initial student and self-teacher
accuracy, gap, final accuracy, improvement), OUT/config.json (the resolved settings) and OUT/checkpoints/.
Running the same command again after a kill resumes at the step after the last checkpoint.
"""

HINTS_EPILOG = """\
examples:
  opsd hints --from-solutions --out hints/humaneval.jsonl            HumanEval's reference solutions
  opsd hints --model /models/Qwen3-8B --data-source livecodebench --release v6 --out hints/lcb_v6.jsonl
  opsd hints --check sampled.jsonl --data-source livecodebench --release v6 --out hints/lcb_v6.jsonl

Every hint is graded in the sandbox on all of its problem's tests, since the teacher is told it is a correct
solution: --model keeps each problem's first passing sample (of --samples), --check keeps the hints of a file
sampled elsewhere that pass, and a problem without a passing one gets no hint (it is counted). The file holds
one {"problem_id": ..., "hint": ..., "passed": ...} per line; point `context.hints_path` at it.
"""


def parse_override(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    trial = subparsers.add_parser(
        "trial",
        help="run one OPSD trial (rollouts, sandbox, self-teacher, DeepSpeed) without Ray",
        description="Run one on-policy self-distillation trial on this machine and write its results.",
        epilog=TRIAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    trial.add_argument("trial_file", metavar="TRIAL.yaml", help="trial settings (see trainer/config.py)")
    trial.add_argument("--out", required=True, metavar="DIR", help="folder for results and checkpoints")
    trial.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                       metavar="FIELD=VALUE", help="override a setting, e.g. --set rollout.n_samples=4")
    trial.set_defaults(func=_run_trial)

    hints = subparsers.add_parser(
        "hints",
        help="write the per-problem hint file that the llm_peer_hints context reads",
        description="Generate hints (solutions from another model, or the data set's reference solutions).",
        epilog=HINTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints.add_argument("--out", required=True, metavar="FILE.jsonl")
    source = hints.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-solutions", action="store_true", help="use the problems' reference solutions")
    source.add_argument("--model", help="model folder to sample hints with (any model vLLM can load)")
    source.add_argument("--check", metavar="HINTS.jsonl",
                        help="grade the hints of a file ({problem_id, hint} per line) and keep those that pass")
    hints.add_argument("--data-source", default="humaneval", choices=["humaneval", "livecodebench", "jsonl"])
    hints.add_argument("--data-path", help="problem file for --data-source jsonl")
    hints.add_argument("--release", help="LiveCodeBench release window, e.g. v6")
    hints.add_argument("--max-problems", type=int, help="only the first N problems")
    hints.add_argument("--samples", type=int, default=4, help="samples per problem with --model (default 4)")
    hints.add_argument("--max-tokens", type=int, default=2048)
    hints.add_argument("--temperature", type=float, default=0.6)
    hints.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    hints.add_argument("--workers", type=int, help="sandbox workers grading the hints (default: the CPUs)")
    hints.set_defaults(func=_run_hints)


def _run_trial(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    # vLLM logs every request batch and weight reload at INFO; the trial prints its own progress.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from trainer.config import load_trial_config
    from trainer.trial import run_trial

    cfg = load_trial_config(args.trial_file, dict(args.overrides))
    summary = run_trial(cfg, Path(args.out))
    print(f"initial student {summary['initial_student_acc']:.3f}  self-teacher {summary['initial_teacher_acc']:.3f}  "
          f"gap {summary['initial_gap']:+.3f}  final student {summary['final_student_acc']:.3f}  "
          f"improvement {summary['improvement']:+.3f}")
    print(f"results in {args.out}")
    return 0


def _run_hints(args: argparse.Namespace) -> int:
    import contextlib

    from sandbox.executor import Executor
    from sandbox.grader import Grader
    from trainer.config import DataConfig, TrialConfigError
    from trainer.data import load_problems
    from trainer.hints import check_hints, generate_hints, hint_counts, hints_from_reference_solutions, read_hints, \
        write_hints

    if args.samples < 1:
        raise TrialConfigError(f"--samples must be at least 1, got {args.samples}")
    data = DataConfig(source=args.data_source, path=args.data_path, release=args.release,
                      max_problems=args.max_problems)
    problems = load_problems(data)
    with contextlib.ExitStack() as stack:
        grader = Grader(stack.enter_context(Executor(args.workers)))
        if args.from_solutions:
            hints = check_hints(problems, hints_from_reference_solutions(problems), grader)
        elif args.check:
            given = read_hints(args.check)
            hints = check_hints(problems, {p.id: given[p.id].text if p.id in given else "" for p in problems}, grader)
        else:
            from trainer.config import ModelConfig
            from trainer.models import load_tokenizer, resolve_model
            from trainer.rollout import RolloutEngine

            model_path = resolve_model(ModelConfig(path=args.model))
            engine = stack.enter_context(RolloutEngine(
                model_path, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device,
                max_model_len=8192 + args.max_tokens))
            hints, _ = generate_hints(problems, engine, load_tokenizer(model_path), grader, n_samples=args.samples,
                                      max_tokens=args.max_tokens, temperature=args.temperature)
    counts = hint_counts(hints)
    write_hints(args.out, hints)
    print(f"wrote {args.out}: {counts['hints/passing']:.0f} of {len(problems)} problems have a hint that passes all "
          f"its tests; {counts['hints/without']:.0f} have none (their rollouts get no privileged context)")
    return 0
