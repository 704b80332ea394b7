"""What the terminal UI costs the trainer: step time with the TUI (in a pseudo-terminal) against the
plain progress lines, same run, interleaved.

    python tools/bench_tui.py [--model DIR] [--steps 8] [--repeats 2] [-- extra tinytune flags]

Each run writes its own metrics.jsonl; the figure is the mean ``step_time_s`` over steps after the
first two (warm-up). The TUI polls its records 4× a second and samples the host every 2 s on its own
thread, so its cost is the CPU time those take from the trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pty_terminal import ROOT, Terminal  # noqa: E402


def step_times(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in records if "step_time_s" in r and r["step"] > 2]


def run_plain(argv: list[str], out: Path) -> list[float]:
    subprocess.run([sys.executable, "-m", "tinytune", *argv, "--out", str(out)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"})
    return step_times(out)


def run_tui(argv: list[str], out: Path) -> list[float]:
    term = Terminal(["-m", "tinytune", *argv, "--out", str(out)])
    try:
        if not term.wait_for("FINISHED", 3600):
            raise SystemExit(f"the TUI run did not finish:\n{term.text()}")
        term.press(b"q")
        term.pump(30)
    finally:
        term.kill()
    return step_times(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory or .gguf (default: the embedded default)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more tinytune flags (after --)")
    args = ap.parse_args()
    argv = ["--max-steps", str(args.steps), "--no-sample", "--save-every", "off", "--vram", "12GB", *args.extra]
    if args.model:
        argv += ["--model", args.model]
    results: dict[str, list[float]] = {"plain": [], "tui": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for mode, runner in (("plain", run_plain), ("tui", run_tui)):
                times = runner(argv, Path(tmp) / f"{mode}{i}")
                results[mode] += times
                print(f"{mode:5} run {i + 1}: mean step {statistics.mean(times):.4f} s over {len(times)} steps", flush=True)
    plain, tui = statistics.mean(results["plain"]), statistics.mean(results["tui"])
    print(f"\nmean step time: plain {plain:.4f} s, TUI {tui:.4f} s → TUI/plain = {tui / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
