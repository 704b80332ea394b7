"""Pure renderers (RunView → rich Text/Table) and the one custom widget, the loss plot."""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text
from textual.widget import Widget

from tinytune.progress import duration
from tinytune.tui.view import RunView

BAR_WIDTH = 28
BRAILLE_BASE = 0x2800
# dot bit for (column 0/1, row 0..3) inside one braille cell
BRAILLE_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


def bar(value: float, scale: float, marker: float | None = None, width: int = BAR_WIDTH, style: str = "green") -> Text:
    """A horizontal bar of ``value`` out of ``scale``, with ``marker`` (the plan's prediction) as ┃."""
    filled = 0 if scale <= 0 else min(width, round(width * value / scale))
    cells = ["█"] * filled + ["░"] * (width - filled)
    styles = [style] * filled + ["grey39"] * (width - filled)
    if marker is not None and scale > 0:
        at = min(width - 1, max(0, round(width * marker / scale) - 1))
        cells[at], styles[at] = "┃", "bold yellow"
    text = Text()
    for c, s in zip(cells, styles):
        text.append(c, style=s)
    return text


def header(view: RunView, live: bool = True) -> Text:
    p = view.plan
    model = (p.get("model") or {}).get("name", "…")
    technique = p.get("technique", "…")
    what = "full fine-tuning" if technique == "full" else f"{technique} r{p.get('rank', '?')}"
    budget = f"budget {p['budget_gib']:.2f} GiB" if p.get("budget_gib") else "no budget"
    device = "GPU" if view.on_gpu else "CPU"
    status = view.status if live or view.finished else "not live: no new records"
    colour = {"running": "green", "paused": "yellow", "stopping": "yellow", "finished": "cyan",
              "stopped": "yellow", "failed": "red"}.get(view.status, "white")
    text = Text.assemble(("tinytune", "bold"), " · ", (model, "bold"), " · ", what, " · ",
                         f"{p.get('bits', '?')}-bit", " · ", budget, " · ", device, " · ")
    text.append(status.upper(), style=f"bold {colour}")
    if view.run_dir:
        text.append(f"  {view.run_dir}", style="grey50")
    return text


def progress(view: RunView) -> Text:
    total = view.total_steps or 0
    frac = view.step / total if total else 0.0
    t = Text.assemble(("step ", "bold"), (f"{view.step} of {total or '?'}", "bold"), "  ")
    t.append_text(bar(view.step, total or 1, width=24, style="cyan"))
    t.append(f" {100 * frac:.0f}%\n")
    loss = f"{view.last_loss:.4f}" if view.last_loss is not None else "—"
    ev = f"{view.last_eval:.4f}" if view.last_eval is not None else "—"
    lr = f"{view.lr:.2e}" if view.lr is not None else "—"
    t.append(f"loss {loss}   eval loss {ev}   lr {lr}\n")
    tps = f"{view.tokens_per_s:,.0f} tokens/s" if view.tokens_per_s is not None else "— tokens/s"
    sps = f"{view.step_time_s:.2f} s/step" if view.step_time_s is not None else "— s/step"
    t.append(f"{tps}   {sps}\n")
    t.append(f"elapsed {duration(view.elapsed_s)}   ETA {duration(view.eta_s)}")
    return t


def memory(view: RunView, host: dict | None) -> Text:
    p, m = view.plan, view.memory
    budget = p.get("budget_gib")
    predicted = p.get("predicted_peak_gib")
    values = [v for v in (budget, predicted, *m.values()) if isinstance(v, (int, float))]
    scale = max(values) if values else 1.0
    t = Text()
    rows: list[tuple[str, float | None, str]]
    if view.on_gpu:
        t.append("GPU memory", style="bold")
        t.append(" (PyTorch allocator; nvidia-smi adds the CUDA context)\n", style="grey62")
        rows = [("allocated", m.get("mem_allocated_gib"), "live tensors"),
                ("reserved", m.get("mem_reserved_gib"), "PyTorch's cache"),
                ("peak", m.get("mem_peak_gib"), "max allocated")]
    else:
        t.append("no GPU", style="bold yellow")
        t.append(" — CPU run: host memory against the budget\n", style="grey62")
        rows = [("process", m.get("rss_gib"), "trainer's RSS"),
                ("peak", view.peak_gib or None, "max RSS")]
    for label, value, meaning in rows:
        t.append(f"{label:<10}")
        if value is None:
            t.append("—".ljust(BAR_WIDTH))
        else:
            t.append_text(bar(value, scale, predicted))
        t.append(f" {value:6.2f} GiB" if value is not None else "      — GiB")
        t.append(f"  {meaning}\n", style="grey62")
    if host and not view.on_gpu:
        t.append(f"{'host RAM':<10}")
        t.append_text(bar(host["ram_used_gib"], host["ram_total_gib"], style="blue"))
        t.append(f" {host['ram_used_gib']:6.2f} GiB", style="")
        t.append(f"  of {host['ram_total_gib']:.1f}, all processes\n", style="grey62")
    legend = Text("          ")
    legend.append("┃", style="bold yellow")
    legend.append(f" predicted peak {predicted:.2f} GiB" if predicted is not None else " no prediction")
    legend.append(f" · budget {budget:.2f} GiB" if budget else " · no budget set")
    t.append_text(legend)
    return t


def breakdown(view: RunView) -> Table:
    p = view.plan
    table = Table(title="plan's prediction vs measured", title_justify="left", expand=True, box=None,
                  padding=(0, 1), show_edge=False)
    table.add_column("component")
    table.add_column("predicted GiB", justify="right")
    for name, gib in (p.get("breakdown_gib") or {}).items():
        table.add_row(name, f"{gib:.2f}")
    predicted = p.get("predicted_peak_gib")
    table.add_row("[bold]predicted peak[/]", f"[bold]{predicted:.2f}[/]" if predicted is not None else "—")
    if view.on_gpu:
        measured = view.memory.get("mem_peak_gib")
        table.add_row("[bold]measured peak[/]", f"[bold]{measured:.2f}[/]" if measured is not None else "—")
        if measured and predicted:
            table.add_row("prediction error", f"{100 * (predicted / measured - 1):+.0f}%")
    else:
        table.add_row("[bold]measured peak RSS[/]", f"[bold]{view.peak_gib:.2f}[/]" if view.peak_gib else "—")
    return table


def host_line(host: dict | None, on_gpu: bool) -> Text:
    if not host:
        return Text("host: sampling…", style="grey62")
    t = Text.assemble(("host ", "bold"), f"RAM {host['ram_used_gib']:.1f} / {host['ram_total_gib']:.1f} GiB used · "
                      f"CPU {host['cpu_percent']:.0f}% of {host['cpus']} threads\n")
    gpu = host.get("gpu")
    if gpu:
        power = f" · {gpu['power_w']:.0f} W" if gpu.get("power_w") is not None else ""
        t.append_text(Text.assemble(("GPU ", "bold"), f"{gpu.get('name', '')}: utilisation {gpu['util_percent']:.0f}% · "
                                    f"{gpu['temp_c']:.0f}°C{power} ({gpu['source']})"))
    elif on_gpu:
        t.append("GPU utilisation, temperature, power: NVML not available (pip install nvidia-ml-py)", style="grey62")
    else:
        t.append("no GPU: a CPU-only run", style="yellow")
    return t


class LossPlot(Widget):
    """Train loss as a braille line, eval loss as ● marks, on a shared step axis."""

    DEFAULT_CSS = "LossPlot { height: 1fr; min-height: 6; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train: list[tuple[int, float]] = []
        self.eval: list[tuple[int, float]] = []
        self.total = 0

    def set_data(self, train: list[tuple[int, float]], evals: list[tuple[int, float]], total: int) -> None:
        self.train, self.eval, self.total = list(train), list(evals), total
        self.refresh()

    def render(self) -> Text:
        return plot(self.train, self.eval, self.total, self.size.width, self.size.height)


def plot(train: list[tuple[int, float]], evals: list[tuple[int, float]], total: int, width: int, height: int) -> Text:
    rows = max(2, height - 2)
    axis = 8
    cols = max(4, width - axis - 1)
    values = [v for _, v in train + evals if math.isfinite(v)]
    out = Text()
    out.append("loss ", style="bold")
    out.append("⣿ train", style="green")
    out.append("  ● eval", style="magenta")
    if not values:
        out.append("\n" + "waiting for the first step…".center(width))
        return out
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    last_step = max([s for s, _ in train + evals] + [total, 1])
    dots = [[0] * cols for _ in range(rows)]
    marks: dict[tuple[int, int], str] = {}

    def to_xy(step: int, value: float) -> tuple[int, int]:
        x = round((step - 1) / max(1, last_step - 1) * (cols * 2 - 1)) if last_step > 1 else 0
        y = round((hi - value) / (hi - lo) * (rows * 4 - 1))
        return min(cols * 2 - 1, max(0, x)), min(rows * 4 - 1, max(0, y))

    previous = None
    for step, value in train:
        if not math.isfinite(value):
            continue
        x, y = to_xy(step, value)
        points = [(x, y)]
        if previous is not None:  # connect to the previous point
            px, py = previous
            n = max(abs(x - px), abs(y - py), 1)
            points = [(px + (x - px) * i // n, py + (y - py) * i // n) for i in range(1, n + 1)]
        for qx, qy in points:
            dots[qy // 4][qx // 2] |= BRAILLE_BITS[qx % 2][qy % 4]
        previous = (x, y)
    for step, value in evals:
        if math.isfinite(value):
            x, y = to_xy(step, value)
            marks[(y // 4, x // 2)] = "●"
    for r in range(rows):
        label = f"{hi:.3g}" if r == 0 else f"{lo:.3g}" if r == rows - 1 else ""
        out.append("\n" + label.rjust(axis) + "│", style="grey62")
        for c in range(cols):
            if (r, c) in marks:
                out.append("●", style="bold magenta")
            elif dots[r][c]:
                out.append(chr(BRAILLE_BASE + dots[r][c]), style="green")
            else:
                out.append(" ")
    out.append("\n" + " " * axis + "└" + "step 1".ljust(cols - len(str(last_step))) + str(last_step), style="grey62")
    return out
