"""Stale lock files of torch's extension builds, which would make every later DeepSpeed start wait forever.

DeepSpeed compiles some of its ops the first time they are used (on CPU, its shared-memory collectives, when
the default process group starts). torch guards each build with a lock file in the build directory
(`torch.utils.file_baton.FileBaton`): the builder creates it with O_EXCL, keeps it open while it compiles and
removes it at the end; everyone else polls until it is gone, without a timeout. A builder killed mid-compile (a
trial stopped with Ctrl-C or by Ray during its first start) leaves the file behind, and every later trial of
that user then hangs at start-up with nothing on its terminal.

`clear_stale_build_locks` removes a lock that no process on this machine holds open and that is older than any
build takes; a younger one may belong to a builder on another node sharing the home directory, and is kept.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# A build of one DeepSpeed op takes about a minute on 2 busy cores; a lock this old with no holder is stale.
STALE_AFTER_S = 10 * 60.0


def build_root() -> Path:
    """Where torch builds extensions: $TORCH_EXTENSIONS_DIR/NAME, else ~/.cache/torch_extensions/pyXY_ACC/NAME."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def held_open(paths: set[Path]) -> set[Path]:
    """The files of `paths` that some process of this user on this machine has open (read from /proc)."""
    wanted = {os.path.realpath(p) for p in paths}
    held: set[Path] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # another user's process, or one that just ended
            continue
        for fd in descriptors:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in wanted:
                held.add(Path(target))
    return held


def clear_stale_build_locks(root: Path | None = None, *, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the extension build locks under `root` that nobody holds and that are older than `stale_after_s`;
    print one line per removed lock to stderr and return their paths."""
    root = build_root() if root is None else root
    locks = {p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern) if p.is_file()}
    if not locks:
        return []
    now, removed = time.time(), []
    held = held_open(locks)
    for lock in sorted(locks):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # its builder finished meanwhile
            continue
        if age < stale_after_s or Path(os.path.realpath(lock)) in held:
            continue
        lock.unlink(missing_ok=True)
        removed.append(lock)
        print(f"note: removed {lock}, left {age / 60:.0f} min ago by a build that was stopped; "
              f"the build of {lock.parent.name} starts again", file=sys.stderr, flush=True)
    return removed
