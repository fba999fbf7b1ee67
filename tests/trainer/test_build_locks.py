"""A lock left by a stopped extension build is removed before DeepSpeed starts; a live one is kept."""

import os
import time

from trainer.build_locks import clear_stale_build_locks, held_open


def _lock(root, name, age_s, build_folder="py311_cpu"):
    folder = root / build_folder / name
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_stale_lock_without_holder_is_removed_and_reported(tmp_path, capsys):
    stale = _lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    assert clear_stale_build_locks(tmp_path, stale_after_s=600) == [stale]
    assert not stale.exists()
    assert "deepspeed_shm_comm starts again" in capsys.readouterr().err


def test_lock_held_open_by_a_builder_is_kept_however_old(tmp_path):
    held = _lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    fd = os.open(held, os.O_RDONLY)  # as FileBaton's builder holds it while it compiles
    try:
        assert held_open({held}) == {held}
        assert clear_stale_build_locks(tmp_path, stale_after_s=600) == []
        assert held.exists()
    finally:
        os.close(fd)


def test_young_lock_is_kept_since_its_builder_may_be_on_another_node(tmp_path):
    young = _lock(tmp_path, "cpu_adam", age_s=30)
    assert clear_stale_build_locks(tmp_path, stale_after_s=600) == []
    assert young.exists()


def test_default_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # then torch builds in DIR/NAME
    stale = _lock(tmp_path, "deepspeed_shm_comm", age_s=3600, build_folder="")
    assert clear_stale_build_locks() == [stale]
