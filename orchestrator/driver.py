"""`driver.json` in the sweep folder: which process drives the sweep, whether it still does, and how it ended.

`opsd sweep run|resume` writes it when it starts, refreshes `updated` while it runs (a heartbeat) and records
`ended` and `outcome` ("finished", "interrupted", "stopped") when it stops. `opsd sweep status` reads it to tell
a running trial from one whose driver is gone (killed with SIGKILL, its node lost): on the driver's own
machine by its process (pid and start time), elsewhere by the age of the heartbeat. The run id tells the
trainables of one driver run from those of the next (a configuration error is not retried within a run, and
is tried again by the next `opsd sweep resume`).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from trainer.records import atomic_write_bytes

DRIVER_FILE = "driver.json"
HEARTBEAT_S = 30.0
# A driver on another machine whose heartbeat is older than this is taken for dead (four beats missed).
STALE_S = 4 * HEARTBEAT_S


@dataclass
class DriverRecord:
    run_id: str
    host: str
    pid: int
    create_time: float
    started: float
    updated: float
    ended: float | None = None
    outcome: str | None = None

    @classmethod
    def start(cls, sweep_dir: Path) -> "DriverRecord":
        """The record of this process as the sweep's driver, written to `sweep_dir`."""
        now = time.time()
        record = cls(run_id=uuid.uuid4().hex[:12], host=socket.gethostname(), pid=os.getpid(),
                     create_time=psutil.Process().create_time(), started=now, updated=now)
        record.write(sweep_dir)
        return record

    def beat(self, sweep_dir: Path) -> bool:
        """Refresh the heartbeat when it is due; returns whether the file was written."""
        now = time.time()
        if now - self.updated < HEARTBEAT_S:
            return False
        self.updated = now
        self.write(sweep_dir)
        return True

    def end(self, sweep_dir: Path, outcome: str) -> None:
        self.ended = self.updated = time.time()
        self.outcome = outcome
        self.write(sweep_dir)

    def write(self, sweep_dir: Path) -> None:
        atomic_write_bytes(Path(sweep_dir) / DRIVER_FILE, (json.dumps(asdict(self), indent=1) + "\n").encode())


def read_driver(sweep_dir: Path) -> DriverRecord | None:
    """The sweep's driver record; None when the folder has none (or an unreadable one)."""
    try:
        raw = json.loads((Path(sweep_dir) / DRIVER_FILE).read_text())
        return DriverRecord(**raw)
    except (OSError, ValueError, TypeError):
        return None


def is_running(record: DriverRecord | None, *, now: float | None = None) -> bool | None:
    """Whether the recorded driver still runs: None when nothing is recorded (a folder of an earlier version)."""
    if record is None:
        return None
    if record.ended is not None:
        return False
    if record.host == socket.gethostname():
        try:
            return abs(psutil.Process(record.pid).create_time() - record.create_time) < 1e-3
        except psutil.NoSuchProcess:
            return False
    return (now or time.time()) - record.updated < STALE_S


def last_seen(record: DriverRecord) -> float:
    """When the driver was last known to run: its end, else its last heartbeat."""
    return record.ended if record.ended is not None else record.updated
