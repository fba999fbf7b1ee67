"""Sweep storage that is not a folder of this machine: `s3://`, `gs://` or any URI pyarrow opens.

A trial needs a POSIX folder (vLLM, DeepSpeed and the sandbox write files), so a remote sweep has a local
mirror on every machine that works on it, and files move between the two:
- the driver pulls the sweep's small files (no checkpoints), prepares the grid and pushes it; Ray Tune keeps its
  experiment state at the URI itself (it reads and writes URIs through pyarrow too);
- a trial's trainable pulls its trial folder with its newest complete checkpoint before an attempt (the retry
  may run on another node), pushes what changed at every poll (step rows, progress, logs, each checkpoint once
  it is complete, its `trainer_state.json` last so that a half-uploaded checkpoint is never taken for one),
  deletes the remote copies of checkpoints pruned locally, and pushes everything at the end;
- `opsd sweep status`, `collect` and `resume` given the URI pull the small files first (collect pushes its
  Parquet files back).
`file://` URIs take the same path through pyarrow's local file system: that is how the tests run it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from orchestrator.errors import SweepError
from trainer.layout import CHECKPOINT_DIR, CHECKPOINT_STATE, CHECKPOINTS


def is_uri(path: str) -> bool:
    return "://" in str(path)


def mirror_dir(uri: str, role: str) -> Path:
    """This machine's folder for a remote sweep: $OPSD_SCRATCH or ~/.cache/opsd-sweep/mirrors, one per URI and
    role ("driver", "trials", "read"): the driver's pulls must never overwrite a running trial's files."""
    root = Path(os.environ.get("OPSD_SCRATCH") or Path.home() / ".cache" / "opsd-sweep" / "mirrors")
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:10]
    return root / f"{uri.rstrip('/').rsplit('/', 1)[-1]}-{digest}" / role


class RemoteSweep:
    """The files of a sweep folder at `uri`, mirrored in `local`."""

    def __init__(self, uri: str, local: Path):
        import pyarrow.fs as pafs

        self.uri, self.local = uri.rstrip("/"), Path(local)
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for unusable URIs
            raise SweepError(f"storage: cannot open {self.uri}: {str(err).splitlines()[0]}") from None
        self.root = self.root.rstrip("/")
        self._synced: dict[str, tuple[int, int]] = {}  # relative path -> local (size, mtime_ns) last synced

    # ------------------------------------------------------------------------------------------------ pull
    def pull(self, sub: str = "", *, skip: tuple[str, ...] = ()) -> int:
        """Copy remote files under `sub` that the mirror lacks or holds in another size; returns how many."""
        count = 0
        for rel, size in self._remote_files(sub):
            if any(part in skip for part in rel.split("/")):
                continue
            dest = self.local / rel
            if dest.is_file() and dest.stat().st_size == size and rel in self._synced:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.pull")
            with self.fs.open_input_stream(f"{self.root}/{rel}") as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            os.replace(tmp, dest)
            self._remember(rel)
            count += 1
        return count

    def pull_trial(self, trial_dir: str) -> None:
        """A trial's folder without its checkpoints, then its newest complete checkpoint."""
        self.pull(trial_dir, skip=(CHECKPOINTS,))
        steps = sorted({step for step, rest in self._checkpoint_files(trial_dir)
                        if rest == CHECKPOINT_STATE and CHECKPOINT_DIR.match(step)})
        if steps:
            self.pull(f"{trial_dir}/{CHECKPOINTS}/{steps[-1]}")

    # ------------------------------------------------------------------------------------------------ push
    def push(self, sub: str = "", *, skip: tuple[str, ...] = ()) -> int:
        """Upload the mirror's files under `sub` that changed since they were last synced; returns how many.

        Checkpoints go up only once complete, their completion mark last; temporary files never."""
        base = self.local / sub
        if not base.exists():
            return 0
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        marks = []
        count = 0
        for path in files:
            rel = path.relative_to(self.local).as_posix()
            parts = rel.split("/")
            if any(part in skip for part in parts) or any(part.startswith(".") for part in parts):
                continue
            if CHECKPOINTS in parts:
                at = parts.index(CHECKPOINTS)
                step = self.local.joinpath(*parts[: at + 2]) if len(parts) > at + 2 else None
                if step is None or not CHECKPOINT_DIR.match(step.name) or not (step / CHECKPOINT_STATE).is_file():
                    continue
                if path.name == CHECKPOINT_STATE:
                    marks.append((rel, path))
                    continue
            count += self._upload(rel, path)
        for rel, path in marks:
            count += self._upload(rel, path)
        return count

    def delete_checkpoints_pruned_locally(self, trial_dir: str) -> None:
        """Remove remote checkpoint files the mirror no longer has (pruned checkpoints, stripped optimizer state)."""
        base = f"{self.root}/{trial_dir}/{CHECKPOINTS}"
        gone: set[str] = set()
        for step, rest in self._checkpoint_files(trial_dir):
            local_step = self.local / trial_dir / CHECKPOINTS / step
            if step in gone:
                continue
            if not local_step.exists():
                self.fs.delete_dir_contents(f"{base}/{step}", missing_dir_ok=True)
                self.fs.delete_dir(f"{base}/{step}")
                gone.add(step)
            elif not (local_step / rest).exists():
                self.fs.delete_file(f"{base}/{step}/{rest}")
                self._synced.pop(f"{trial_dir}/{CHECKPOINTS}/{step}/{rest}", None)

    def delete(self, sub: str) -> None:
        """Remove the remote folder `sub` and everything in it (nothing when it does not exist)."""
        import pyarrow.fs as pafs

        path = f"{self.root}/{sub}"
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    # ------------------------------------------------------------------------------------------------ helpers
    def _upload(self, rel: str, path: Path) -> int:
        stat = path.stat()
        if self._synced.get(rel) == (stat.st_size, stat.st_mtime_ns):
            return 0
        parent = f"{self.root}/{rel}".rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        with open(path, "rb") as src, self.fs.open_output_stream(f"{self.root}/{rel}") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        self._synced[rel] = (stat.st_size, stat.st_mtime_ns)
        return 1

    def _remember(self, rel: str) -> None:
        stat = (self.local / rel).stat()
        self._synced[rel] = (stat.st_size, stat.st_mtime_ns)

    def _checkpoint_files(self, trial_dir: str) -> list[tuple[str, str]]:
        """(step folder, path inside it) of every remote file under the trial's checkpoints."""
        prefix = f"{trial_dir}/{CHECKPOINTS}/"
        return [tuple(rel[len(prefix):].split("/", 1)) for rel, _ in self._remote_files(prefix.rstrip("/"))
                if "/" in rel[len(prefix):]]

    def _remote_files(self, sub: str) -> list[tuple[str, int]]:
        import pyarrow.fs as pafs

        base = f"{self.root}/{sub}".rstrip("/")
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return [(sub, info.size)]
        if info.type != pafs.FileType.Directory:
            return []
        out = []
        for item in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if item.type == pafs.FileType.File:
                out.append((item.path[len(self.root) + 1:], item.size))
        return out
