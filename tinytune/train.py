"""The training loop, top to bottom: load → adapt → plan → train → save.

Every optimizer step emits one metric record (to metrics.jsonl and to any listener such as the TUI);
nothing else about the loop is visible outside it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import warnings
import time
from pathlib import Path
from typing import Callable

import torch

from tinytune import adapters, data, loading, planner, rundir
from tinytune.config import CPU_DEFAULT_STEPS, DEFAULT_EPOCHS, GIB, TrainConfig
from tinytune.errors import UserError
from tinytune.export import PEFT_TECHNIQUES, save_peft_adapter
from tinytune.loss import causal_lm_loss_sum
from tinytune.memory import probe
from tinytune.memory.estimate import ModelShape
from tinytune.progress import ProgressBar

Listener = Callable[[dict], None]


def make_optimizer(name: str, params: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``params`` are parameter groups (LoRA+ gives B its own learning rate)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    # On a CPU bitsandbytes falls back to unpaged state (it says so on every parameter); same math.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    cls = {"paged-adamw-8bit": bnb.optim.PagedAdamW8bit, "paged-adamw-32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def make_schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak rate, then cosine decay to 10% of it."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_for(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def forward_loss(model, batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Summed token loss of one micro-batch and its number of predicted tokens."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast_for(device, dtype):
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        softcap = getattr(model.config, "final_logit_softcapping", None)
        return causal_lm_loss_sum(model.get_output_embeddings(), hidden, batch["labels"], softcap=softcap)


@torch.no_grad()
def evaluate(model, examples: list[data.Example], micro_batch: int, pad_id: int, device, dtype) -> float | None:
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), micro_batch):
        loss_sum, n = forward_loss(model, data.collate(examples[i : i + micro_batch], pad_id), device, dtype)
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def generate_sample(model, tok, messages: list[dict], device, dtype, max_new_tokens: int = 48) -> str:
    was_training = model.training
    model.eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(device) for k, v in ids.items()}
    with autocast_for(device, dtype):
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id)
    model.train(was_training)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class StopFlag:
    """Set by SIGINT/SIGTERM (or a UI) so the loop ends after the current step and saves."""

    def __init__(self) -> None:
        self.stop = False
        self.reason = ""

    def request(self, reason: str) -> None:
        self.stop, self.reason = True, reason

    @contextlib.contextmanager
    def on_signals(self):
        previous = {}

        def handler(signum, _frame):
            self.request(signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)


def planned_steps(cfg: TrainConfig, per_epoch: int, device: torch.device, say) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    epochs = cfg.epochs or DEFAULT_EPOCHS
    steps = max(1, math.ceil(epochs * per_epoch / cfg.grad_accum))
    if cfg.epochs is None and device.type == "cpu" and steps > CPU_DEFAULT_STEPS:
        say(f"CPU run: {CPU_DEFAULT_STEPS} of {steps} steps ({epochs:g} epochs) by default; "
            "pass --epochs or --max-steps to train longer")
        return CPU_DEFAULT_STEPS
    return steps


def calibrate(model, shape, plan, cfg: TrainConfig, pinned: set[str], device, dtype, say):
    """Measure one micro-step at a short length on the GPU and correct the plan's activation figures.

    The measured growth of allocated memory over the weights is compared with the estimate at the
    same shape; if activations came out larger, the plan is remade with them scaled (the base
    precision, technique and rank stay: the model is already loaded).
    """
    short = min(cfg.seq_len, 256)
    ids = torch.randint(0, shape.vocab, (cfg.micro_batch, short), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss_sum, n = forward_loss(model, batch, device, dtype)
    (loss_sum / max(1, n)).backward()
    torch.cuda.synchronize(device)
    measured = torch.cuda.max_memory_allocated(device) - base
    model.zero_grad(set_to_none=True)
    small = planner.estimate_for(shape, cfg, "cuda", seq_len=short)
    scale = planner.calibration_scale(small, measured)
    say(f"calibration: {cfg.micro_batch}×{short} tokens grew allocated memory by {measured / GIB:.3f} GiB "
        f"(estimate {planner.dynamic_bytes(small) / GIB:.3f}); activation scale {scale:.2f}")
    if scale <= 1.0:
        return plan
    keep = pinned | {"technique", "bits", "rank"}
    new = planner.make_plan(shape, plan.budget, cfg.seq_len, planner.fixed_from_config(cfg, keep), activation_scale=scale)
    planner.apply(new, cfg, keep)
    return new


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works with frozen inputs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def run(cfg: TrainConfig, listener: Listener | None = None, stop: StopFlag | None = None, stream=None) -> Path:
    """Train one adapter as ``cfg`` says; returns the run directory."""
    say = (lambda text: print(text, file=stream, flush=True)) if stream is not None else (lambda text: print(text, flush=True))
    emit = listener or (lambda _record: None)
    stop = stop or StopFlag()

    # 1. Check every input before anything is written.
    source = loading.resolve_source(cfg.model)
    model_config = loading.load_config(source)
    shape = ModelShape.from_config(model_config, source.name)
    data_path = Path(cfg.data) if cfg.data else data.demo_path()
    out = Path(cfg.out) if cfg.out else rundir.default_path(source.name)
    rundir.check_output(out, cfg.overwrite)
    device = loading.pick_device(cfg.device)
    dtype = loading.compute_dtype(device)
    budget = planner.resolve_budget(cfg.vram, cfg.gpu, device.type, f"{cfg.vram / GIB:g}GiB" if cfg.vram else None)
    pinned = set(planner.PLANNED if cfg.fixed is None else cfg.fixed)
    if "seq_len" not in pinned:  # plan for the longest example, up to 2,048 tokens
        cfg.seq_len = min(planner.DEFAULT_SEQ_CAP, shape.max_context or planner.DEFAULT_SEQ_CAP)
    if shape.max_context and cfg.seq_len > shape.max_context:
        raise UserError(f"--seq-len {cfg.seq_len} is beyond {shape.name}'s context of {shape.max_context} tokens; "
                        f"use --seq-len {shape.max_context} or less")
    tok = loading.load_tokenizer(source)
    ds = data.build(data_path, tok, cfg.seq_len, cfg.eval_fraction, cfg.train_on_prompt, cfg.seed)
    if "seq_len" not in pinned:
        cfg.seq_len = max(len(e.input_ids) for e in ds.train + ds.eval)
    say(f"data: {data_path.name} ({ds.format}, {ds.n_records} records) → {len(ds.train)} train / {len(ds.eval)} eval examples; "
        f"{ds.n_truncated} truncated to {cfg.seq_len} tokens, {ds.n_dropped} dropped (nothing left to learn)")
    plan = None
    if budget is not None:
        plan = planner.make_plan(shape, budget, cfg.seq_len, planner.fixed_from_config(cfg, pinned))
        planner.apply(plan, cfg, pinned)
        say(f"plan: {plan.chosen.label()}, micro-batch {cfg.micro_batch} × {cfg.grad_accum}, "
            f"{'gradient checkpointing' if cfg.gradient_checkpointing else 'no gradient checkpointing'}; predicted peak "
            f"{plan.chosen.est.peak / GIB:.2f} GiB, need {plan.chosen.est.needed / GIB:.2f} of {budget.bytes / GIB:.2f} GiB "
            f"({budget.source}{'; CPU run: fp32 activations' if device.type == 'cpu' else ''})")

    # 2. Load, adapt, plan.
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model = loading.load_model(source, cfg.bits, device)
    per_epoch = data.micro_batches_per_epoch(len(ds.train), cfg.micro_batch)
    total_steps = planned_steps(cfg, per_epoch, device, say)
    layers = adapters.apply(model, cfg, total_steps)
    params = adapters.trainable(model)
    n_trainable = sum(p.numel() for p in params)
    if plan is not None and device.type == "cuda":
        plan = calibrate(model, shape, plan, cfg, pinned, device, dtype, say)
    record = planner.describe(cfg, model_config, device, dtype, n_trainable, total_steps, source)
    record.update(planner.predicted(shape, cfg, device.type, plan))
    if cfg.technique == "delta-lora":
        record["delta_start"] = adapters.delta_start(cfg, total_steps)
    say(f"model: {source.name} ({source.kind}) at {cfg.bits}-bit on {probe.describe(device)}, loaded in "
        f"{time.perf_counter() - t0:.1f}s; "
        f"{'full fine-tuning' if cfg.technique == 'full' else f'{cfg.technique} r={cfg.rank} on {len(layers)} layers'}, "
        f"{n_trainable:,} trainable parameters; {total_steps} steps")

    rundir.create(out, cfg.overwrite)
    cfg.save(out / "config.json")
    rundir.write_json(out / "plan.json", record)
    metrics = rundir.MetricsWriter(out / "metrics.jsonl")

    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = make_optimizer(cfg.optim, adapters.param_groups(model, cfg), cfg.lr, cfg.weight_decay)
    schedule = make_schedule(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)
    eval_every = cfg.eval_every or max(1, total_steps // 4)

    before = None
    if cfg.sample and ds.sample_prompt:
        before = generate_sample(model, tok, ds.sample_prompt, device, dtype)
    eval_loss = evaluate(model, ds.eval, cfg.micro_batch, tok.pad_token_id, device, dtype)
    if eval_loss is not None:
        record = {"step": 0, "eval_loss": round(eval_loss, 6)}
        metrics.write(record)
        emit(record)
        say(f"eval loss before training: {eval_loss:.4f}")

    # 3. The loop.
    bar = ProgressBar(total_steps, stream=stream)
    stream_of_batches = data.micro_batches(ds.train, cfg.micro_batch, cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step = 0
    with stop.on_signals():
        for step in range(1, total_steps + 1):
            step_start = time.perf_counter()
            batches = [data.collate(next(stream_of_batches), tok.pad_token_id) for _ in range(cfg.grad_accum)]
            n_predicted = sum(int((b["labels"][:, 1:] != data.IGNORE).sum()) for b in batches)
            n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            loss_total = 0.0
            for batch in batches:
                loss_sum, _ = forward_loss(model, batch, device, dtype)
                loss = loss_sum / max(1, n_predicted)  # mean over every predicted token of the step
                scaler.scale(loss).backward()
                loss_total += float(loss.detach())
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            for layer in layers.values():
                layer.on_optimizer_step(step)
            lr = schedule.get_last_lr()[0]
            schedule.step()
            seconds = time.perf_counter() - step_start
            record = {
                "step": step, "total_steps": total_steps, "loss": round(loss_total, 6), "lr": lr,
                "grad_norm": round(float(grad_norm), 6), "tokens": n_tokens,
                "tokens_per_s": round(n_tokens / seconds, 2), "step_time_s": round(seconds, 4),
                "elapsed_s": round(time.perf_counter() - start, 3), **probe.sample(device),
            }
            metrics.write(record)
            emit(record)
            bar.update(record)
            if step % eval_every == 0 or step == total_steps:
                eval_loss = evaluate(model, ds.eval, cfg.micro_batch, tok.pad_token_id, device, dtype)
                if eval_loss is not None:
                    record = {"step": step, "eval_loss": round(eval_loss, 6)}
                    metrics.write(record)
                    emit(record)
                    bar.message(f"step {step}: eval loss {eval_loss:.4f}")
            if stop.stop:
                bar.message(f"stopping at step {step} ({stop.reason}); saving the adapter")
                break

    # 4. Save.
    state = adapters.state(model)
    rundir.save_tensors(out / "adapter.safetensors", state, metadata={"step": str(step), "format": str(rundir.FORMAT_VERSION)})
    if cfg.technique in PEFT_TECHNIQUES:
        save_peft_adapter(out / "peft", state, cfg, source)
    if before is not None:
        after = generate_sample(model, tok, ds.sample_prompt, device, dtype)
        one_line = lambda text: " ".join(text.split())  # noqa: E731
        say(f"sample (held out): {one_line(ds.sample_prompt[-1]['content'])}\n  before: {one_line(before)}\n"
            f"  after:  {one_line(after)}\n  target: {one_line(ds.sample_answer)}")
    metrics.close()
    say(f"saved {out}  (export merged weights with: tinytune export {out} --out {out}/merged)")
    return out
