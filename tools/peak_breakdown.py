"""What is live on the GPU at a training step's peak, next to the estimator's components.

    python tools/peak_breakdown.py --model llama-3.1-8b --seq 32768 --offload --tiles 16
    python tools/peak_breakdown.py --smoke     # CPU: checks the code path, measures nothing

Builds the model as tools/bench_planner.py does (random weights straight into 4 bits, LoRA), runs a
warm-up step, then records the CUDA allocator's history (``torch.cuda.memory._record_memory_history``)
over one more step, replays it to find the moment of the highest allocated total, and prints the
blocks live then, largest first, each with the Python frames that allocated it, and the blocks freed
but not yet reusable then (kept by ``record_stream`` until another stream is done with them). Blocks allocated
before the recording (weights, adapters, optimizer state) are one line: the baseline.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchkit import TINY, train_step  # noqa: E402

MIB = 2**20
PROJECT_FILES = ("tinytune", "transformers", "bitsandbytes", "torch/utils/checkpoint", "torch/autograd")


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict], list[dict]]:
    """Replay one device's allocator trace as ``max_memory_allocated`` counts it: a block stops
    counting when it is freed (``free_requested``), though a block used on another stream
    (``record_stream``) stays unusable until that stream's work on it is done (``free_completed``).
    Returns (the highest allocated total, the blocks allocated then, the blocks freed but held back
    then)."""
    def replay(stop: int) -> tuple[int, int, dict[int, dict], dict[int, dict]]:
        live: dict[int, dict] = {}
        held: dict[int, dict] = {}
        total = peak = peak_at = 0
        for i, event in enumerate(trace[:stop]):
            action, addr = event["action"], event.get("addr")
            if action == "alloc":
                live[addr] = event
                total += event["size"]
                if total > peak:
                    peak, peak_at = total, i
            elif action == "free_requested" and addr in live:
                held[addr] = live.pop(addr)
                total -= held[addr]["size"]
            elif action == "free_completed":
                held.pop(addr, None)
        return peak, peak_at, live, held

    peak, peak_at, _, _ = replay(len(trace))
    _, _, live, held = replay(peak_at + 1)
    return peak, list(live.values()), list(held.values())


def where(event: dict, depth: int = 3) -> str:
    frames = [f for f in event.get("frames", []) if any(p in f["filename"] for p in PROJECT_FILES)]
    return " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames[:depth]) or "?"


def print_groups(blocks: list[dict], top: int) -> None:
    groups: dict[str, list[int]] = defaultdict(list)
    for block in blocks:
        groups[where(block)].append(block["size"])
    for site, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {sum(sizes) / MIB:9.1f} MiB  {len(sizes):4} × {max(sizes) / MIB:8.1f} MiB max  {site}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--tiles", type=int, default=1)
    ap.add_argument("--plain", type=int, default=0, help="last layers not checkpointed")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig

    from tinytune import adapters, loading, memsave, optim, presets
    from tinytune.config import GIB, TrainConfig
    from tinytune.memory.estimate import ModelShape, Setup, estimate

    device = torch.device("cpu" if args.smoke else "cuda")
    name, cfg_dict = presets.model_config(args.model)
    if args.smoke:
        cfg_dict = {**cfg_dict, **TINY}
        args.seq, args.rank = 64, 8
    shape = ModelShape.from_config(cfg_dict, name)
    setup = Setup(technique="lora", rank=args.rank, bits=4, micro_batch=1, seq_len=args.seq, device=device.type,
                  offload=args.offload, mlp_tiles=args.tiles, plain_layers=args.plain)
    est = estimate(shape, setup)
    tc = TrainConfig(technique="lora", rank=args.rank, alpha=2 * args.rank, bits=4, micro_batch=1, seq_len=args.seq)
    dtype = loading.compute_dtype(device)
    model = loading.build_random(AutoConfig.for_model(**cfg_dict), 4, device, dtype)
    memsave.embeddings_on_host(model, tc.technique)
    adapters.apply(model, tc, 100)
    memsave.checkpoint_layers(model, args.offload, args.plain)
    memsave.tile_mlp(model, args.tiles)
    model.train()
    optimizer = optim.make_optimizer(tc.optim, adapters.param_groups(model, tc), tc.lr, 0.0)
    ids = torch.randint(0, shape.vocab, (1, args.seq))
    batch = {"input_ids": ids, "labels": ids}

    step = functools.partial(train_step, model, optimizer, batch, device, dtype)
    step()
    if args.smoke:
        step()
        print("smoke: the step runs; the allocator history needs CUDA")
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=5_000_000)
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, blocks, held = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])

    print(f"{name}, LoRA r{args.rank}, 4-bit, {args.seq} tokens, offload {args.offload}, {args.tiles} tiles, "
          f"{args.plain} plain layers")
    print(f"measured max_memory_allocated {torch.cuda.max_memory_allocated() / GIB:.3f} GiB = baseline "
          f"{baseline / GIB:.3f} + {peak / GIB:.3f} allocated during the step (replayed)")
    print(f"estimated allocator peak {est.allocator_peak / GIB:.3f} GiB:")
    for key, value in est.components.items():
        print(f"  {key:32} {value / MIB:10.1f} MiB  {est.notes.get(key, '')[:90]}")
    print(f"\nlive at the peak, beyond the baseline ({len(blocks)} blocks), by where they were allocated:")
    print_groups(blocks, args.top)
    print(f"\nfreed but held back then by work queued on another stream (not in max_memory_allocated, "
          f"still unusable; {len(held)} blocks):")
    print_groups(held, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
