"""A child process on a pseudo-terminal with its screen emulated (pyte): how the tests and the TUI
benchmark drive the real `tinytune` CLI as a person at a terminal would."""

from __future__ import annotations

import os
import pty
import select
import signal
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Terminal:
    """``python argv...`` on a pseudo-terminal of cols × rows."""

    def __init__(self, argv: list[str], cols: int = 130, rows: int = 42, env: dict | None = None) -> None:
        import fcntl
        import termios

        import pyte

        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: size its terminal before the app starts
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.environ.update({"TERM": "xterm-256color", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
                               "COLUMNS": str(cols), "LINES": str(rows), **(env or {})})
            os.execv(sys.executable, [sys.executable, *argv])
        self.status = None
        self.raw = b""  # everything the child wrote, escape sequences included

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.status is None:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    self.reap(wait=True)
                    return
                self.raw += data
                self.stream.feed(data)
            self.reap()

    def reap(self, wait: bool = False) -> None:
        pid, status = os.waitpid(self.pid, 0 if wait else os.WNOHANG)
        if pid:
            self.status = os.waitstatus_to_exitcode(status)

    def wait_for(self, needle: str, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.status is None:
            if needle in self.text():
                return True
            self.pump(0.2)
        return needle in self.text()

    def press(self, key: bytes) -> None:
        os.write(self.fd, key)

    def kill(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            self.reap(wait=True)
