"""`opsd screen`: the initial student–self-teacher gap of every privileged context, measured at once, and the
improvement a fitted law predicts from it.

Given a trial or sweep file (.yaml) it measures (trainer/screen.py: one engine start and one student pass for
all contexts); given a table of gaps measured earlier it only predicts (analysis/cli.py `screen_gaps`). It lives
here because it needs both the trainer and the analysis, and only the orchestrator may import both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

EPILOG = """\
examples:
  opsd screen sweeps/demo_trial.yaml --out runs/screen          the six built-in contexts of a trial file
  opsd screen sweeps/demo_trial.yaml --out runs/screen --contexts none,llm_peer_hints --set data.max_val_problems=16
  opsd screen sweeps/demo.yaml --out runs/screen --law report/law.json     a sweep file's contexts, with predictions
  opsd screen runs/gap/trial.json --law report/law.json       predictions for gaps measured earlier (no model)
  opsd screen gaps.csv --law report/law.json --out predictions.csv --pooled

With a trial or sweep file: the student samples `eval.teacher_n_samples` answers per validation problem at
`eval.teacher_temperature` once, they are graded (all tests: its accuracy; train tests: the feedback), and each
context's self-teacher (the initial model) answers once per attempt. One table: student and self-teacher
accuracy and the gap per context, all tests passed and fraction of tests, each gap with a 95% paired bootstrap
interval over problems. OUT gets screen.json and screen.parquet (one row per context: initial_student_acc_t1,
initial_teacher_acc, initial_gap, initial_gap_lo/hi, the *_test_frac columns, and with --law
predicted_improvement, pi_lo, pi_hi), problems.jsonl, student.jsonl and teacher.jsonl (every attempt and
answer with its verdict), and screen.log (vLLM's and the sandbox's output). A sweep with several models writes
one folder per model under OUT and the combined table in OUT.

With a table of gaps (.parquet, .csv, .json records or .jsonl with columns model_family, model, context,
initial_gap; a trial.json is one row): --law is required, --out is a .csv, .parquet or .json file of the
predictions (predicted_improvement, ci_lo/ci_hi, pi_lo/pi_hi, extrapolated, law).
"""

_YAML = (".yaml", ".yml")


def register(subparsers: argparse._SubParsersAction) -> None:
    from trainer.cli import parse_override

    screen = subparsers.add_parser(
        "screen", help="measure every context's initial gap at once (trial/sweep file), or predict from gaps",
        description="Screen privileged contexts before training: measure the initial student–self-teacher gap of "
                    "each from one student pass, and predict the improvement with a fitted law.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    screen.add_argument("input", metavar="FILE", help="trial or sweep file (.yaml) to measure, or a table of gaps")
    screen.add_argument("--law", metavar="LAW.json", help="law.json of `opsd analyze`: add predicted improvements")
    screen.add_argument("--pooled", action="store_true", help="predict with the pooled law")
    screen.add_argument("--measure", choices=["all_pass", "tests"], default="all_pass",
                        help="with a table of gaps: the measure its law was fitted on (`opsd analyze --measure`)")
    screen.add_argument("--out", metavar="DIR|FILE", help="results folder (a .yaml FILE; required) or the "
                        "predictions file (a table of gaps)")
    screen.add_argument("--contexts", metavar="A,B,C", help="contexts to screen, by name (default: the six "
                        "built-ins and the trial file's own template, or the sweep file's contexts)")
    screen.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                        metavar="FIELD=VALUE", help="override a trial setting (trial file only)")
    screen.add_argument("--seed", type=int, help="which of a sweep file's seeds (default: each model's first)")
    screen.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                        help="bootstrap resamples of the problems for each gap's interval (default 2000)")
    screen.add_argument("--bootstrap-seed", type=int, default=0, metavar="S", help="its random seed (default 0)")
    screen.set_defaults(func=_screen)


def _screen(args: argparse.Namespace) -> int:
    if Path(args.input).suffix.lower() in _YAML:
        return _measure(args)
    from analysis.cli import screen_gaps
    from analysis.errors import AnalysisError

    if args.law is None:
        raise AnalysisError(f"{args.input} is a table of gaps: give --law LAW.json to predict from it "
                            "(or a trial or sweep file .yaml to measure gaps)")
    if args.contexts or args.overrides or args.seed is not None:
        raise AnalysisError("--contexts, --set and --seed apply to a trial or sweep file, not to a table of gaps")
    return screen_gaps(args.input, args.law, out=args.out, pooled=args.pooled, measure=args.measure)


# ---------------------------------------------------------------------------------------------- measuring


def _measure(args: argparse.Namespace) -> int:
    # vLLM logs every request batch at INFO; what it still says goes to OUT/screen.log.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from trainer.errors import TrialConfigError
    from trainer.screen import run_screen, screen_rows, write_screen

    if not args.out:
        raise TrialConfigError("give --out DIR: the screen writes its table, rollouts and log there")
    if args.bootstrap < 1:
        raise TrialConfigError("--bootstrap needs at least 1 resample")
    jobs = _jobs(args)
    law = _checked_law(args, jobs) if args.law else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "screen.log"
    started = time.perf_counter()
    all_rows: list[dict[str, Any]] = []
    with _third_party_output_to(log) as console:
        for label, cfg, contexts in jobs:
            heading = f"{label}: " if len(jobs) > 1 else ""
            with _phases(console, heading) as phase:
                result = run_screen(cfg, contexts, phase=phase)
            rows = screen_rows(result, resamples=args.bootstrap, seed=args.bootstrap_seed)
            if law is not None:
                rows = _with_predictions(rows, law, pooled=args.pooled)
            write_screen(out / label if len(jobs) > 1 else out, result, rows)
            all_rows += rows
    if len(jobs) > 1:
        _write_table(out, all_rows)
    _print_table(all_rows, predictions=law is not None)
    print(f"wrote {out}/screen.json, screen.parquet, student.jsonl, teacher.jsonl, problems.jsonl"
          f"{' (one folder per model)' if len(jobs) > 1 else ''}; vLLM's and the sandbox's output in {log}; "
          f"{time.perf_counter() - started:.0f} s")
    return 0


def _jobs(args: argparse.Namespace) -> list[tuple[str, Any, list]]:
    """(label, trial settings, contexts to screen) per model: one for a trial file, one per model of a sweep."""
    import yaml

    from trainer.config import load_trial_config
    from trainer.errors import TrialConfigError
    from trainer.screen import screen_contexts

    path = Path(args.input)
    if not path.is_file():
        raise TrialConfigError(f"file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TrialConfigError(f"{path}: not valid YAML: {err}") from None
    names = [n.strip() for n in args.contexts.split(",") if n.strip()] if args.contexts else None
    if not (isinstance(raw, dict) and "models" in raw and "contexts" in raw):
        if args.seed is not None:
            raise TrialConfigError("--seed picks a sweep file's seed; set a trial file's with --set seed=N")
        cfg = load_trial_config(path, dict(args.overrides))
        return [(cfg.name, cfg, screen_contexts(cfg, names))]

    from orchestrator.sweep_file import load_sweep

    if args.overrides:
        raise TrialConfigError("--set applies to a trial file; change a sweep file's `trial:` section instead")
    sweep, points = load_sweep(path)
    jobs = []
    for model in dict.fromkeys(p.model for p in points):
        mine = [p for p in points if p.model == model]
        seeds = list(dict.fromkeys(p.seed for p in mine))
        seed = seeds[0] if args.seed is None else args.seed
        if seed not in seeds:
            raise TrialConfigError(f"--seed {seed}: model {model} runs seeds {', '.join(map(str, seeds))}")
        chosen = [p for p in mine if p.seed == seed]
        cfg = chosen[0].config.model_copy(update={"name": f"{sweep.name}-{model}-screen"})
        jobs.append((model, cfg, screen_contexts(cfg, names, extra=[p.config.context for p in chosen])))
    return jobs


def _checked_law(args: argparse.Namespace, jobs: list) -> Any:
    """The law, refused now (before any engine starts) when it cannot predict for these models."""
    import pandas as pd

    from analysis.law import load_law
    from analysis.predict import screen
    from trainer.models import model_family

    law = load_law(args.law)
    probe = pd.DataFrame([{"model_family": cfg.model.family or model_family(cfg.model.path), "model": cfg.model.path,
                           "context": "probe", "initial_gap": 0.0} for _, cfg, _ in jobs])
    screen(law, probe, pooled=args.pooled)
    return law


def _with_predictions(rows: list[dict[str, Any]], law: Any, *, pooled: bool) -> list[dict[str, Any]]:
    import pandas as pd

    from analysis.predict import screen

    predicted = screen(law, pd.DataFrame(rows), pooled=pooled)
    keep = ["predicted_improvement", "pi_lo", "pi_hi", "extrapolated", "law"]
    return [{**row, **{k: (bool(v) if k == "extrapolated" else v) for k, v in extra.items()}}
            for row, extra in zip(rows, predicted[keep].to_dict("records"))]


def _write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.records import write_json

    write_json(out / "screen.json", {"rows": rows})
    pq.write_table(pa.Table.from_pylist(rows), out / "screen.parquet")


# ------------------------------------------------------------------------------------------ the console


@contextlib.contextmanager
def _third_party_output_to(log: Path) -> Iterator[Any]:
    """Send everything written to this process's stdout and stderr, and its children's (vLLM's engine, the
    sandbox's workers), to `log` for the body; yield a rich Console on the real stderr for our progress."""
    from rich.console import Console

    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = Console(file=os.fdopen(os.dup(2), "w"))
    with open(log, "a") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            console.file.close()


@contextlib.contextmanager
def _phases(console: Any, heading: str) -> Iterator[Any]:
    """A live list of phases, each a spinner while it runs and a tick with its time once done."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    # No redirect of sys.stdout/sys.stderr through the display (rich's default on a terminal): vLLM, imported
    # during a phase, binds its log handler to whatever sys.stdout is then, and would print on the terminal
    # for the rest of the process, its shutdown warnings included, instead of into the log.
    with Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, redirect_stdout=False, redirect_stderr=False) as progress:

        @contextlib.contextmanager
        def phase(name: str) -> Iterator[None]:
            task = progress.add_task(heading + name, total=1)
            try:
                yield
            except BaseException:
                progress.update(task, description=f"{heading}{name} [red]failed (see screen.log)")
                progress.stop_task(task)
                raise
            progress.update(task, completed=1)
            progress.stop_task(task)

        yield phase


def _print_table(rows: list[dict[str, Any]], *, predictions: bool) -> None:
    import shutil

    from rich.console import Console

    # Piped output gets a width that fits the wide table instead of rich's default 80 columns.
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 200
    console = Console(width=width)
    for table in screen_tables(rows, predictions=predictions, width=width):
        console.print(table)


def screen_tables(rows: list[dict[str, Any]], *, predictions: bool, width: int) -> list[Any]:
    """The screen's table, or, where it does not fit in `width` columns, one table per measure (all tests
    passed, fraction of tests) and one of the predictions, each of them narrow enough, then the caption."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    first = rows[0]
    several_models = len({r["model"] for r in rows}) > 1
    caption = (
        f"Student: {first['n_samples']} samples per problem on {first['val_problems']} validation problems at "
        f"T={first['temperature']:g}, sampled once and shared by every context (hence the same student accuracy). "
        f"Self-teacher: the initial model, one answer per student attempt with the context's prompt. "
        f"acc = all tests passed, tests = fraction of tests passed. [lo, hi]: "
        f"{first['confidence']:.0%} paired bootstrap interval over problems ({first['bootstrap_resamples']} "
        f"resamples, seed {first['bootstrap_seed']}).")
    if predictions:
        caption += " Predicted improvement with its prediction interval from the law (* outside the fitted gaps)."

    def gap(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:+.3f} [{row[key + '_lo']:+.3f}, {row[key + '_hi']:+.3f}]"

    def predicted(row: dict[str, Any]) -> str:
        star = "*" if row["extrapolated"] else ""
        return f"{row['predicted_improvement']:+.3f}{star} [{row['pi_lo']:+.3f}, {row['pi_hi']:+.3f}]"

    acc = {"student acc": lambda r: f"{r['initial_student_acc_t1']:.3f}",
           "teacher acc": lambda r: f"{r['initial_teacher_acc']:.3f}",
           "gap acc [lo, hi]": lambda r: gap(r, "initial_gap")}
    tests = {"student tests": lambda r: f"{r['initial_student_test_frac_t1']:.3f}",
             "teacher tests": lambda r: f"{r['initial_teacher_test_frac']:.3f}",
             "gap tests [lo, hi]": lambda r: gap(r, "initial_gap_test_frac")}
    predict = {"predicted improvement [PI]": predicted} if predictions else {}

    def table(title: str, columns: dict[str, Any], caption: str | None) -> Table:
        out = Table(title=title, caption=escape(caption) if caption else None, caption_justify="left")
        if several_models:
            out.add_column("model", overflow="fold")
        out.add_column("context", overflow="fold")
        for name in columns:
            out.add_column(escape(name), justify="right", no_wrap=True)
        for row in rows:
            out.add_row(*map(escape, [*([row["model"]] if several_models else []), row["context"],
                                      *(cell(row) for cell in columns.values())]))
        return out

    wide = table("Initial gap per privileged context", {**acc, **tests, **predict}, caption)
    measure = Console(width=10_000).measure(wide)
    if measure.maximum <= width:
        return [wide]
    # The measure moves from the column names into the titles.
    narrow = [table("Initial gap per privileged context: all tests passed",
                    {k.replace(" acc", ""): v for k, v in acc.items()}, None),
              table("... fraction of tests passed", {k.replace(" tests", ""): v for k, v in tests.items()}, None)]
    if predictions:
        narrow.append(table("... predicted improvement", predict, None))
    return [*narrow, Text(caption)]  # the caption as a paragraph of the terminal's width, not the tables'
