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
a fresh process capped with ``torch.cuda.set_per_process_memory_fraction``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchkit import TINY, cap_cuda_memory, run_in_fresh_process, train_step  # noqa: E402



def build(stack: str, model: str, seq: int, smoke: bool, cap_gib: float, plain_layers: int | None = None,
          compile_layers: bool = True, dropout: float = 0.05):
    """(model, optimizer, step function) for one stack; the step returns the number of tokens."""
    import torch
    from transformers import AutoConfig

    from tinytune import adapters, fast, loading, memsave, planner, presets, train
    from tinytune.config import GIB, TrainConfig

    device = torch.device("cpu" if smoke else "cuda")
    name, cfg_dict = presets.model_config(model)
    if smoke:
        cfg_dict = {**cfg_dict, **TINY}
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
        optimizer = train.make_optimizer("paged-adamw-8bit", [{"params": [p for p in net.parameters() if p.requires_grad]}],
                                         2e-4, 0.0)

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
        if compile_layers and fast.can_compile(device):  # as the trainer does by default
            fast.compile_layers(net)
        net.train()
        optimizer = train.make_optimizer("paged-adamw-8bit", adapters.param_groups(net, cfg), 2e-4, 0.0)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

        def step() -> int:
            train_step(net, optimizer, batch, device, dtype)
            return seq
    return net, step


def run_one(spec: dict) -> dict:
    """One stack at one length in this process: peak allocated, tokens/s, or OOM."""
    import torch

    from tinytune.config import GIB

    smoke = spec.get("smoke", False)
    if not smoke and spec.get("cap"):
        cap_cuda_memory(spec["cap"])
    out = dict(spec)
    try:
        _, step = build(spec["stack"], spec["model"], spec["seq"], smoke, spec.get("cap") or spec.get("plan_cap", 12.0),
                        spec.get("plain_layers"), spec.get("compile", True), spec.get("dropout", 0.05))
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
        t0 = time.perf_counter()
        tokens = sum(step() for _ in range(spec.get("steps", 3)))
        if not smoke:
            torch.cuda.synchronize()
            out["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        out["tokens_per_s"] = round(tokens / (time.perf_counter() - t0), 1)
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
                    help="comma-separated; experiments: tinytune+nocompile, tinytune+plainN (the last N layers not "
                    "checkpointed instead of as planned), STACK+dropN (LoRA dropout N/100 instead of 0.05)")
    ap.add_argument("--cap", type=float, default=12.0, help="GiB for the max-context search (default 12)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
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
    rows = [{**spec_of(stack), "model": model, "smoke": args.smoke}
            for model in args.models.split(",") for stack in args.stacks.split(",")]
    for i, spec in enumerate(rows):  # one at a time: these are the timed runs
        if not args.no_speed:
            r = in_process({**spec, "seq": seq, "steps": 1 if args.smoke else args.steps, "plan_cap": args.cap,
                            "profile": args.profile and not args.smoke})
            r.pop("profile", None)
            rows[i] = r
            print(json.dumps(r), file=sys.stderr, flush=True)

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


def print_table(model: str, seq: int, cap: float, rows: list[dict], smoke: bool) -> None:
    print(f"\n{model}, LoRA r16 all-linear, NF4, batch 1, {seq} tokens" + (" (smoke: CPU, tiny shape)" if smoke else ""))
    print(f"{'stack':20} {'peak GiB':>9} {'tokens/s':>10} {'max context @ ' + format(cap, 'g') + ' GiB':>20}")
    for r in rows:
        status = f"CRASH {r['crash']}" if "crash" in r else "OOM" if r.get("oom") else ""
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "—"
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "—"
        print(f"{r['label']:20} {peak:>9} {tps:>10} {r.get('max_context', '—'):>20} {status}")
    base = rows[0]
    if smoke or "tokens_per_s" not in base:
        return
    for r in rows[1:]:
        if "tokens_per_s" in r:
            ctx = f", context {r['max_context'] / max(1, base['max_context']):.1f}×" if "max_context" in r else ""
            print(f"{r['label']}/{base['label']}: peak {r.get('peak_gib', 0) / max(1e-9, base.get('peak_gib', 1)):.2f}×, "
                  f"speed {r['tokens_per_s'] / base['tokens_per_s']:.2f}×{ctx}")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
