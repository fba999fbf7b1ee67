"""Remote sweep storage (s3://, gs://, ...) through pyarrow, exercised with file:// URIs (the same code path)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.remote import RemoteSweep


def checkpoint(root: Path, step: int, *, complete: bool) -> Path:
    folder = root / "checkpoints" / f"step-{step:08d}"
    (folder / "student").mkdir(parents=True)
    (folder / "student" / "weights.pt").write_bytes(b"w" * (step + 1))
    if complete:
        (folder / "trainer_state.json").write_text(f'{{"step": {step}}}')
    return folder


def test_push_takes_complete_checkpoints_only_and_changed_files_once(tmp_path):
    local, remote_root = tmp_path / "mirror", tmp_path / "bucket" / "sweep"
    trial = local / "trials" / "t"
    trial.mkdir(parents=True)
    (trial / "steps.parquet").write_bytes(b"rows-1")
    (trial / ".steps.parquet.tmp-9").write_bytes(b"half")
    checkpoint(trial, 1, complete=True)
    checkpoint(trial, 2, complete=False)  # being written
    remote = RemoteSweep(f"file://{remote_root}", local)
    assert remote.push("trials/t") == 3  # steps.parquet, step 1's weights and its completion mark
    uploaded = sorted(p.relative_to(remote_root).as_posix() for p in remote_root.rglob("*") if p.is_file())
    assert uploaded == ["trials/t/checkpoints/step-00000001/student/weights.pt",
                        "trials/t/checkpoints/step-00000001/trainer_state.json", "trials/t/steps.parquet"]
    assert remote.push("trials/t") == 0  # nothing changed
    (trial / "steps.parquet").write_bytes(b"rows-1-and-2")
    assert remote.push("trials/t") == 1
    assert (remote_root / "trials/t/steps.parquet").read_bytes() == b"rows-1-and-2"


def test_a_retry_elsewhere_pulls_the_newest_complete_checkpoint(tmp_path):
    first, remote_root = tmp_path / "node-a", tmp_path / "bucket" / "sweep"
    trial = first / "trials" / "t"
    trial.mkdir(parents=True)
    (trial / "attempts.jsonl").write_text('{"attempt": 1}\n')
    for step in (1, 2):
        checkpoint(trial, step, complete=True)
    uri = f"file://{remote_root}"
    RemoteSweep(uri, first).push("trials/t")
    # Step 3 was being uploaded when node A died: its completion mark never arrived.
    partial = remote_root / "trials/t/checkpoints/step-00000003/student"
    partial.mkdir(parents=True)
    (partial / "weights.pt").write_bytes(b"half")
    second = tmp_path / "node-b"
    RemoteSweep(uri, second).pull_trial("trials/t")
    pulled = sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    assert pulled == ["trials/t/attempts.jsonl", "trials/t/checkpoints/step-00000002/student/weights.pt",
                      "trials/t/checkpoints/step-00000002/trainer_state.json"]


def test_checkpoints_pruned_locally_are_deleted_remotely(tmp_path):
    local, remote_root = tmp_path / "mirror", tmp_path / "bucket" / "sweep"
    trial = local / "trials" / "t"
    for step in (1, 2):
        checkpoint(trial, step, complete=True)
    remote = RemoteSweep(f"file://{remote_root}", local)
    remote.push("trials/t")
    import shutil

    shutil.rmtree(trial / "checkpoints" / "step-00000001")
    remote.delete_checkpoints_pruned_locally("trials/t")
    assert sorted(p.name for p in (remote_root / "trials/t/checkpoints").iterdir()) == ["step-00000002"]


def test_stripped_optimizer_state_is_deleted_remotely(tmp_path):
    local, remote_root = tmp_path / "mirror", tmp_path / "bucket" / "sweep"
    folder = checkpoint(local / "trials" / "t", 3, complete=True)
    (folder / "student" / "optim_states.pt").write_bytes(b"adam")
    remote = RemoteSweep(f"file://{remote_root}", local)
    remote.push("trials/t")
    (folder / "student" / "optim_states.pt").unlink()
    remote.delete_checkpoints_pruned_locally("trials/t")
    remote_step = remote_root / "trials/t/checkpoints/step-00000003"
    assert sorted(p.name for p in remote_step.rglob("*") if p.is_file()) == ["trainer_state.json", "weights.pt"]
