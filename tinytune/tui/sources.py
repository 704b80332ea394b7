"""Where the UI's records come from: the trainer in this process, or a run directory on disk."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

from tinytune.rundir import RunLock

LIVE_WINDOW_S = 60.0  # a run no trainer holds whose metrics.jsonl has not grown for this long is not live


class QueueSource:
    """Records from a trainer running in this process; ``put`` is the trainer's listener."""

    live = True

    def __init__(self, control=None) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.control = control

    def put(self, record: dict) -> None:
        self.queue.put(record)

    def poll(self, limit: int = 10_000) -> list[dict]:
        out = []
        while len(out) < limit:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return out


class FileSource:
    """Records of a run started elsewhere: plan.json, then metrics.jsonl followed as it grows.

    A line is used once it is complete (ends in a newline), so a record being written is never
    half-read; a run that is resumed rewrites the file, which is noticed and read again."""

    control = None

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.offset = 0
        self.partial = b""
        self.plan_sent = False
        self.inode = None
        self.mtime = 0.0
        self.ended = False

    @property
    def live(self) -> bool:
        """Still being written: no end record, and a trainer holds the run (however long its steps take;
        a killed one holds nothing) or, where it could not lock the run (a filesystem without locks),
        the file grew within the last minute."""
        if self.ended:
            return False
        if RunLock.guarded(self.run_dir):
            return RunLock.holder(self.run_dir) is not None
        return time.time() - self.mtime < LIVE_WINDOW_S

    def poll(self) -> list[dict]:
        out: list[dict] = []
        if not self.plan_sent:
            try:
                plan = json.loads((self.run_dir / "plan.json").read_text())
            except (OSError, ValueError):
                return out
            self.plan_sent = True
            out.append({"event": "plan", "run_dir": str(self.run_dir), "plan": plan})
        path = self.run_dir / "metrics.jsonl"
        try:
            stat = path.stat()
        except OSError:
            return out
        if self.inode is not None and (stat.st_ino != self.inode or stat.st_size < self.offset):
            self.offset, self.partial = 0, b""  # rewritten (a resume drops the records it redoes)
            out.append({"event": "reset"})
        self.inode, self.mtime = stat.st_ino, stat.st_mtime
        if stat.st_size == self.offset:
            return out
        with open(path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(max(0, stat.st_size - self.offset))
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
                if record.get("event") in ("finished", "stopped"):
                    self.ended = True
                elif record.get("event") == "resumed":
                    self.ended = False
        return out
