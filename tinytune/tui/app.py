"""The Textual app: a reader of metric records, never a part of the trainer.

It polls a source (the trainer's in-process queue, or a run directory's files) a few times a second,
folds the records into a RunView and redraws; host and GPU figures are sampled on a worker thread.
The only way back to the trainer is the run's StopFlag: stop, pause, save now.
"""

from __future__ import annotations

from textual import events, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, RichLog, Static

from tinytune.tui import widgets
from tinytune.tui.view import RunView

HELP = """[b]tinytune — keys[/b]

  [b]q[/b]   stop training: saves a checkpoint, then exits (asks first)
  [b]p[/b]   pause / resume between steps
  [b]s[/b]   save a checkpoint after the current step
  [b]?[/b]   this help

[b]What the figures are[/b]
  allocated  bytes in live tensors (torch.cuda.memory_allocated)
  reserved   bytes PyTorch's caching allocator holds (≥ allocated)
  peak       the most allocated since the run started (max_memory_allocated)
  ┃          the plan's predicted peak; nvidia-smi shows reserved + the CUDA context
  On a CPU run the bars are the trainer's resident memory (RSS).

A run stopped with q resumes with: tinytune --resume RUN_DIR
When watching a run started elsewhere (tinytune monitor), q only closes the monitor.

[i]press any key to close[/i]"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = "HelpScreen { align: center middle; } #help { width: 84; height: auto; border: round $accent; padding: 1 2; background: $surface; }"

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")

    def on_key(self, event: events.Key) -> None:
        event.stop()
        self.dismiss(None)


class ConfirmStop(ModalScreen[bool]):
    DEFAULT_CSS = "ConfirmStop { align: center middle; } #confirm { width: 64; height: auto; border: round $warning; padding: 1 2; background: $surface; }"

    def compose(self) -> ComposeResult:
        yield Static("[b]Stop training?[/b]\n\nA checkpoint is saved after the current step; the run resumes later "
                     "with tinytune --resume.\n\n[b]y[/b] stop and save    [b]n[/b] keep training", id="confirm")

    def on_key(self, event: events.Key) -> None:
        event.stop()
        if event.key in ("y", "enter"):
            self.dismiss(True)
        elif event.key in ("n", "escape", "q"):
            self.dismiss(False)


class LogPane(RichLog):
    """The run's log; also receives anything printed while the app runs (warnings, libraries)."""

    def on_print(self, event: events.Print) -> None:
        for line in event.text.splitlines():
            if line.strip():
                self.write(line.rstrip())


class TinytuneApp(App):
    TITLE = "tinytune"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    Screen { layout: vertical; }
    #header { height: 1; padding: 0 1; background: $boost; }
    .panel { border: round $primary-darken-2; padding: 0 1; }
    #top { height: 7; }
    #progress { width: 2fr; height: 100%; }
    #memory { width: 3fr; height: 100%; }
    #middle { height: 1fr; min-height: 10; }
    #plot { width: 3fr; }
    #breakdown { width: 2fr; }
    #host { height: 4; }
    #log { height: 8; }
    """
    BINDINGS = [
        Binding("q", "stop", "stop & save"),
        Binding("p", "pause", "pause/resume"),
        Binding("s", "save", "save checkpoint"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("ctrl+c", "stop", "stop", show=False, priority=True),
    ]

    def __init__(self, source, sampler=None, monitor: bool = False, poll_s: float = 0.5, host_s: float = 2.0) -> None:
        super().__init__()
        self.source = source
        self.sampler = sampler
        self.monitor = monitor
        self.poll_s, self.host_s = poll_s, host_s
        # in-process, the trainer's own messages say when it resumed, stopped or finished
        self.view = RunView(quiet_events=frozenset() if monitor else frozenset({"resumed", "stopped", "finished"}))
        self.host: dict | None = None
        self.stop_requested = False
        self._drawn: dict = {}  # what each panel shows now, so an unchanged panel is not redrawn

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        with Horizontal(id="top"):
            yield Static(id="progress", classes="panel")
            yield Static(id="memory", classes="panel")
        with Horizontal(id="middle"):
            yield widgets.LossPlot(id="plot", classes="panel")
            with Vertical(id="breakdown", classes="panel"):
                yield Static(id="breakdown-table")
        yield Static(id="host", classes="panel")
        yield LogPane(id="log", classes="panel", wrap=True, markup=False, max_lines=2000)
        yield Footer()

    def on_mount(self) -> None:
        for panel, title in (("progress", "progress"), ("memory", "memory"), ("plot", "loss"),
                             ("breakdown", "plan"), ("host", "machine"), ("log", "log")):
            self.query_one(f"#{panel}").border_title = title
        # Kept by reference: a modal (help, confirm) is the active screen while it is open, and a
        # query would search it instead of the main screen.
        self._panels = {sel: self.query_one(sel) for sel in ("#header", "#progress", "#memory", "#host", "#breakdown-table")}
        self.log_pane = self.query_one(LogPane)
        self.plot = self.query_one(widgets.LossPlot)
        self.begin_capture_print(self.log_pane)
        self.set_interval(self.poll_s, self.poll)
        if self.sampler is not None:
            self.sample_host()
            self.set_interval(self.host_s, self.sample_host)
        self.poll()

    # --- records in, screen out ---------------------------------------------------------------------

    def poll(self) -> None:
        records = self.source.poll()
        log = self.log_pane
        for record in records:
            if record.get("event") == "reset":
                log.clear()
            for line in self.view.apply(record):
                log.write(line)
            if record.get("event") == "stopped" and not self.monitor:
                self.set_timer(0.5, self.exit)  # the trainer saved and ended: nothing left to watch
            if record.get("event") == "error" and not self.view.plan:
                self.exit()  # a bad input before training started: its one line goes to the terminal
        if self.stop_requested and not self.view.finished:
            self.view.status = "stopping"
        elif self.source.control is not None and self.source.control.paused and self.view.status == "running":
            self.view.status = "paused"
        if records or self.host is not None:
            self.redraw()

    def redraw(self) -> None:
        """Update what changed; panel sizes are fixed by the CSS, so no relayout is needed."""
        v = self.view
        self._set("#header", widgets.header(v, live=self.source.live))
        self._set("#progress", widgets.progress(v))
        self._set("#memory", widgets.memory(v, self.host))
        self._set("#host", widgets.host_line(self.host, v.on_gpu))
        key = (id(v.plan), v.peak_gib if not v.on_gpu else v.memory.get("mem_peak_gib"))
        if key != self._drawn.get("breakdown"):
            self._drawn["breakdown"] = key
            self._panels["#breakdown-table"].update(widgets.breakdown(v), layout=False)
        plot_key = (len(v.losses), len(v.evals), v.total_steps)
        if plot_key != self._drawn.get("plot"):
            self._drawn["plot"] = plot_key
            self.plot.set_data(v.losses, v.evals, v.total_steps)

    def _set(self, selector: str, content) -> None:
        plain = str(content)
        if self._drawn.get(selector) != plain:
            self._drawn[selector] = plain
            self._panels[selector].update(content, layout=False)

    @work(thread=True, exclusive=True, group="host")
    def sample_host(self) -> None:
        sample = self.sampler.sample()
        self.call_from_thread(self._set_host, sample)

    def _set_host(self, sample: dict) -> None:
        self.host = sample
        self.redraw()

    # --- keys ----------------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.monitor or self.view.finished or self.source.control is None:
            self.exit()
            return
        if self.stop_requested:
            self.notify("stopping: the checkpoint is written after the current step")
            return

        def decided(stop: bool | None) -> None:
            if stop:
                self.stop_requested = True
                self.source.control.request("q")
                self.log_pane.write("stop requested: saving a checkpoint after the current step…")
                self.view.status = "stopping"
                self.redraw()

        self.push_screen(ConfirmStop(), decided)

    def action_quit(self) -> None:  # ctrl+q: the same as q, never a silent kill of the run
        self.action_stop()

    def action_pause(self) -> None:
        control = self._control("pause")
        if control is None:
            return
        control.pause(not control.paused)
        self.log_pane.write("pausing after the current step…" if control.paused else "resuming…")
        self.view.status = "paused" if control.paused else "running"
        self.redraw()

    def action_save(self) -> None:
        control = self._control("save")
        if control is None:
            return
        control.request_save()
        self.log_pane.write("checkpoint requested: it is written after the current step")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def _control(self, what: str):
        if self.source.control is None:
            self.notify(f"{what}: not available while monitoring a run started elsewhere", severity="warning")
            return None
        if self.view.finished:
            self.notify(f"{what}: the run has ended", severity="warning")
            return None
        return self.source.control


class MonitorApp(TinytuneApp, inherit_bindings=False):
    """The same screen for a run started elsewhere: nothing to steer, q closes the monitor."""

    BINDINGS = [
        Binding("q", "stop", "close"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("ctrl+c", "stop", "close", show=False, priority=True),
    ]

    def __init__(self, source, sampler=None, **kwargs) -> None:
        super().__init__(source, sampler, monitor=True, **kwargs)
