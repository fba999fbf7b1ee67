"""`opsd trial` refuses bad input with one clear line (exit 2) before starting any engine."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.cli import main


def run(tmp_path, capsys, settings: dict, *extra: str) -> tuple[int, str]:
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(settings))
    code = main(["trial", str(path), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("settings, expected", [
    ({"context": {"name": "peer_hint"}}, "context.name: unknown construction 'peer_hint'"),
    ({"context": {"name": "mine", "template": "{prompt}\n{foo}"}}, "{foo}"),
    ({"model": {"path": "/nonexistent/model"}}, "/nonexistent/model"),
    ({"data": {"source": "humaneval", "release": "v6"}}, "no problems in the data window"),
    ({"loss": {"top_k": 0}}, "loss.top_k"),
    ({"rollout": {"n_sample": 4}}, "rollout.n_sample"),
    ({"data": {"source": "jsonl"}}, "data.path is required"),
    ({"rollout": {"weight_sync": "cuda_ipc"}}, "rollout.weight_sync 'cuda_ipc' needs device 'cuda'"),
])
def test_bad_trial_settings_are_one_line_errors(tmp_path, capsys, settings, expected):
    code, err = run(tmp_path, capsys, settings)
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("opsd trial: error:") and expected in err, err


def test_missing_trial_file(tmp_path, capsys):
    assert main(["trial", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "trial file not found" in capsys.readouterr().err


def test_override_of_unknown_field(tmp_path, capsys):
    code, err = run(tmp_path, capsys, {}, "--set", "loss.topk=5")
    assert code == 2 and "loss.topk" in err


def test_hints_from_reference_solutions(tmp_path, capsys):
    out = tmp_path / "hints.jsonl"
    assert main(["hints", "--from-solutions", "--max-problems", "5", "--workers", "2", "--out", str(out)]) == 0
    from trainer.hints import read_hints

    hints = read_hints(out)
    assert list(hints) == [f"HumanEval/{i}" for i in range(5)]
    assert all(hint.passed for hint in hints.values())  # graded in the sandbox: the canonical solutions pass
    assert hints["HumanEval/0"].text.startswith("```python\n") and "def has_close_elements" in hints["HumanEval/0"].text
    assert "5 of 5 problems have a hint that passes all its tests; 0 have none" in capsys.readouterr().out


def test_hints_need_exactly_one_source(tmp_path, capsys):
    for extra, message in (([], "one of the arguments --from-solutions --model --check is required"),
                           (["--from-solutions", "--check", "x.jsonl"], "not allowed with argument")):
        with pytest.raises(SystemExit) as exit_:
            main(["hints", *extra, "--out", str(tmp_path / "h.jsonl")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_hints_generated_by_a_model(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "hints.jsonl"
    assert main(["hints", "--model", str(tiny_model_dir), "--max-problems", "3", "--max-tokens", "8",
                 "--samples", "2", "--out", str(out)]) == 0
    from trainer.hints import Hint, read_hints

    # Eight tokens of a tiny random model solve nothing: every problem is graded and left without a hint.
    assert read_hints(out) == {f"HumanEval/{i}": Hint("", False) for i in range(3)}
    assert "0 of 3 problems have a hint that passes all its tests; 3 have none" in capsys.readouterr().out


def test_a_missing_command_module_is_an_error_not_a_missing_command(monkeypatch):
    from orchestrator import cli

    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("trainer.cli", "trainer.no_such_cli"))
    with pytest.raises(ModuleNotFoundError, match="trainer.no_such_cli"):
        cli.build_parser()
