"""tinytune against the standard QLoRA recipe (transformers + PEFT), same model, side by side.

    python tools/bench_vs_peft.py [--model llama-3.1-8b] [--cap 12] [--seq 2048] [--steps 4]
    python tools/bench_vs_peft.py --smoke       # CPU, tiny shape: checks the code path, measures nothing

Both stacks get the same random-init model built straight into NF4 + double quantization (no 16-bit
copy, no weights on disk), LoRA r16 on every linear layer, dropout 0.05, batch 1, paged AdamW 8-bit.
The recipe is ``prepare_model_for_kbit_training`` + ``get_peft_model`` with the model's own loss and
gradient checkpointing; tinytune is its planner's plan for the sequence under ``--cap`` (chunked
loss, no fp32 upcast of embeddings/norms/head, checkpointing with as many plain last layers as the
cap leaves room for, offloaded checkpoints with a tiled MLP where the plan needs them).
``tinytune+plain0`` checkpoints every layer: the least memory, slower.

Printed per stack: peak allocated GiB and tokens/s at ``--seq`` (uncapped, planned for the cap), and the longest context
(batch 1) that runs under ``--cap`` GiB, found by doubling then bisecting to 512 tokens, each try in
a fresh process capped with ``torch.cuda.set_per_process_memory_fraction``. Speed is timed in
``--rounds`` rounds, the stacks taking turns in each (a fresh process per run, tokens/s from the
median of its steps): a row shows the median over the rounds and their range, a ratio the median of
the rounds' own ratios and their range — runs on one machine drift more than the stacks differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchkit import TINY, cap_cuda_memory, run_in_fresh_process, train_step  # noqa: E402



def build(stack: str, model: str, seq: int, smoke: bool, cap_gib: float, plain_layers: int | None = None,
          compile_layers: bool = True, dropout: float = 0.05, flat: bool = True, layers: int | None = None,
          traced_4bit: bool = True):
    """(model, step function) for one stack; the step returns the number of tokens. ``smoke``: the
    tiny shape on the CPU, with ``layers`` decoder layers if given (and compiled there too)."""
    import torch
    from transformers import AutoConfig

    from tinytune import adapters, fast, loading, memsave, optim, planner, presets, train
    from tinytune.config import GIB, TrainConfig

    device = torch.device("cpu" if smoke else "cuda")
    name, cfg_dict = presets.model_config(model)
    if smoke:
        cfg_dict = {**cfg_dict, **TINY, **({"num_hidden_layers": layers} if layers else {})}
    config = AutoConfig.for_model(**cfg_dict)
    dtype = loading.compute_dtype(device)
    net = loading.build_random(config, 4, device, dtype)
    ids = torch.randint(0, config.vocab_size, (1, seq), device=device)
    if stack == "peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        net.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets: the recipe upcasts
        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=True)
        net = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
        net.train()  # what Trainer does; checkpointing only acts in training mode
        optimizer = optim.make_optimizer("paged-adamw-8bit", [{"params": [p for p in net.parameters() if p.requires_grad]}],
                                         2e-4, 0.0, flat=False)  # the recipe: bitsandbytes' optimizer as it is

        def step() -> int:
            with train.autocast_for(device, dtype):
                loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return seq
    else:
        cfg = TrainConfig(technique="lora", rank=16, alpha=32, dropout=dropout, bits=4, micro_batch=1, grad_accum=1,
                          seq_len=seq)
        shape = presets.model_shape(model) if not smoke else None
        if shape is not None:  # the planner's switches for this length (technique, rank, bits, batch pinned)
            budget = planner.Budget(int(cap_gib * GIB), "cuda", f"{cap_gib:g} GiB cap")
            fixed = planner.Fixed(technique="lora", rank=16, bits=4, micro_batch=1, grad_accum=1,
                                  gradient_checkpointing=True, plain_layers=plain_layers)
            try:
                planner.apply(planner.make_plan(shape, budget, seq, fixed), cfg, set(planner.PLANNED) - {"plain_layers"})
            except Exception:  # noqa: BLE001 - nothing fits by the estimate: try it anyway, as planned for the cap
                cfg.offload_checkpoints, cfg.mlp_tiles = True, max(1, seq // planner.OFFLOAD_TILE_TOKENS)
        memsave.embeddings_on_host(net, cfg.technique)
        adapters.apply(net, cfg, 100)
        if plain_layers is not None:  # experiment: as pinned, whatever the plan says
            cfg.plain_layers = plain_layers
        memsave.checkpoint_layers(net, cfg.offload_checkpoints, cfg.plain_layers)
        memsave.tile_mlp(net, cfg.mlp_tiles)
        if compile_layers and (fast.can_compile(device) or layers):  # as the trainer does by default on CUDA
            fast.compile_layers(net, traced_4bit=traced_4bit)
        net.train()
        optimizer = optim.make_optimizer("paged-adamw-8bit", adapters.param_groups(net, cfg), 2e-4, 0.0, flat=flat)
        batch = {"input_ids": ids, "labels": ids}

        def step() -> int:
            train_step(net, optimizer, batch, device, dtype)
            return seq
    return net, step


def run_one(spec: dict) -> dict:
    """One stack at one length in this process: peak allocated, each timed step's seconds and tokens/s
    from their median, or OOM."""
    import torch

    from tinytune.config import GIB

    smoke = spec.get("smoke", False)
    if not smoke and spec.get("cap"):
        cap_cuda_memory(spec["cap"])
    out = dict(spec)
    try:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        _, step = build(spec["stack"], spec["model"], spec["seq"], smoke, spec.get("cap") or spec.get("plan_cap", 12.0),
                        spec.get("plain_layers"), spec.get("compile", True), spec.get("dropout", 0.05),
                        spec.get("flat", True), spec.get("layers"), spec.get("traced_4bit", True))
        if spec.get("warmup", True):
            step()  # warm-up (allocator, autotuning)
            if spec["stack"] == "tinytune" and spec.get("compile", True):
                step()  # a second shape-specialized graph may follow the first
        if not smoke:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if spec.get("profile"):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            for key in ("cuda_time_total", "self_cpu_time_total"):  # where the GPU's time goes, and the CPU's
                print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70), file=sys.stderr)
        times = []
        for _ in range(spec.get("steps", 3)):
            t0 = time.perf_counter()
            tokens = step()
            if not smoke:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if not smoke:
            out["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        out["step_s"] = [round(t, 4) for t in times]
        out["tokens_per_s"] = round(tokens / statistics.median(times), 1)
        out["oom"] = False
    except torch.OutOfMemoryError:
        out["oom"] = True
    return out


def spec_of(stack: str) -> dict:
    """'peft', 'tinytune', and experiments: 'tinytune+nocompile', 'tinytune+plain8' (the last 8 layers not
    checkpointed, instead of as many as the plan finds room for; plain0 checkpoints all)."""
    name, *parts = stack.split("+")
    spec = {"stack": name, "label": stack}
    for part in parts:
        if part == "nocompile":
            spec["compile"] = False
        elif part == "pertensor":  # bitsandbytes' optimizer over each tensor, not over flat groups
            spec["flat"] = False
        elif part == "bnb4":  # compiled layers call bitsandbytes' 4-bit operators, not tensor operations
            spec["traced_4bit"] = False
        elif part.startswith("drop") and part[4:].isdigit():  # drop0: no LoRA dropout, drop10: 0.10
            spec["dropout"] = int(part[4:]) / 100
        elif part.startswith("plain") and part[5:].isdigit():
            spec["plain_layers"] = int(part[5:])
        else:
            raise SystemExit(f"unknown stack variant {part!r} in {stack!r}")
    return spec


def in_process(spec: dict) -> dict:
    return run_in_fresh_process(__file__, spec, echo_stderr=spec.get("profile", False))


def predicted_context(model: str, cap: float, limit: int) -> int:
    """The longest context (multiple of 1,024) the planner says fits under ``cap`` with LoRA r16 on 4 bits."""
    from tinytune import planner, presets
    from tinytune.config import GIB
    from tinytune.errors import UserError

    shape = presets.model_shape(model)
    budget = planner.Budget(int(cap * GIB), "cuda", f"{cap:g} GiB cap")
    fixed = planner.Fixed(technique="lora", rank=16, bits=4, micro_batch=1, grad_accum=1)
    lo, hi = 1024, limit
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        try:
            planner.make_plan(shape, budget, mid, fixed)
            lo = mid
        except UserError:
            hi = mid
    return lo


def max_context(spec: dict, cap: float, start: int, limit: int) -> int:
    """The longest context that runs one step under the cap, to within 1/8 (at least 512 tokens).

    Steps up (or down) by a quarter from ``start``, then bisects; every try is a fresh process.
    """
    def fits(seq: int) -> bool:
        r = in_process({**spec, "seq": seq, "cap": cap, "steps": 1, "warmup": False})
        ok = not r.get("oom") and "crash" not in r
        print(f"  {spec['label']} {seq} tokens under {cap:g} GiB: {'fits' if ok else r.get('crash', 'OOM')}",
              file=sys.stderr, flush=True)
        return ok

    lo, hi = 0, start
    if fits(start):
        while True:
            lo, hi = hi, min(max(hi + 512, hi * 5 // 4 // 512 * 512), limit)
            if lo >= limit or not fits(hi):
                break
        if lo >= limit:
            return lo
    else:
        while hi > 512:
            lo = hi * 4 // 5 // 512 * 512 or hi // 2
            if fits(lo):
                break
            hi, lo = lo, 0
        else:
            return 0
    while hi - lo > max(512, lo // 8):
        mid = (lo + hi) // 2 // 512 * 512
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="llama-3.1-8b,llama-3.2-1b", help="model presets, comma-separated")
    ap.add_argument("--stacks", default="peft,tinytune",
                    help="comma-separated; experiments: tinytune+nocompile, tinytune+pertensor (the optimizer over "
                    "each tensor), tinytune+bnb4 (compiled layers call bitsandbytes' 4-bit operators), tinytune+plainN (the last N layers not checkpointed instead of as planned), "
                    "STACK+dropN (LoRA dropout N/100 instead of 0.05)")
    ap.add_argument("--cap", type=float, default=12.0, help="GiB for the max-context search (default 12)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (tokens/s from their median)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per stack, the stacks taking turns in "
                    "each round (tokens/s: the median over rounds; ratios: the median of each round's ratio)")
    ap.add_argument("--max-context-limit", type=int, default=65536)
    ap.add_argument("--no-context", action="store_true", help="skip the max-context search")
    ap.add_argument("--no-speed", action="store_true", help="skip the timed runs (only the max-context search)")
    ap.add_argument("--context-start", type=int, help="first length the max-context search tries "
                    "(default: --seq for the recipe, the planner's prediction for tinytune)")
    ap.add_argument("--context-jobs", type=int, default=1,
                    help="max-context searches run side by side (they measure memory only; default 1)")
    ap.add_argument("--profile", action="store_true", help="print a kernel profile of one step per stack")
    ap.add_argument("--json", help="also write the rows as JSON lines to this file")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the code path, measures nothing")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    seq = 64 if args.smoke else args.seq
    limit = 1024 if args.smoke else args.max_context_limit
    rows = [{**spec_of(stack), "model": model, "smoke": args.smoke, "seq": seq,
             "steps": 1 if args.smoke else args.steps, "plan_cap": args.cap}
            for model in args.models.split(",") for stack in args.stacks.split(",")]
    rows = timed_rounds(rows, 0 if args.no_speed else 1 if args.smoke else max(1, args.rounds),
                        lambda round_: {"profile": args.profile and not args.smoke and round_ == 0})

    def search(spec: dict) -> int:
        if args.context_start:
            return max_context(spec, args.cap, args.context_start, limit)
        start = seq if spec["stack"] == "peft" or args.smoke else predicted_context(spec["model"], args.cap, limit)
        return max_context(spec, args.cap, start, limit)

    if not args.no_context:  # memory only, so the searches may share the GPU
        with ThreadPoolExecutor(args.context_jobs) as pool:
            for r, found in zip(rows, pool.map(search, [{k: r[k] for k in ("stack", "label", "model", "smoke", "compile",
                                                                         "plain_layers", "dropout") if k in r} for r in rows])):
                r["max_context"] = found
    for model in args.models.split(","):
        print_table(model, seq, args.cap, [r for r in rows if r["model"] == model], args.smoke)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


def timed_rounds(rows: list[dict], rounds: int, per_round=lambda round_: {}) -> list[dict]:
    """Run every row's spec once per round in a fresh process, one at a time and the rows taking
    turns (``per_round`` adds fields for a round); each row merged over its rounds."""
    runs: list[list[dict]] = [[] for _ in rows]
    for round_ in range(rounds):
        for i, spec in enumerate(rows):
            r = in_process({**spec, **per_round(round_)})
            r.pop("profile", None)
            runs[i].append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    return [merge_rounds(spec, timed) for spec, timed in zip(rows, runs)]


def merge_rounds(spec: dict, timed: list[dict]) -> dict:
    """One row from a stack's timed runs: the first run's fields, tokens/s as the median over the runs
    that completed and their range, each run's tokens/s (None where it ran out of memory or crashed)."""
    if not timed:
        return spec
    row = dict(timed[0])
    speeds = [r.get("tokens_per_s") if not r.get("oom") and "crash" not in r else None for r in timed]
    done = [v for v in speeds if v is not None]
    row["rounds"] = speeds
    if done:
        row.pop("crash", None)
        row.update(oom=False, tokens_per_s=statistics.median(done), tokens_per_s_range=[min(done), max(done)])
    return row


def speed_ratio(row: dict, base: dict) -> tuple[float, float, float] | None:
    """(median, lowest, highest) over the rounds of row's tokens/s over base's in the same round."""
    pairs = [(a, b) for a, b in zip(row.get("rounds", []), base.get("rounds", [])) if a and b]
    if not pairs:
        return None
    ratios = [a / b for a, b in pairs]
    return statistics.median(ratios), min(ratios), max(ratios)


def print_table(model: str, seq: int, cap: float, rows: list[dict], smoke: bool) -> None:
    print(f"\n{model}, LoRA r16 all-linear, NF4, batch 1, {seq} tokens" + (" (smoke: CPU, tiny shape)" if smoke else ""))
    print(f"{'stack':20} {'peak GiB':>9} {'tokens/s':>10} {'(range over rounds)':>21} "
          f"{'max context @ ' + format(cap, 'g') + ' GiB':>20}")
    for r in rows:
        status = f"CRASH {r['crash']}" if "crash" in r else "OOM" if r.get("oom") else ""
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "—"
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "—"
        lo_hi = r.get("tokens_per_s_range")
        spread = f"({lo_hi[0]:.0f}–{lo_hi[1]:.0f})" if lo_hi and len(r.get("rounds", [])) > 1 else ""
        print(f"{r['label']:20} {peak:>9} {tps:>10} {spread:>21} {r.get('max_context', '—'):>20} {status}")
    base = rows[0]
    if smoke:
        return
    for r in rows[1:]:
        ratio = speed_ratio(r, base)
        peak = f"peak {r['peak_gib'] / base['peak_gib']:.2f}×" if r.get("peak_gib") and base.get("peak_gib") else ""
        speed = (f"speed {ratio[0]:.2f}× (rounds {ratio[1]:.2f}–{ratio[2]:.2f}×)" if ratio else "")
        ctx = (f"context {r['max_context'] / base['max_context']:.1f}×"
               if r.get("max_context") and base.get("max_context") else "")
        if peak or speed or ctx:
            print(f"{r['label']}/{base['label']}: " + ", ".join(x for x in (peak, speed, ctx) if x))
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
