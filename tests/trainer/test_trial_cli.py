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
