"""What the UI knows about a run, folded from metric records. Pure: no Textual, no torch.

The same records arrive in-process (the trainer's listener) or from ``RUN_DIR/metrics.jsonl`` and
``plan.json`` (``tinytune monitor``), so both show the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOG_EVENTS = {
    "checkpoint": lambda r: f"step {r['step']}: checkpoint saved ({r.get('path', '')})",
    "resumed": lambda r: f"resumed at step {r['step']} from {r.get('checkpoint', '?')}",
    "oom": lambda r: f"step {r['step']}: out of memory; retried with {r.get('action', 'a smaller micro-batch')}",
    "nonfinite": lambda r: f"warning: step {r['step']}: loss not finite, step skipped ({r.get('in_a_row', 1)} in a row)",
    "paused": lambda r: f"paused after step {r['step']}",
    "unpaused": lambda r: f"resumed after step {r['step']}",
    "finished": lambda r: f"finished: {r['step']} of {r.get('total_steps', r['step'])} steps",
    "stopped": lambda r: f"stopped at step {r['step']} ({r.get('reason', '')}); resume with tinytune --resume",
}


@dataclass
class RunView:
    plan: dict = field(default_factory=dict)
    run_dir: str | None = None
    step: int = 0
    total_steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    lr: float | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    elapsed_s: float = 0.0
    first_step: int | None = None
    """The first step this process (or this stretch of the file) trained: ETA counts from here."""
    memory: dict = field(default_factory=dict)
    """The newest step's memory figures (mem_allocated_gib, mem_reserved_gib, mem_peak_gib, rss_gib)."""
    peak_gib: float = 0.0
    log: list[str] = field(default_factory=list)
    status: str = "starting"
    """starting, running, paused, stopping, finished, stopped, failed."""
    error: str | None = None
    quiet_events: frozenset = frozenset()
    """Events whose log line the trainer writes itself (in-process, its messages arrive as log records)."""

    def apply(self, record: dict) -> list[str]:
        """Fold one record in; returns the log lines it adds."""
        event = record.get("event")
        lines: list[str] = []
        if event == "reset":  # the file was rewritten: start over, keeping the plan
            fresh = RunView(plan=self.plan, run_dir=self.run_dir, total_steps=self.total_steps, status="running",
                            quiet_events=self.quiet_events)
            self.__dict__.update(fresh.__dict__)
            return []
        if event == "plan":
            self.plan = record.get("plan") or {}
            self.run_dir = record.get("run_dir", self.run_dir)
            self.total_steps = self.plan.get("total_steps", self.total_steps)
            if self.status == "starting":
                self.status = "running"
        elif event == "log":
            lines = [line for line in str(record.get("text", "")).splitlines() if line.strip()]
        elif event == "error":
            self.status, self.error = "failed", record.get("text", "")
            lines = [f"error: {self.error}"]
        elif event in LOG_EVENTS:
            lines = [] if event in self.quiet_events else [LOG_EVENTS[event](record)]
            if event in ("finished", "stopped"):
                self.status = event
                self.step = record.get("step", self.step)
            elif event == "paused":
                self.status = "paused"
            elif event in ("unpaused", "resumed"):
                self.status = "running"
                if event == "resumed":
                    self.first_step = None  # the time axis restarts with the new process
        elif "eval_loss" in record:
            self.evals.append((record["step"], record["eval_loss"]))
            lines = [f"step {record['step']}: eval loss {record['eval_loss']:.4f}" if record["step"]
                     else f"eval loss before training: {record['eval_loss']:.4f}"]
        elif "tokens_per_s" in record:
            self.step = record["step"]
            self.total_steps = record.get("total_steps", self.total_steps)
            if self.first_step is None:
                self.first_step = self.step
            if record.get("loss") is not None:
                self.losses.append((self.step, record["loss"]))
            self.lr = record.get("lr", self.lr)
            self.tokens_per_s = record.get("tokens_per_s")
            self.step_time_s = record.get("step_time_s")
            self.elapsed_s = record.get("elapsed_s", self.elapsed_s)
            self.memory = {k: v for k, v in record.items() if k.startswith("mem_") or k == "rss_gib"}
            self.peak_gib = max(self.peak_gib, record.get("mem_peak_gib", record.get("rss_gib", 0.0)))
            if self.status == "starting":
                self.status = "running"
        self.log.extend(lines)
        return lines

    @property
    def on_gpu(self) -> bool:
        return self.plan.get("device") == "cuda" or "mem_allocated_gib" in self.memory

    @property
    def eta_s(self) -> float | None:
        if self.first_step is None or self.step <= self.first_step - 1 or not self.total_steps:
            return None
        done = self.step - self.first_step + 1
        return self.elapsed_s / done * (self.total_steps - self.step) if done > 0 else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    @property
    def last_eval(self) -> float | None:
        return self.evals[-1][1] if self.evals else None

    @property
    def finished(self) -> bool:
        return self.status in ("finished", "stopped", "failed")
