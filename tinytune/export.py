"""Merge an adapter into the weights it was trained against and write a plain HF model directory.

Merging is where quality is lost (a 4-bit base re-quantized after merging, or the adapter added to
the original 16-bit weights it never saw). Here every quantized layer is dequantized exactly as the
trainer saw it, the adapter's delta is added in fp32, and only then is the result cast to the export
dtype, so the merged model's logits match the adapter model's (tests/test_export.py states the
tolerances).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from tinytune import checkpoint, quant, rundir
from tinytune.config import TrainConfig
from tinytune.errors import UserError

EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


PEFT_TECHNIQUES = ("lora", "lora-plus", "lora-fa")  # plain LoRA weights; LoRA-FA's A is just frozen


def save_peft_adapter(path: Path, state: dict[str, torch.Tensor], cfg: TrainConfig, source) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as ``peft.PeftModel`` expects."""
    short = sorted({k.rsplit(".", 2)[-2] for k in state})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": source.path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": short, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
    }
    tensors = {f"base_model.model.{k}.weight": v for k, v in state.items()}
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        rundir.save_tensors(tmp / "adapter_model.safetensors", tensors)
        rundir.publish_mode(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.no_grad()
def merge_into_linears(model: nn.Module) -> int:
    """Replace every adapter layer and quantized linear by a plain fp32 ``nn.Linear``; returns how many."""
    from tinytune.adapters import AdapterLayer

    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer):
            weight, base = module.merged_weight(), module.base
        elif quant.is_quantized(module):
            weight, base = quant.dequantized_weight(module), module
        else:
            continue
        if not _still_attached(model, name, module):
            continue  # the base inside an adapter layer, already handled with it
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="cpu", dtype=torch.float32)
        linear.weight.copy_(weight.cpu())
        if base.bias is not None:
            linear.bias.copy_(base.bias.detach().float().cpu())
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, linear)
        replaced += 1
    return replaced


def _still_attached(model: nn.Module, name: str, module: nn.Module) -> bool:
    try:
        return model.get_submodule(name) is module
    except AttributeError:
        return False


def saved_step(path: Path) -> int | None:
    """The step an adapter file was saved at (its metadata); None if it does not say or is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # noqa: BLE001 - a damaged file: load_tensors reports it
        return None


def pick_adapter(run_dir: Path, step: int | None, say) -> Path:
    """The adapter file to export: checkpoint ``step`` if given; else RUN_DIR/adapter.safetensors (the
    trainer rewrites it after every checkpoint and at the end), or a newer checkpoint's where there
    is one (a kill between the two writes, or a run from before that)."""
    checkpoints = {checkpoint.step_of(p): p / "adapter.safetensors" for p in checkpoint.complete(run_dir)}
    if step is not None:
        if step not in checkpoints:
            kept = ", ".join(map(str, sorted(checkpoints))) or "none"
            raise UserError(f"--checkpoint {step}: {run_dir} has no checkpoint of step {step} (it keeps: {kept})")
        return checkpoints[step]
    final = run_dir / "adapter.safetensors"
    newest = max(checkpoints, default=None)
    saved = saved_step(final) if final.is_file() else None
    if newest is not None and (not final.is_file() or (saved is not None and saved < newest)):
        why = "a newer checkpoint than its final adapter" if final.is_file() else "no final adapter"
        say(f"{run_dir} has {why}: exporting the checkpoint of step {newest}")
        return checkpoints[newest]
    return final


def shard_size_bytes(text: str) -> int:
    """--max-shard-size in bytes: 200MB, 1.5GB (powers of 1000, as transformers reads them) or 2GiB."""
    m = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([KMGT])(i?)B\s*", text, re.IGNORECASE)
    size = float(m[1]) * (1024 if m[3] else 1000) ** ("KMGT".index(m[2].upper()) + 1) if m else 0
    if size < 1:
        raise UserError(f"--max-shard-size {text!r} is not a size: write it like 200MB, 2GB or 2GiB")
    return int(size)


def export(run_dir: Path, out: Path, dtype: str = "fp16", overwrite: bool = False, max_shard_size: str = "200MB",
           say=print, step: int | None = None) -> Path:
    """``step``: export that checkpoint (default: the run's newest weights, see ``pick_adapter``)."""
    from tinytune import adapters, loading

    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: not a tinytune run directory (no config.json); pass the --out of a training run")
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r} is unknown: choose fp16, bf16 or fp32")
    shard_bytes = shard_size_bytes(max_shard_size)
    cfg = TrainConfig.load(run_dir / "config.json")
    adapter_path = pick_adapter(run_dir, step, say)
    state = rundir.load_tensors(adapter_path)
    rundir.check_output(out, overwrite)
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else {}
    load_dtype = getattr(torch, plan.get("compute_dtype", "float32"))

    t0 = time.perf_counter()
    source = loading.resolve_source(cfg.model)
    tok = loading.load_tokenizer(source)
    # Re-quantize exactly as training did (same load dtype), on the CPU: the same NF4/int8 codes.
    model = loading.load_model(source, cfg.bits, torch.device("cpu"), dtype=load_dtype)
    adapters.apply(model, cfg, total_steps=int(plan.get("total_steps", 0)))
    try:
        adapters.load_state(model, state)
    except ValueError as e:
        raise UserError(f"{adapter_path}: {e}") from None
    n = merge_into_linears(model)
    model.to(EXPORT_DTYPES[dtype])
    model.config.use_cache = True

    created = next((p for p in reversed(out.parents) if not p.exists()), None)  # removed again on failure
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        model.save_pretrained(tmp, max_shard_size=shard_bytes)
        tok.save_pretrained(tmp)
        rundir.publish_mode(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException as e:
        for leftover in (tmp, created):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"--out {out}: cannot write the export ({e.strerror or e}); free space or choose another "
                            "directory") from None
        raise
    if cfg.technique == "full":
        what = "fully fine-tuned weights"
    else:
        base = f"{cfg.bits}-bit base dequantized" if cfg.bits < 16 else "16-bit base"
        what = f"merged {n} linear layers ({base} + {cfg.technique} delta, fp32 math)"
    say(f"{what} → {dtype} HF model at {out} in {time.perf_counter() - t0:.1f}s")
    return out
