"""Terminal UI: live memory against the budget and the plan, loss, throughput; `tinytune monitor`.

``train_with_ui`` runs the trainer on a thread and the Textual app on the main thread; they share
only the metric records (a queue) and the run's StopFlag. If the UI fails, training goes on with the
plain progress lines. ``monitor`` shows a run started elsewhere from its run directory.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from tinytune.errors import UserError


class _LogWriter:
    """A text stream whose lines become log records: the trainer's messages reach the UI's log pane."""

    def __init__(self, put) -> None:
        self.put = put
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            if line.strip():
                self.put({"event": "log", "text": line.replace("\r", "").replace("\x1b[2K", "")})
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def train_with_ui(cfg, resume: Path | None = None, overrides: dict | None = None, *, app_class=None,
                  sampler=None, headless: bool = False, size: tuple[int, int] | None = None) -> Path:
    from tinytune import train
    from tinytune.progress import ProgressBar
    from tinytune.tui.app import TinytuneApp
    from tinytune.tui.host import HostSampler
    from tinytune.tui.sources import QueueSource

    try:  # library progress bars would scribble over the screen
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    control = train.StopFlag()
    source = QueueSource(control)
    result: dict = {}

    def work() -> None:
        try:
            result["out"] = train.run(cfg, listener=source.put, stop=control, stream=_LogWriter(source.put),
                                      resume=resume, overrides=overrides, show_progress=False)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, re-raised there
            result["error"] = e
            text = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            source.put({"event": "error", "text": text})

    thread = threading.Thread(target=work, name="tinytune-trainer", daemon=True)
    previous = {sig: signal.signal(sig, lambda s, _f: control.request(signal.Signals(s).name))
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}  # from outside: stop and save
    thread.start()
    app = (app_class or TinytuneApp)(source, sampler if sampler is not None else HostSampler())
    ui_error = None
    try:
        app.run(headless=headless, size=size)
        if app.return_code:
            ui_error = "exited with an error"
    except Exception as e:  # noqa: BLE001 - the UI must never take the run down with it
        ui_error = f"{type(e).__name__}: {e}"
    try:
        if ui_error is not None and thread.is_alive():
            print(f"tinytune: the terminal UI stopped ({ui_error}); training goes on with plain progress",
                  file=sys.stderr, flush=True)
            _plain_progress(source, thread, ProgressBar)
        else:
            thread.join()
            error_line = f"error: {app.view.error}" if app.view.error else None
            for line in app.view.log:  # the run's messages stay in the terminal after the screen closes
                if line != error_line:  # that one is printed once, as tinytune's one-line error
                    print(line)
    except KeyboardInterrupt:
        control.request("SIGINT")
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in result:
        raise result["error"]
    return result["out"]


def _plain_progress(source, thread: threading.Thread, bar_class) -> None:
    bar = None
    while thread.is_alive() or not source.queue.empty():
        for record in source.poll():
            if record.get("event") == "log":
                print(record["text"], flush=True)
            elif record.get("event") == "plan":
                bar = bar_class(record["plan"].get("total_steps", 0))
            elif "tokens_per_s" in record and bar is not None:
                bar.update(record)
        thread.join(timeout=0.2)


def monitor(run_dir: Path, *, sampler=None, headless: bool = False, size: tuple[int, int] | None = None) -> None:
    from tinytune.tui.app import MonitorApp
    from tinytune.tui.host import HostSampler
    from tinytune.tui.sources import FileSource

    if not (run_dir / "plan.json").is_file():
        raise UserError(f"monitor {run_dir}: not a tinytune run directory (no plan.json); pass the --out of a run")
    if not headless and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError(f"monitor {run_dir}: needs a terminal; to follow the records without one: tail -f {run_dir}/metrics.jsonl")
    app = MonitorApp(FileSource(run_dir), sampler if sampler is not None else HostSampler())
    app.run(headless=headless, size=size)
