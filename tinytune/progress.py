"""Headless progress: one updating line on a terminal, a line every few steps otherwise."""

from __future__ import annotations

import sys
import time


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _loss(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.4f}"


class ProgressBar:
    def __init__(self, total: int, stream=None, width: int = 20, start: int = 0, quiet: bool = False) -> None:
        self.total = total
        self.quiet = quiet  # messages only: a UI shows the progress itself
        self.first = start  # steps done before this process (a resumed run): ETA counts only the rest
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.perf_counter()
        self.every = max(1, total // 20)

    def update(self, record: dict) -> None:
        if self.quiet:
            return
        step = record["step"]
        elapsed = time.perf_counter() - self.start
        done = step - self.first
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        filled = int(self.width * step / max(1, self.total))
        bar = "#" * filled + "-" * (self.width - filled)
        mem = (
            f"gpu {record['mem_allocated_gib']:.2f} alloc / {record['mem_peak_gib']:.2f} peak GiB"
            if "mem_allocated_gib" in record
            else f"rss {record['rss_gib']:.2f} GiB"
        )
        line = (
            f"step {step}/{self.total} [{bar}] loss {_loss(record['loss'])} | {record['tokens_per_s']:.0f} tok/s | "
            f"{mem} | {duration(elapsed)} elapsed, ETA {duration(eta)}"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            if step == self.total:
                self.stream.write("\n")
        elif step % self.every == 0 or step == self.total or done == 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.quiet:  # a UI shows these from the metric records
            return
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        self.stream.flush()
