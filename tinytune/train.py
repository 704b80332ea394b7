"""The training loop, top to bottom: load → adapt → plan → train → save.

Every optimizer step emits one metric record (to metrics.jsonl and to any listener such as the TUI);
nothing else about the loop is visible outside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tinytune import adapters, attention, checkpoint, data, fast, loading, memsave, planner, rundir
from tinytune.config import CPU_DEFAULT_STEPS, DEFAULT_EPOCHS, GIB, TrainConfig, parse_save_every
from tinytune.errors import UserError
from tinytune.export import PEFT_TECHNIQUES, save_peft_adapter
from tinytune.loss import causal_lm_loss_sum
from tinytune.memory import probe
from tinytune.memory.estimate import ModelShape
from tinytune.memsave import enable_checkpointing
from tinytune.optim import make_optimizer
from tinytune.progress import ProgressBar

Listener = Callable[[dict], None]
MAX_NONFINITE_IN_ROW = 5  # a NaN/inf loss is skipped with a warning; this many in a row means divergence


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
    """Summed token loss of one micro-batch and its number of predicted tokens. The labels stay on the
    host, where the loss counts them without waiting for the device."""
    labels = batch["labels"]
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
    with autocast_for(device, dtype):
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                     position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
        softcap = getattr(model.config, "final_logit_softcapping", None)
        return causal_lm_loss_sum(model.get_output_embeddings(), hidden, labels, softcap=softcap)


@torch.no_grad()
def evaluate(model, examples: list[data.Example], micro_batch: int, pad_id: int, device, dtype) -> float | None:
    """Mean token loss over ``examples``; out of memory halves the micro-batch and starts over."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    try:
        while True:
            try:
                total, count = 0.0, 0
                for i in range(0, len(examples), micro_batch):
                    loss_sum, n = forward_loss(model, data.collate(examples[i : i + micro_batch], pad_id), device, dtype)
                    total += float(loss_sum)
                    count += n
                return total / max(1, count)
            except torch.OutOfMemoryError:
                if micro_batch == 1:
                    raise UserError("out of memory while evaluating one example at a time; start a new run with a "
                                    "shorter --seq-len, --bits 4 or a larger --vram budget") from None
            free_memory(device)
            micro_batch = max(1, micro_batch // 2)
    finally:
        model.train(was_training)


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
    """How the outside steers a run between steps: stop (SIGINT/SIGTERM or a UI; the loop saves a
    checkpoint and ends), pause/resume, save a checkpoint now. Thread-safe: a UI calls these from
    its own thread."""

    def __init__(self) -> None:
        self.stop = False
        self.reason = ""
        self.save_now = False
        self._running = threading.Event()
        self._running.set()

    def request(self, reason: str) -> None:
        self.stop, self.reason = True, reason
        self._running.set()  # a paused run wakes up to stop

    def request_save(self) -> None:
        self.save_now = True

    def pause(self, paused: bool) -> None:
        self._running.clear() if paused and not self.stop else self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self) -> None:
        while not self._running.wait(timeout=0.5):
            pass

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
    batch = {"input_ids": ids, "labels": ids}
    if cfg.pack:  # rows of two examples, each attending only to itself, as in training
        batch["position_ids"] = (torch.arange(short, device=device) % -(-short // 2)).expand_as(ids)
    if cfg.gradient_checkpointing:
        memsave.checkpoint_layers(model, plain_layers=cfg.plain_layers)
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


@dataclass
class LoopState:
    """The loop's own state, saved in every checkpoint."""

    step: int = 0
    """Optimizer steps done (skipped non-finite steps count: their data was consumed)."""
    split: int = 1
    """Each planned micro-batch runs as this many pieces (doubled after an out-of-memory error)."""
    gradient_checkpointing: bool = True
    plain_layers: int = 0
    """Last decoder layers run without checkpointing (set to 0 after an out-of-memory error)."""
    nonfinite_in_row: int = 0

    def piece(self, micro_batch: int) -> int:
        """Examples per piece of a planned micro-batch under the current split."""
        return max(1, math.ceil(micro_batch / self.split))


def predicted_tokens(examples: list[data.Example]) -> int:
    """Tokens the loss counts in these examples: labels past the first that are not ignored."""
    return sum(sum(1 for label in e.labels[1:] if label != data.IGNORE) for e in examples)


def accumulate(model, planned: list[list[data.Example]], loop: LoopState, pad_id: int, scaler, device,
               dtype) -> tuple[float, int]:
    """Forward and backward one optimizer step's examples, each planned micro-batch in ``loop.split``
    pieces; the loss is the mean over every predicted token of the step whatever the split, so a
    split step computes the same gradient. Returns (loss, tokens)."""
    n_predicted = sum(predicted_tokens(mb) for mb in planned)
    losses, n_tokens = [], 0
    for mb in planned:
        size = loop.piece(len(mb))
        for i in range(0, len(mb), size):
            batch = data.collate(mb[i : i + size], pad_id)
            loss_sum, _ = forward_loss(model, batch, device, dtype)
            loss = loss_sum / max(1, n_predicted)
            scaler.scale(loss).backward()
            losses.append(loss.detach())  # read once per step: reading each would wait for the device
            n_tokens += sum(len(e.input_ids) for e in mb[i : i + size])
    return sum(torch.stack(losses).tolist()), n_tokens


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def after_oom(loop: LoopState, model, micro_batch: int, step: int) -> dict:
    """Re-plan after an out-of-memory error: checkpoint the plain last layers too; then halve the
    micro-batch (twice the accumulation, same examples per step); at one example, turn on gradient
    checkpointing; past that, give up."""
    if loop.gradient_checkpointing and loop.plain_layers:
        loop.plain_layers = 0
        memsave.plain_last_layers(model, 0)
        action = "every layer checkpointed"
    elif loop.piece(micro_batch) > 1:
        loop.split *= 2
        action = f"micro-batch {loop.piece(micro_batch)} × {loop.split} pieces per planned micro-batch"
    elif not loop.gradient_checkpointing:
        loop.gradient_checkpointing = True
        enable_checkpointing(model)
        action = "gradient checkpointing on"
    else:
        raise UserError(f"out of memory at step {step} even at micro-batch 1 with gradient checkpointing; "
                        "start a new run with a shorter --seq-len, --bits 4 or a larger --vram budget")
    return {"step": step, "event": "oom", "action": action, "split": loop.split,
            "gradient_checkpointing": loop.gradient_checkpointing, "plain_layers": loop.plain_layers}


def hold_to_budget(budget: planner.Budget, device: torch.device, say) -> None:
    """On a GPU larger than a --vram/--gpu budget, make the process act as a card of that budget."""
    total = probe.device_total_bytes(device)
    if probe.cap_to_budget(budget.bytes, device) is not None:
        say(f"memory: this process acts as a {budget.bytes / GIB:.2f} GiB card ({budget.source}) on a "
            f"{total / GIB:.2f} GiB one; past that it runs out of memory as that card would")
    elif budget.bytes > 1.05 * total:  # a "12GB" card shows a little under 12 GiB: that is the card meant
        say(f"warning: {budget.source} is more than this GPU's {total / GIB:.2f} GiB; a plan that needs more "
            "runs out of memory (the run then re-plans smaller)")


def open_resume(run_dir: Path, overrides: dict, say, lock: rundir.RunLock) -> tuple[TrainConfig, dict, checkpoint.Checkpoint]:
    """Check a run directory for --resume, take it from any other trainer and read its newest readable
    checkpoint."""
    if not (run_dir / "config.json").is_file():
        raise UserError(f"--resume {run_dir}: not a tinytune run directory (no config.json); pass the --out of a run")
    lock.take(run_dir, "--resume")
    cfg = TrainConfig.load(run_dir / "config.json")
    if overrides:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **overrides})
    try:
        record = json.loads((run_dir / "plan.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--resume {run_dir}: plan.json is unreadable ({e.__class__.__name__}); the run cannot be resumed") from None
    checkpoint.remove_partial(run_dir)
    ckpt = checkpoint.latest_readable(run_dir, say)
    if ckpt is None:
        raise UserError(f"--resume {run_dir}: no checkpoint yet (the run stopped before its first); "
                        f"start it again with --overwrite, or use --save-every to checkpoint sooner")
    if ckpt.step >= ckpt.state["trainer"]["total_steps"]:
        raise UserError(f"--resume {run_dir}: the run finished all {ckpt.step} steps; nothing to resume "
                        f"(export it with: tinytune export {run_dir})")
    return cfg, record, ckpt


def run(cfg: TrainConfig | None, listener: Listener | None = None, stop: StopFlag | None = None, stream=None,
        resume: Path | None = None, overrides: dict | None = None, show_progress: bool = True) -> Path:
    """Train one adapter as ``cfg`` says, or continue the run in ``resume``; returns the run directory.
    The run directory is locked against a second trainer from before the first write to the end."""
    with rundir.RunLock() as lock:
        return _run(cfg, listener, stop, stream, resume, overrides, show_progress, lock)


def _run(cfg, listener, stop, stream, resume, overrides, show_progress, lock: rundir.RunLock) -> Path:
    say = (lambda text: print(text, file=stream, flush=True)) if stream is not None else (lambda text: print(text, flush=True))
    emit = listener or (lambda _record: None)
    stop = stop or StopFlag()
    ckpt = None
    if resume is not None:
        cfg, plan_record, ckpt = open_resume(resume, overrides or {}, say, lock)
        cfg.out = str(resume)

    # 1. Check every input before anything is written.
    source = loading.resolve_source(cfg.model)
    model_config = loading.load_config(source)
    shape = ModelShape.from_config(model_config, source.name)
    data_path = Path(cfg.data) if cfg.data else data.demo_path()
    out = Path(cfg.out) if cfg.out else rundir.default_path(source.name)
    if ckpt is None and cfg.out:
        rundir.check_output(out, cfg.overwrite)
    elif ckpt is None:  # a default name: create() takes the next free one if it is taken
        rundir.check_writable(out)
    device = loading.pick_device(cfg.device)
    dtype = loading.compute_dtype(device)
    budget = planner.resolve_budget(cfg.vram, cfg.gpu, device.type, f"{cfg.vram / GIB:g}GiB" if cfg.vram else None)
    pinned = set(planner.PLANNED if cfg.fixed is None or ckpt is not None else cfg.fixed)
    if "seq_len" not in pinned:  # plan for the longest example, up to 2,048 tokens
        cfg.seq_len = min(planner.DEFAULT_SEQ_CAP, shape.max_context or planner.DEFAULT_SEQ_CAP)
    if shape.max_context and cfg.seq_len > shape.max_context:
        raise UserError(f"--seq-len {cfg.seq_len} is beyond {shape.name}'s context of {shape.max_context} tokens; "
                        f"use --seq-len {shape.max_context} or less")
    tok = loading.load_tokenizer(source)
    ds = data.build(data_path, tok, cfg.seq_len, cfg.eval_fraction, cfg.train_on_prompt, cfg.seed, say)
    digest = checkpoint.file_digest(data_path)
    if ckpt is not None and ckpt.state["trainer"]["data_sha256"] != digest:
        raise UserError(f"--data {data_path} changed since the run started (its SHA-256 differs); resuming would "
                        "train on other examples: restore the file, or start a new run")
    if "seq_len" not in pinned and not cfg.pack:  # packed rows fill the whole length
        cfg.seq_len = max(len(e.input_ids) for e in ds.train + ds.eval)
    say(f"data: {data_path.name} ({ds.format}, {ds.n_records:,} records) → {len(ds.train):,} train / {len(ds.eval):,} "
        f"eval examples; {ds.n_truncated:,} truncated to {cfg.seq_len} tokens, {ds.n_dropped:,} dropped (nothing left "
        "to learn)")
    if ds.n_folded:
        say(f"data: the chat template has no system role; system messages open the next user message instead "
            f"({ds.n_folded} record{'s' if ds.n_folded != 1 else ''})")
    if cfg.pack:
        n_examples = len(ds.train)
        ds.train = data.pack(ds.train, cfg.seq_len, cfg.seed)
        fill = sum(len(e.input_ids) for e in ds.train) / (len(ds.train) * cfg.seq_len)
        say(f"packed {n_examples} train examples into {len(ds.train)} rows of ≤{cfg.seq_len} tokens ({100 * fill:.0f}% full)")
    planner.check_plain_layers(cfg.plain_layers, shape)
    plan = None
    if budget is not None and ckpt is None:
        plan = planner.make_plan(shape, budget, cfg.seq_len, planner.fixed_from_config(cfg, pinned))
        planner.apply(plan, cfg, pinned)
        say(f"plan: {plan.chosen.label()}, micro-batch {cfg.micro_batch} × {cfg.grad_accum}, "
            f"{'gradient checkpointing' if cfg.gradient_checkpointing else 'no gradient checkpointing'}"
            f"{f' (the last {cfg.plain_layers} layers plain)' if cfg.plain_layers else ''}; predicted peak "
            f"{plan.chosen.est.peak / GIB:.2f} GiB, need {plan.chosen.est.needed / GIB:.2f} of {budget.bytes / GIB:.2f} GiB "
            f"({budget.source}{'; CPU run: fp32 activations' if device.type == 'cpu' else ''})")
    if budget is not None and device.type == "cuda" and (cfg.vram or cfg.gpu):
        hold_to_budget(budget, device, say)
    if device.type == "cpu":  # activations live in host memory: give what a step frees back to the system
        memsave.return_freed_host_memory()
    save_every = parse_save_every(cfg.save_every)

    # 2. Load, adapt, plan.
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model = loading.load_model(source, cfg.bits, device)
    if cfg.pack:  # attention within each example of a packed row, without an s × s mask
        attention.install(model, packed=True)
    per_epoch = data.micro_batches_per_epoch(len(ds.train), cfg.micro_batch)
    total_steps = ckpt.state["trainer"]["total_steps"] if ckpt else planned_steps(cfg, per_epoch, device, say)
    host_embeddings = memsave.embeddings_on_host(model, cfg.technique)
    layers = adapters.apply(model, cfg, total_steps)
    params = adapters.trainable(model)
    n_trainable = sum(p.numel() for p in params)
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and fast.can_compile(device))
    if plan is not None and device.type == "cuda":
        plan = calibrate(model, shape, plan, cfg, pinned, device, dtype, say)
    if ckpt is None:
        plan_record = planner.describe(cfg, model_config, device, dtype, n_trainable, total_steps, source)
        plan_record.update(planner.predicted(shape, cfg, device.type, plan))
        plan_record["compiled_layers"] = compiled
        plan_record["embeddings_on_host"] = host_embeddings
        if budget is not None:
            plan_record["budget_gib"] = round(budget.bytes / GIB, 3)
        if cfg.technique == "delta-lora":
            plan_record["delta_start"] = adapters.delta_start(cfg, total_steps)
    say(f"model: {source.name} ({source.kind}) at {cfg.bits}-bit on {probe.describe(device)}, loaded in "
        f"{time.perf_counter() - t0:.1f}s; "
        f"{'full fine-tuning' if cfg.technique == 'full' else f'{cfg.technique} r={cfg.rank} on {len(layers)} layers'}, "
        f"{n_trainable:,} trainable parameters; {total_steps} step{'' if total_steps == 1 else 's'}")

    if ckpt is None:
        existed = out.is_dir() and cfg.out is not None
        out = rundir.create(out, cfg.overwrite, numbered=not cfg.out)
        lock.take(out, "--out")
        written = out / "config.json"
        try:
            cfg.save(written)
            written = out / "plan.json"
            rundir.write_json(written, plan_record)
        except OSError as e:  # nothing trained yet: leave nothing behind
            lock.release()
            with contextlib.suppress(OSError):
                if existed:
                    rundir.clear(out)
                else:
                    shutil.rmtree(out)
            raise rundir.write_failed(written, e, "start the run again") from None
    emit({"event": "plan", "run_dir": str(out), "plan": plan_record})

    model.train()
    optimizer = make_optimizer(cfg.optim, adapters.param_groups(model, cfg), cfg.lr, cfg.weight_decay,
                               flat=cfg.technique != "full")
    schedule = make_schedule(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)
    eval_every = cfg.eval_every or max(1, total_steps // 4)
    # a resumed run goes on with its own loop state (OOM split, checkpointing, step)
    loop = LoopState(**ckpt.state["trainer"]["loop"]) if ckpt else LoopState(
        gradient_checkpointing=cfg.gradient_checkpointing, plain_layers=cfg.plain_layers)

    bar = ProgressBar(total_steps, stream=stream, start=loop.step, quiet=not show_progress)

    def publish(record: dict) -> None:
        """One record to metrics.jsonl and to the listener (the TUI)."""
        metrics.write(record)
        emit(record)

    before = None
    if ckpt is None:
        metrics = rundir.MetricsWriter(out / "metrics.jsonl")
        if cfg.sample and ds.sample_prompt:
            before = generate_sample(model, tok, ds.sample_prompt, device, dtype)
        eval_loss = evaluate(model, ds.eval, cfg.micro_batch, tok.pad_token_id, device, dtype)
        if eval_loss is not None:
            record = {"step": 0, "eval_loss": round(eval_loss, 6)}
            publish(record)
            bar.message(f"eval loss before training: {eval_loss:.4f}")
    else:
        dropped = rundir.truncate_metrics(out / "metrics.jsonl", ckpt.step)
        metrics = rundir.MetricsWriter(out / "metrics.jsonl")
        record = {"step": ckpt.step, "event": "resumed", "checkpoint": ckpt.path.name, "records_dropped": dropped}
        publish(record)
        say(f"resuming {out} at step {ckpt.step} of {total_steps} from {ckpt.path.name}")
    if loop.gradient_checkpointing:
        memsave.checkpoint_layers(model, cfg.offload_checkpoints, loop.plain_layers)
    memsave.tile_mlp(model, cfg.mlp_tiles)
    if compiled:
        fast.compile_layers(model)

    def pause_event(step: int, paused: bool) -> None:
        event = {"step": step, "event": "paused" if paused else "unpaused"}
        publish(event)
        bar.message(f"{'paused' if paused else 'resumed'} after step {step}")

    def save_adapter(step: int) -> None:
        """RUN_DIR/adapter.safetensors and its PEFT copy: the newest weights saved, at every checkpoint
        and at the end, so export and PEFT find them whenever the run stops, however it stops."""
        state = adapters.state(model)
        try:
            rundir.save_tensors(out / "adapter.safetensors", state,
                                metadata={"step": str(step), "format": str(rundir.FORMAT_VERSION)})
            if cfg.technique in PEFT_TECHNIQUES:
                save_peft_adapter(out / "peft", state, cfg, source)
        except OSError as e:
            metrics.close()
            same = f"the checkpoint of step {step} holds the same weights"
            then = (f"export it with: tinytune export {out} ({same})" if step >= total_steps
                    else f"resume with: tinytune --resume {out} ({same})")
            raise rundir.write_failed(out / "adapter.safetensors", e, then) from None

    def save_checkpoint(step: int) -> Path:
        trainer = {"total_steps": total_steps, "data_sha256": digest, "loop": dataclasses.asdict(loop)}
        path = checkpoint.save(out, step, model, optimizer, schedule, scaler, device, trainer, cfg.keep_checkpoints)
        save_adapter(step)
        event = {"step": step, "event": "checkpoint", "path": str(path.relative_to(out))}
        publish(event)
        return path

    if ckpt is not None:
        checkpoint.restore(ckpt, model, optimizer, schedule, scaler, device)  # last: it sets the RNG states

    # 3. The loop.
    bar.start = time.perf_counter()
    stream_of_batches = data.micro_batches(ds.train, cfg.micro_batch, cfg.seed, start=loop.step * cfg.grad_accum)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = last_save = time.perf_counter()
    step = loop.step
    with stop.on_signals():
        for step in range(loop.step + 1, total_steps + 1):
            step_start = time.perf_counter()
            planned = [next(stream_of_batches) for _ in range(cfg.grad_accum)]
            while True:
                try:
                    loss_total, n_tokens = accumulate(model, planned, loop, tok.pad_token_id, scaler, device, dtype)
                    break
                except torch.OutOfMemoryError:
                    pass  # handled outside the except block, so the failed step's tensors can be freed
                optimizer.zero_grad(set_to_none=True)
                free_memory(device)
                event = after_oom(loop, model, cfg.micro_batch, step)
                publish(event)
                bar.message(f"step {step}: out of memory; retrying the step with {event['action']}")
            finite = math.isfinite(loss_total)
            if finite:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))  # 0: measure only
                finite = math.isfinite(grad_norm) or scaler.is_enabled()  # fp16: the scaler skips inf gradients itself
            if finite:
                scaler.step(optimizer)
                scaler.update()
                loop.nonfinite_in_row = 0
            else:
                grad_norm = float("nan")
                loop.nonfinite_in_row += 1
                event = {"step": step, "event": "nonfinite", "loss": str(loss_total), "skipped": True,
                         "in_a_row": loop.nonfinite_in_row}
                publish(event)
                bar.message(f"warning: step {step}: loss or gradient is {loss_total if not math.isfinite(loss_total) else 'inf/nan'}; "
                            f"step skipped ({loop.nonfinite_in_row} in a row)")
                if loop.nonfinite_in_row >= MAX_NONFINITE_IN_ROW:
                    last = checkpoint.complete(out)
                    metrics.close()
                    raise UserError(f"training diverged: the loss was NaN/inf for {loop.nonfinite_in_row} steps in a row "
                                    f"(steps {step - loop.nonfinite_in_row + 1}–{step}); the last good checkpoint is "
                                    f"{last[0] if last else 'none'}; lower --lr (now {cfg.lr:g}) and start again")
            optimizer.zero_grad(set_to_none=True)
            if finite:
                for layer in layers.values():
                    layer.on_optimizer_step(step)
            lr = schedule.get_last_lr()[0]
            with warnings.catch_warnings():  # a skipped first step makes the scheduler warn about call order
                warnings.simplefilter("ignore", UserWarning)
                schedule.step()
            loop.step = step
            seconds = time.perf_counter() - step_start
            record = {
                "step": step, "total_steps": total_steps, "loss": round(loss_total, 6) if finite else None, "lr": lr,
                "grad_norm": round(grad_norm, 6) if finite else None, "tokens": n_tokens,
                "tokens_per_s": round(n_tokens / seconds, 2), "step_time_s": round(seconds, 4),
                "elapsed_s": round(time.perf_counter() - start, 3), **probe.sample(device),
            }
            publish(record)
            bar.update(record)
            if step % eval_every == 0 or step == total_steps:
                eval_loss = evaluate(model, ds.eval, loop.piece(cfg.micro_batch), tok.pad_token_id, device, dtype)
                if eval_loss is not None:
                    record = {"step": step, "eval_loss": round(eval_loss, 6)}
                    publish(record)
                    bar.message(f"step {step}: eval loss {eval_loss:.4f}")
            if stop.stop or step == total_steps:
                break
            due = save_every.due(step, time.perf_counter() - last_save)
            if loop.nonfinite_in_row == 0 and (due or stop.save_now):  # no checkpoint during a NaN streak
                stop.save_now = False
                save_checkpoint(step)
                last_save = time.perf_counter()
            if stop.paused:
                pause_event(step, True)
                stop.wait_while_paused()
                pause_event(step, False)
                if stop.stop:
                    break

        # 4. Save: a checkpoint (so a stopped run resumes) with the adapter and its PEFT copy.
        if step > 0:
            save_checkpoint(step)
        else:
            save_adapter(step)
    if stop.stop and step < total_steps:
        event = {"step": step, "event": "stopped", "total_steps": total_steps, "reason": stop.reason}
        say(f"stopped at step {step} of {total_steps} ({stop.reason}); saved {out}\n"
            f"  resume with: tinytune --resume {out}")
    else:
        event = {"step": step, "event": "finished", "total_steps": total_steps}
        if before is not None:
            after = generate_sample(model, tok, ds.sample_prompt, device, dtype)
            one_line = lambda text: " ".join(text.split())  # noqa: E731
            say(f"sample (held out): {one_line(ds.sample_prompt[-1]['content'])}\n  before: {one_line(before)}\n"
                f"  after:  {one_line(after)}\n  target: {one_line(ds.sample_answer)}")
        say(f"saved {out}  (export merged weights to {out}/merged with: tinytune export {out})")
    publish(event)
    metrics.close()
    return out
