"""The terminal UI: a reader of metric records. Pilot-driven app tests, a snapshot, and the real CLI
in a pseudo-terminal."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from tinytune import train
from tinytune.tui import sources, train_with_ui
from tinytune.tui.app import ConfirmStop, HelpScreen, MonitorApp, TinytuneApp
from tinytune.tui.sources import FileSource, QueueSource
from tinytune.tui.view import RunView
from tinytune.tui.widgets import plot

from pty_terminal import Terminal

ROOT = Path(__file__).resolve().parent.parent

PLAN = {"technique": "lora", "rank": 16, "bits": 4, "budget_gib": 12.0, "device": "cuda", "total_steps": 40,
        "predicted_peak_gib": 9.1, "model": {"name": "llama-3.1-8b"},
        "breakdown_gib": {"base weights": 3.35, "embeddings, norms, head": 1.96, "adapter weights": 0.16,
                          "activations": 1.2, "backward working set": 1.7}}


def step_record(step: int, loss: float, **kw) -> dict:
    return {"step": step, "total_steps": 40, "loss": loss, "lr": 2e-4 * (1 - step / 40), "grad_norm": 0.5,
            "tokens": 4096, "tokens_per_s": 5200.0 + step, "step_time_s": 0.79, "elapsed_s": 0.79 * step,
            "mem_allocated_gib": 6.5, "mem_reserved_gib": 8.0 + step / 100, "mem_peak_gib": 8.8, "rss_gib": 3.1, **kw}


SCRIPT = [{"event": "plan", "run_dir": "runs/demo", "plan": PLAN}, {"step": 0, "eval_loss": 2.9}] + [
    step_record(s, 3.0 - 0.05 * s) for s in range(1, 13)] + [
    {"step": 10, "eval_loss": 2.4}, {"step": 10, "event": "checkpoint", "path": "checkpoints/step-00000010"},
    {"step": 11, "event": "oom", "action": "micro-batch 1 × 2 pieces per planned micro-batch", "split": 2}]


class FixedHost:
    def __init__(self, gpu=True) -> None:
        self.gpu = gpu

    def sample(self) -> dict:
        gpu = {"util_percent": 97.0, "temp_c": 71.0, "power_w": 312.0, "name": "NVIDIA H100", "source": "NVML"}
        return {"ram_used_gib": 7.5, "ram_total_gib": 31.3, "cpu_percent": 12.0, "cpus": 16,
                "gpu": gpu if self.gpu else None}


def scripted(records=SCRIPT, control=True) -> QueueSource:
    source = QueueSource(train.StopFlag() if control else None)
    for r in records:
        source.put(r)
    return source


def run_async(test):
    """Run an async test on its own event loop (no pytest plugin needed)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return wrapper


def text(app, selector: str) -> str:
    return str(app.query_one(selector).content)


# --- the view: records folded into what is shown --------------------------------------------------------

def test_view_folds_records():
    view = RunView()
    lines = [line for r in SCRIPT for line in view.apply(r)]
    assert view.step == 12 and view.total_steps == 40 and view.status == "running" and view.on_gpu
    assert view.losses[-1] == (12, pytest.approx(2.4)) and view.evals == [(0, 2.9), (10, 2.4)]
    assert view.memory["mem_peak_gib"] == 8.8 and view.peak_gib == 8.8
    assert view.eta_s == pytest.approx(0.79 * 12 / 12 * 28)
    assert lines == ["eval loss before training: 2.9000", "step 10: eval loss 2.4000",
                     "step 10: checkpoint saved (checkpoints/step-00000010)",
                     "step 11: out of memory; retried with micro-batch 1 × 2 pieces per planned micro-batch"]
    view.apply({"step": 12, "event": "stopped", "reason": "q", "total_steps": 40})
    assert view.finished and view.status == "stopped"


def test_file_source_reads_whole_lines_and_notices_a_rewrite(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(step_record(1, 3.0)) + "\n" + '{"step": 2, "total_st')
    source = FileSource(tmp_path)
    first = source.poll()
    assert [r.get("event") for r in first] == ["plan", None] and first[1]["step"] == 1
    with open(metrics, "a") as f:
        f.write('eps": 40, "loss": 2.9, "tokens_per_s": 1.0}\n')
    assert [r["step"] for r in source.poll()] == [2]
    assert source.live
    metrics.write_text(json.dumps(step_record(1, 3.0)) + "\n")  # a resume rewrote the file
    again = source.poll()
    assert again[0] == {"event": "reset"} and again[1]["step"] == 1
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": 1, "event": "finished", "total_steps": 1}) + "\n")
    source.poll()
    assert not source.live


def test_a_monitored_run_is_live_while_a_trainer_holds_it_however_slow_its_steps(tmp_path):
    """Live while a trainer holds the run, whenever its last record was; not live once the trainer is
    gone, at once; without a lock file, live while records came within the last minute."""
    from tinytune.rundir import RunLock

    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(step_record(1, 3.0)) + "\n")
    old = time.time() - 10 * sources.LIVE_WINDOW_S  # no record for ten minutes: a slow step, or a dead trainer
    os.utime(metrics, (old, old))
    source = FileSource(tmp_path)
    source.poll()
    assert not source.live
    with RunLock() as lock:
        lock.take(tmp_path, "--out")
        assert source.live
    assert not source.live
    (tmp_path / ".lock").write_text("4242")  # what a killed trainer leaves: the file, no lock
    os.utime(metrics)  # its last record just now
    source.poll()
    assert not source.live
    (tmp_path / ".lock").unlink()  # no lock file (a filesystem without locks): records of the last minute
    assert source.live


def test_the_monitor_starts_without_torch():
    """`tinytune monitor` only reads files: its modules leave torch (seconds to import) alone."""
    import subprocess

    code = ("import sys; import tinytune.cli, tinytune.tui, tinytune.tui.app, tinytune.tui.sources, tinytune.tui.host; "
            "assert 'torch' not in sys.modules, 'the monitor imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_plot_draws_train_line_and_eval_marks():
    out = str(plot([(s, 3.0 - 0.1 * s) for s in range(1, 21)], [(10, 2.0), (20, 1.0)], 20, 60, 12))
    assert out.count("●") == 2 + 1  # two marks and the legend
    assert "2.9│" in out.splitlines()[1] and "1│" in out.splitlines()[-2] and any(0x2800 < ord(c) <= 0x28FF for c in out)
    assert "waiting for the first step" in str(plot([], [], 10, 40, 8))


# --- the app, driven by Pilot ----------------------------------------------------------------------

@run_async
async def test_records_appear_on_screen():
    app = TinytuneApp(scripted(), FixedHost(), poll_s=0.05)
    async with app.run_test(size=(130, 42)) as pilot:
        await pilot.pause(0.2)
        assert "step 12 of 40" in text(app, "#progress") and "5,212 tokens/s" in text(app, "#progress")
        memory = text(app, "#memory")
        assert "allocated" in memory and "reserved" in memory and "peak" in memory and "8.80 GiB" in memory
        assert "predicted peak 9.10 GiB" in memory and "budget 12.00 GiB" in memory and "nvidia-smi" in memory
        assert "llama-3.1-8b" in text(app, "#header") and "lora r16" in text(app, "#header")
        assert "utilisation 97%" in text(app, "#host")
        app.source.put(step_record(13, 2.3))
        await pilot.pause(0.2)
        assert "step 13 of 40" in text(app, "#progress")
        log = "\n".join(str(line.text) for line in app.query_one("#log").lines)
        assert "checkpoint saved" in log and "out of memory" in log


@run_async
async def test_cpu_run_says_no_gpu_and_shows_ram():
    records = [{"event": "plan", "run_dir": "runs/cpu", "plan": {**PLAN, "device": "cpu"}}] + [
        {k: v for k, v in step_record(s, 3.0).items() if not k.startswith("mem_")} for s in (1, 2)]
    app = TinytuneApp(scripted(records), FixedHost(gpu=False), poll_s=0.05)
    async with app.run_test(size=(130, 42)) as pilot:
        await pilot.pause(0.2)
        assert "no GPU" in text(app, "#memory") and "host RAM" in text(app, "#memory")
        assert "no GPU: a CPU-only run" in text(app, "#host")


@run_async
async def test_keys_pause_save_help_and_stop_with_confirmation():
    source = scripted()
    control = source.control
    app = TinytuneApp(source, FixedHost(), poll_s=0.05)
    async with app.run_test(size=(130, 42)) as pilot:
        await pilot.pause(0.1)
        await pilot.press("p")
        assert control.paused and app.view.status == "paused"
        await pilot.press("p")
        assert not control.paused
        await pilot.press("s")
        assert control.save_now
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        source.put(step_record(13, 2.3))  # records keep arriving while a modal screen is open
        await pilot.pause(0.2)
        assert app.view.step == 13 and "step 13 of 40" in str(app._panels["#progress"].content)
        await pilot.press("x")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("q")
        assert isinstance(app.screen, ConfirmStop)
        await pilot.press("n")
        assert not control.stop
        await pilot.press("q", "y")
        assert control.stop and control.reason == "q" and app.view.status == "stopping"
        source.put({"step": 12, "event": "stopped", "total_steps": 40, "reason": "q"})
        await pilot.pause(1.0)
    assert not app.is_running  # the trainer saved and stopped: the app closed itself


@run_async
async def test_monitor_replays_a_finished_run_and_q_closes(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SCRIPT[1:] + [
        {"step": 12, "event": "finished", "total_steps": 12}]))
    app = MonitorApp(FileSource(tmp_path), FixedHost(), poll_s=0.05)
    async with app.run_test(size=(130, 42)) as pilot:
        await pilot.pause(0.2)
        assert app.view.status == "finished" and "FINISHED" in text(app, "#header")
        await pilot.press("p")  # nothing to steer
        await pilot.press("q")
        await pilot.pause(0.1)
    assert not app.is_running


def test_snapshot(snap_compare):
    app = TinytuneApp(scripted(), FixedHost(), poll_s=0.05)
    assert snap_compare(app, terminal_size=(130, 42), run_before=lambda pilot: pilot.pause(0.3))


# --- the UI never takes the run down -----------------------------------------------------------------

class BrokenApp(TinytuneApp):
    def redraw(self) -> None:
        raise RuntimeError("a widget bug")


def test_training_goes_on_when_the_ui_fails(tiny_model_dir, demo_file, tmp_path, capsys):
    from test_train import tiny_cfg

    cfg = tiny_cfg(tiny_model_dir, demo_file, tmp_path / "run", max_steps=3, sample=False)
    out = train_with_ui(cfg, app_class=BrokenApp, sampler=FixedHost(gpu=False), headless=True, size=(120, 40))
    assert (out / "adapter.safetensors").is_file()
    assert "the terminal UI stopped" in capsys.readouterr().err
    assert [json.loads(line).get("event") for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == "finished"


# --- the real CLI in a pseudo-terminal -------------------------------------------------------------

def test_real_cli_in_a_terminal_shows_the_run_and_stops_cleanly_on_q(tiny_model_dir, demo_file, tmp_path):
    run_dir = tmp_path / "run"
    term = Terminal(["-m", "tinytune", "--model", str(tiny_model_dir), "--data", str(demo_file), "--out", str(run_dir), "--max-steps", "5000",
                     "--rank", "4", "--seq-len", "128", "--no-sample", "--vram", "2GB"])
    try:
        assert term.wait_for(" of 5000", 120), term.text()
        term.pump(2)
        screen = term.text()
        assert "tinytune" in screen and "lora r4" in screen and "budget 2.00 GiB" in screen
        assert "no GPU" in screen and "predicted peak" in screen and "tokens/s" in screen and "ETA" in screen
        assert "q stop & save" in screen
        term.press(b"q")
        assert term.wait_for("Stop training?", 20), term.text()
        term.press(b"y")
        term.pump(60)
    finally:
        term.kill()
    assert term.status == 0, term.text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "stopped" and records[-1]["reason"] == "q"
    assert (run_dir / "checkpoints" / f"step-{records[-1]['step']:08d}").is_dir()
    assert f"tinytune --resume {run_dir}" in term.text()  # the run's messages stay in the terminal


def test_plain_output_when_not_a_terminal(tiny_model_dir, demo_file, tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "tinytune", "--model", str(tiny_model_dir), "--data", str(demo_file),
                             "--out", str(tmp_path / "run"), "--max-steps", "2", "--rank", "4", "--no-sample"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "step 2/2" in result.stderr and "\x1b[?1049h" not in result.stdout  # no alternate screen


def test_monitor_needs_a_run_dir_and_a_terminal(tmp_path, capsys):
    from tinytune.cli import main

    assert main(["monitor", str(tmp_path)]) == 2
    assert "not a tinytune run directory" in capsys.readouterr().err
    (tmp_path / "plan.json").write_text("{}")
    assert main(["monitor", str(tmp_path)]) == 2
    assert "needs a terminal" in capsys.readouterr().err


def test_monitor_without_a_run_dir_watches_the_newest_live_run(tmp_path, capsys, monkeypatch):
    from tinytune import rundir
    from tinytune.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["monitor"]) == 2
    assert "monitor: no run under ./runs to watch; pass the run directory" in capsys.readouterr().err
    now = time.time()
    for age, name in [(300, "held"), (60, "newest"), (600, "oldest")]:
        run = Path("runs") / name
        run.mkdir(parents=True)
        (run / "plan.json").write_text(json.dumps(PLAN))
        (run / "metrics.jsonl").write_text(json.dumps(step_record(1, 3.0)) + "\n")
        for f in run.iterdir():
            os.utime(f, (now - age, now - age))
    Path("runs/exported-model").mkdir()  # not a run: no plan.json
    with rundir.RunLock() as lock:
        lock.take(Path("runs/held"), "--out")  # a trainer in a slow step: live, though not the newest record
        assert rundir.newest_run() == Path("runs/held")
        assert main(["monitor"]) == 2  # found it; this test has no terminal to show it in
        out, err = capsys.readouterr()
        assert out == "monitor: watching runs/held\n" and "needs a terminal" in err
    assert rundir.newest_run() == Path("runs/newest")  # none live: the newest record


def test_bad_input_in_a_terminal_is_still_one_line_and_exit_2(tmp_path):
    term = Terminal(["-m", "tinytune", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "run")])
    try:
        term.pump(120)
    finally:
        term.kill()
    assert term.status == 2
    after_ui = term.raw.rsplit(b"\x1b[?1049l", 1)[-1].decode(errors="replace")  # once the alternate screen is gone
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", after_ui).replace("\r", "")
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tinytune: error: --data") and "no such file" in lines[0], lines
    assert not (tmp_path / "run").exists()
