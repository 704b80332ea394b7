"""Budget + model shape → plan: technique, rank, bits, micro-batch, sequence length, accumulation.

``describe`` records the plan a run uses in ``plan.json``; every figure says what it counts.
"""

from __future__ import annotations

import torch

from tinytune.config import GIB, TrainConfig


def describe(cfg: TrainConfig, model_config, device: torch.device, dtype: torch.dtype, n_trainable: int,
             total_steps: int, source) -> dict:
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * cfg.seq_len
    return {
        "technique": cfg.technique,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "bits": cfg.bits,
        "micro_batch": cfg.micro_batch,
        "seq_len": cfg.seq_len,
        "grad_accum": cfg.grad_accum,
        "effective_batch": cfg.micro_batch * cfg.grad_accum,
        "max_tokens_per_step": tokens_per_step,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "optim": cfg.optim,
        "total_steps": total_steps,
        "trainable_params": n_trainable,
        "device": device.type,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "budget_gib": round(cfg.vram / GIB, 3) if cfg.vram else None,
        "model": {"name": source.name, "kind": source.kind, "model_type": model_config.model_type,
                  "layers": model_config.num_hidden_layers, "hidden": model_config.hidden_size,
                  "vocab": model_config.vocab_size},
    }
