"""Run every technique on the same model, data and steps, and print one table.

    python tools/compare_techniques.py [--steps 10] [--model M] [--data FILE] [--device cpu|cuda]

Columns: trainable parameters; activation bytes autograd saves per token for one micro-batch
(gradient checkpointing off, so the figure shows what each technique's layers keep); peak GPU
memory (max_memory_allocated) or, on a CPU, peak process RSS; mean step time after the first step;
eval loss before and after. Defaults: the embedded SmolLM2-135M-Instruct and the demo data, 4-bit
base for adapters, 16-bit for full fine-tuning.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinytune import adapters, data, loading, train  # noqa: E402
from tinytune.config import TrainConfig  # noqa: E402
from tinytune.memory import probe  # noqa: E402

TECHNIQUES = ["lora", "lora-fa", "vera", "delta-lora", "lora-plus", "full"]


def saved_bytes_per_token(cfg: TrainConfig, device: torch.device) -> float:
    source = loading.resolve_source(cfg.model)
    tok = loading.load_tokenizer(source)
    ds = data.build(Path(cfg.data) if cfg.data else data.demo_path(), tok, cfg.seq_len, 0.0, False, cfg.seed)
    model = loading.load_model(source, cfg.bits, device)
    adapters.apply(model, cfg, cfg.max_steps or 0)
    model.train()
    examples = ds.train[: cfg.micro_batch]
    batch = data.collate(examples, tok.pad_token_id)
    dtype = loading.compute_dtype(device)

    def step():
        loss, n = train.forward_loss(model, batch, device, dtype)
        (loss / n).backward()

    saved = probe.saved_activation_bytes(model, step)
    return saved / sum(len(e.input_ids) for e in examples)  # per real token (not padding)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--vera-rank", type=int, default=256)
    ap.add_argument("--techniques", default=",".join(TECHNIQUES))
    args = ap.parse_args()
    device = loading.pick_device(args.device)
    rows = []
    for technique in args.techniques.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rank = args.vera_rank if technique == "vera" else args.rank
            lr = {"vera": 4e-3, "full": 2e-5}.get(technique, 2e-4)
            cfg = TrainConfig(model=args.model, data=args.data, out=str(Path(tmp) / "run"), technique=technique,
                              rank=rank, alpha=2.0 * rank, lr=lr, max_steps=args.steps, sample=False,
                              device=args.device, dropout=0.0, delta_start=max(1, args.steps // 5))
            per_token = saved_bytes_per_token(cfg, device)
            gc.collect()
            records: list[dict] = []
            rss_peak = [psutil.Process().memory_info().rss]

            def listen(record: dict) -> None:
                records.append(record)
                rss_peak[0] = max(rss_peak[0], psutil.Process().memory_info().rss)

            if device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            train.run(cfg, listener=listen, stream=io.StringIO())
            steps = [r for r in records if "loss" in r]
            evals = [r["eval_loss"] for r in records if "eval_loss" in r]
            peak = steps[-1].get("mem_peak_gib") if device.type == "cuda" else rss_peak[0] / 2**30
            rows.append({
                "technique": technique, "bits": cfg.bits, "rank": rank if technique != "full" else "-",
                "per_token": per_token, "peak": peak,
                "step_s": sum(r["step_time_s"] for r in steps[1:]) / max(1, len(steps) - 1),
                "eval_before": evals[0], "eval_after": evals[-1], "wall_s": time.perf_counter() - t0,
                "params": json.loads((Path(tmp) / "run" / "plan.json").read_text())["trainable_params"],
            })
            print(f"{technique}: done in {rows[-1]['wall_s']:.0f}s", file=sys.stderr, flush=True)
            gc.collect()
    mem = "peak GPU alloc GiB" if device.type == "cuda" else "peak RSS GiB"
    print(f"\n{args.steps} steps, micro-batch 4 × accumulation 2, demo data, {probe.describe(device)}\n")
    print(f"| technique | bits | rank | trainable params | saved activations / token | {mem} | step time s | eval loss before → after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['technique']} | {r['bits']} | {r['rank']} | {r['params']:,} | {r['per_token'] / 1024:.1f} KiB | "
              f"{r['peak']:.2f} | {r['step_s']:.2f} | {r['eval_before']:.3f} → {r['eval_after']:.3f} |")


if __name__ == "__main__":
    main()
