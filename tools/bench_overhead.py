"""The host's share of a training step: a model's layer count at a tiny width, on the CPU.

    python tools/bench_overhead.py [--model llama-3.1-8b] [--seq 128] [--rounds 3] [--threads 1]

On an H100 a quantized Llama-3.1-8B step at 2,048 tokens is bound by the CPU that launches its
kernels, not by the GPU. Here each stack of ``tools/bench_vs_peft.py`` runs the model's number of
decoder layers (32 for the 8B) at the CPU smoke shape's width (64), where the arithmetic is small and
most of what is left is paid per operation and per call: Python, dispatch, the compiled regions'
guards and wrappers, checkpointing, the optimizer's loop. It is a proxy for launch overhead, not a
measurement of it: compiled layers run as generated C++ here (part of their time is their own
arithmetic), and a CPU has no device to synchronize with (bitsandbytes' optimizer synchronizes the
GPU after every tensor, which a flat optimizer group avoids). Every layer is checkpointed in the
tinytune stacks (``plain0``), as in the recipe. Each run is a fresh process; the stacks take turns
in each round; a row shows the median step over rounds, a ratio the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_peft import spec_of, speed_ratio, timed_rounds  # noqa: E402

STACKS = "peft,tinytune+plain0,tinytune+plain0+bnb4,tinytune+plain0+pertensor,tinytune+plain0+nocompile"


def main() -> int:
    from tinytune import presets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", help="model preset whose layer count is used")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--stacks", default=STACKS, help=f"comma-separated, as bench_vs_peft.py's (default {STACKS})")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run (its time: their median)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1: steadier)")
    args = ap.parse_args()
    layers = args.layers or presets.model_shape(args.model).layers
    rows = [{**spec_of(stack), "model": args.model, "smoke": True, "layers": layers, "threads": args.threads,
             "seq": args.seq, "steps": args.steps} for stack in args.stacks.split(",")]
    rows = timed_rounds(rows, args.rounds)
    print(f"\n{args.model}'s {layers} layers at width 64, {args.seq} tokens, CPU, {args.threads} thread(s): "
          "host time per step")
    base = rows[0]
    for r in rows:
        if "tokens_per_s" not in r or r.get("crash"):
            print(f"{r['label']:34} {r.get('crash', 'failed')}")
            continue
        ms = 1000 * args.seq / r["tokens_per_s"]
        lo, hi = (1000 * args.seq / v for v in reversed(r["tokens_per_s_range"]))
        ratio = speed_ratio(r, base) if r is not base else None
        vs = f"  {1 / ratio[0]:.2f}× the {base['label']}'s time (rounds {1 / ratio[2]:.2f}–{1 / ratio[1]:.2f}×)" if ratio else ""
        print(f"{r['label']:34} {ms:8.1f} ms  ({lo:.1f}–{hi:.1f}){vs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
