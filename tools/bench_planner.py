"""Planner accuracy on a CUDA GPU: predicted against measured peak memory, and plans that claim to fit.

    python tools/bench_planner.py [--only N] [--steps 2] [--json results.jsonl]
    python tools/bench_planner.py --smoke          # CPU: the same code path on a tiny shape

Part 1 runs a grid of fixed configurations (1B- and 8B-shaped random-init models built straight at
4/8/16 bits, several techniques, ranks and sequence lengths) and prints the estimator's predicted
allocator peak beside ``torch.cuda.max_memory_allocated`` after ``--steps`` optimizer steps.
Part 2 asks the planner for a plan under a budget, caps the process to that budget with
``torch.cuda.set_per_process_memory_fraction`` (less the CUDA context, which lies outside the
allocator) and runs the plan: a plan that claims to fit must not run out of memory.

Every configuration runs in its own process, so one OOM or one allocator state cannot leak into
the next. Targets: every prediction within ±10% of measured; zero OOMs among plans that fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchkit import TINY, cap_cuda_memory, run_in_fresh_process, train_step  # noqa: E402

GRID = [
    # model, bits, technique, rank, micro_batch, seq_len, gradient checkpointing
    ("llama-3.2-1b", 4, "lora", 16, 4, 512, True),
    ("llama-3.2-1b", 8, "lora", 16, 1, 2048, True),
    ("llama-3.2-1b", 16, "lora", 64, 1, 4096, True),
    ("llama-3.2-1b", 4, "lora-fa", 16, 1, 8192, True),
    ("llama-3.2-1b", 4, "vera", 256, 2, 2048, True),
    ("llama-3.2-1b", 16, "lora", 16, 2, 1024, False),
    ("llama-3.1-8b", 4, "lora", 16, 1, 512, True),
    ("llama-3.1-8b", 4, "lora", 16, 1, 2048, True),
    ("llama-3.1-8b", 4, "lora", 64, 1, 4096, True),
    ("llama-3.1-8b", 8, "lora", 16, 1, 1024, True),
    ("llama-3.1-8b", 16, "lora", 16, 1, 2048, True),
    ("llama-3.1-8b", 4, "lora-fa", 32, 1, 8192, True),
    ("llama-3.1-8b", 4, "vera", 256, 1, 2048, True),
    ("llama-3.1-8b", 4, "lora", 16, 2, 2048, True),
]
SWITCHES = [  # the memory switches: model, technique, rank, seq_len, offloaded checkpoints, MLP tiles, plain last layers
    ("llama-3.1-8b", "lora", 16, 8192, True, 4, 0),
    ("llama-3.1-8b", "lora", 16, 16384, True, 8, 0),
    ("llama-3.2-1b", "lora", 16, 16384, True, 8, 0),
    ("llama-3.1-8b", "lora", 16, 2048, False, 1, 9),
    ("llama-3.1-8b", "lora", 16, 32768, True, 16, 0),
]
PLANS = [  # model, budget GiB, seq_len
    ("llama-3.1-8b", 12, 2048), ("llama-3.1-8b", 12, 8192), ("llama-3.1-8b", 16, 4096),
    ("llama-3.2-1b", 12, 8192), ("llama-3.2-1b", 8, 2048), ("llama-3.2-3b", 12, 4096),
    ("llama-3.1-8b", 12, 16384),
]


def run_one(spec: dict) -> dict:
    """Build, adapt and train ``spec`` for a few steps in this process; report the measured peak."""
    import torch
    from transformers import AutoConfig

    from tinytune import adapters, loading, memsave, optim, presets
    from tinytune.config import GIB, TrainConfig
    from tinytune.errors import UserError
    from tinytune.memory.estimate import ModelShape, Setup, estimate

    smoke = spec.get("smoke", False)
    device = torch.device("cpu" if smoke else "cuda")
    name, cfg_dict = presets.model_config(spec["model"])
    if smoke:
        cfg_dict = {**cfg_dict, **TINY}
        # the tiny shape has 16-wide heads: clamp ranks so that every technique still applies
        spec = {**spec, "rank": min(spec["rank"], 64 if spec["technique"] == "vera" else 8)}
    config = AutoConfig.for_model(**cfg_dict)
    shape = ModelShape.from_config(cfg_dict, name)
    setup = Setup(technique=spec["technique"], rank=spec["rank"], bits=spec["bits"], micro_batch=spec["micro_batch"],
                  seq_len=spec["seq_len"], gradient_checkpointing=spec["ckpt"], device=device.type,
                  offload=spec.get("offload", False), mlp_tiles=spec.get("mlp_tiles", 1), plain_layers=spec.get("plain", 0))
    est = estimate(shape, setup)
    out = {**spec, "predicted_gib": round(est.allocator_peak / GIB, 3), "needed_gib": round(est.needed / GIB, 3)}
    if device.type == "cuda" and spec.get("budget_gib"):
        cap_cuda_memory(spec["budget_gib"])
    tc = TrainConfig(technique=spec["technique"], rank=spec["rank"], alpha=2 * spec["rank"], bits=spec["bits"],
                     micro_batch=spec["micro_batch"], seq_len=spec["seq_len"], gradient_checkpointing=spec["ckpt"])
    dtype = loading.compute_dtype(device)
    try:
        model = loading.build_random(config, tc.bits, device, dtype)
        memsave.embeddings_on_host(model, tc.technique)
        adapters.apply(model, tc, 100)
        if tc.gradient_checkpointing:
            memsave.checkpoint_layers(model, spec.get("offload", False), spec.get("plain", 0))
        memsave.tile_mlp(model, spec.get("mlp_tiles", 1))
        model.train()
        optimizer = optim.make_optimizer(tc.optim, adapters.param_groups(model, tc), tc.lr, 0.0)
        ids = torch.randint(0, shape.vocab, (tc.micro_batch, tc.seq_len))
        labels = ids.clone()
        if tc.micro_batch > 1:  # the last row half padding, as the trainer's batches are: no mask, labels ignored
            labels[-1, tc.seq_len // 2:] = -100
        batch = {"input_ids": ids, "labels": labels}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(spec.get("steps", 2)):
            train_step(model, optimizer, batch, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
            out["measured_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            out["reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
            out["error_pct"] = round(100 * (est.allocator_peak / GIB / out["measured_gib"] - 1), 1)
        out["oom"] = False
    except torch.OutOfMemoryError:
        out["oom"] = True
    except UserError as e:
        out["crash"] = str(e)
    return out


def plan_spec(model: str, budget_gib: int, seq_len: int, smoke: bool) -> dict:
    from tinytune import planner, presets
    from tinytune.config import GIB
    from tinytune.errors import UserError

    try:
        p = planner.make_plan(presets.model_shape(model), planner.Budget(budget_gib * GIB, "cuda", f"{budget_gib}GB"), seq_len)
    except UserError as e:
        return {"model": model, "budget_gib": budget_gib, "seq_len": seq_len, "refused": str(e)}
    s = p.chosen.setup
    return {"model": model, "bits": s.bits, "technique": s.technique, "rank": s.rank, "micro_batch": s.micro_batch,
            "seq_len": seq_len, "ckpt": s.gradient_checkpointing, "offload": s.offload, "mlp_tiles": s.mlp_tiles,
            "plain": s.plain_layers if not smoke else min(s.plain_layers, 1),
            "budget_gib": budget_gib, "smoke": smoke}


def run_spec(spec: dict) -> dict:
    if "refused" in spec:
        return spec
    return run_in_fresh_process(__file__, spec)


def print_row(res: dict) -> None:
    if "refused" in res:
        print(f"{'plan':5} {res['model']:13} refused at {res['budget_gib']} GiB, {res['seq_len']} tokens: {res['refused']}")
        return
    measured = res.get("measured_gib")
    outcome = "CRASH " + res["crash"] if "crash" in res else "OOM" if res.get("oom") else "ok"
    print(f"{res['part']:5} {res['model']:13} {res['bits']:>4} {res['technique']:9} {res['rank']:>4} "
          f"{str(res['micro_batch']) + '×' + str(res['seq_len']):>9} {ckpt_label(res):>9} "
          f"{str(res.get('budget_gib') or '—'):>6} {res.get('predicted_gib', 0):>9.2f} "
          f"{(f'{measured:.2f}' if measured is not None else '—'):>9} "
          f"{(str(res['error_pct']) + '%') if 'error_pct' in res else '—':>7}  {outcome}", flush=True)


def ckpt_label(spec: dict) -> str:
    if not spec["ckpt"]:
        return "no"
    return ("yes" + ("+off" if spec.get("offload") else "") + (f"+t{spec['mlp_tiles']}" if spec.get("mlp_tiles", 1) > 1 else "")
            + (f"+p{spec['plain']}" if spec.get("plain") else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--only", type=int, help="run only this grid row (1-based)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the code path, measures nothing")
    ap.add_argument("--json", help="also write every result as a JSON line to this file")
    ap.add_argument("--parts", default="grid,switches,plan", help="which parts to run (default all three)")
    ap.add_argument("--bits", type=int, help="only grid rows at these bits")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (each measures its own peak; default 1)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0

    specs = []
    for i, (model, bits, technique, rank, mb, seq, ckpt) in enumerate(GRID, 1):
        if (args.only and i != args.only) or "grid" not in args.parts or (args.bits and bits != args.bits):
            continue
        specs.append({"part": "grid", "model": model, "bits": bits, "technique": technique, "rank": rank,
                      "micro_batch": mb, "seq_len": seq if not args.smoke else 64, "ckpt": ckpt, "steps": args.steps,
                      "smoke": args.smoke})
    for model, technique, rank, seq, offload, tiles, plain in SWITCHES if not args.only and "switches" in args.parts else []:
        specs.append({"part": "grid", "model": model, "bits": 4, "technique": technique, "rank": rank, "micro_batch": 1,
                      "seq_len": seq if not args.smoke else 64, "ckpt": True, "offload": offload,
                      "mlp_tiles": tiles if not args.smoke else 2, "plain": plain if not args.smoke else min(plain, 1),
                      "steps": args.steps, "smoke": args.smoke})
    if not args.only and "plan" in args.parts:
        for model, budget, seq in PLANS:
            spec = plan_spec(model, budget, seq, args.smoke)
            spec.update(part="plan", steps=args.steps)
            if args.smoke and "refused" not in spec:
                spec["seq_len"] = 64
            specs.append(spec)

    results = []
    print(f"{'part':5} {'model':13} {'bits':>4} {'technique':9} {'r':>4} {'mb×seq':>9} {'ckpt':>9} {'budget':>6} "
          f"{'predicted':>9} {'measured':>9} {'error':>7}  result")
    with ThreadPoolExecutor(args.jobs) as pool:  # memory only: runs may share the GPU
        for res in pool.map(run_spec, specs):
            print_row(res)
            results.append(res)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in results))
    errors = [abs(r["error_pct"]) for r in results if "error_pct" in r]
    ooms = [r for r in results if r.get("part") == "plan" and r.get("oom")]
    if errors:
        print(f"\nworst prediction error {max(errors):.1f}% over {len(errors)} runs "
              f"({sum(e <= 10 for e in errors)} within ±10%); plans that claimed to fit and ran out of memory: {len(ooms)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
