"""Save the terminal UI of a run directory as an SVG (what `tinytune monitor RUN_DIR` shows).

    python tools/tui_screenshot.py RUN_DIR OUT.svg [--size 130x42]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinytune.tui.app import MonitorApp  # noqa: E402
from tinytune.tui.host import HostSampler  # noqa: E402
from tinytune.tui.sources import FileSource  # noqa: E402


async def shoot(run_dir: Path, out: Path, size: tuple[int, int]) -> None:
    app = MonitorApp(FileSource(run_dir), HostSampler())
    async with app.run_test(size=size) as pilot:
        await pilot.pause(1.0)
        out.write_text(app.export_screenshot(title=f"tinytune monitor {run_dir.name}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="130x42")
    args = ap.parse_args()
    cols, rows = (int(x) for x in args.size.split("x"))
    asyncio.run(shoot(args.run_dir, args.out, (cols, rows)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
