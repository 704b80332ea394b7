"""Command line: one dispatch table.

    tinytune [train] [--vram 12GB] [options]   train an adapter (the default command)
    tinytune plan [--model M] --vram 12GB      show the plan (and runners-up) for a memory budget
    tinytune export RUN_DIR [--out DIR]        merge into the base and write an HF model directory
    tinytune monitor [RUN_DIR]                 the terminal UI on a run started elsewhere
    tinytune profiles                          the GPU profiles and model presets the planner knows
"""

from __future__ import annotations

import argparse
import os
import sys

from tinytune import __version__
from tinytune.config import TrainConfig, parse_vram
from tinytune.errors import UserError
from tinytune.planner import DEFAULT_SEQ_CAP, PLANNED  # PLANNED: chosen from the budget unless pinned


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _plan_choices(p: argparse.ArgumentParser) -> None:
    """Flags shared by train and plan: defaults are None so that the planner knows what was pinned."""
    p.add_argument("--vram", help="GPU memory budget, e.g. 12GB, 12 GB, 12GiB, 12000MiB, 12g (GB = GiB = 2^30 bytes)")
    p.add_argument("--gpu", help="plan for this GPU's memory instead of --vram, e.g. rtx3060, rtx4090, t4, a100-40gb")
    p.add_argument("--bits", type=int, default=None, help="base weights: 4 (NF4 + double quant), 8 (LLM.int8), 16 (default: planned)")
    p.add_argument("--technique", default=None, help="lora, lora-fa, vera, delta-lora, lora-plus or full (16-bit only) (default: planned, lora)")
    p.add_argument("--rank", type=int, default=None, help="adapter rank (default: planned; 16 without a budget)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence: longer examples are truncated "
                   "(default: the longest example, at most 2048)")
    p.add_argument("--batch", dest="micro_batch", type=int, default=None, help="micro-batch size (default: planned)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default: planned; "
                   "micro-batch × accumulation = 8)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None)
    p.add_argument("--plain-layers", type=int, default=None, help="with gradient checkpointing, run the last N decoder "
                   "layers without it: faster, they keep their activations (default: planned from the memory left over)")
    p.add_argument("--offload-checkpoints", action="store_true",
                   help="keep each layer's checkpointed input in host memory (long sequences on a small GPU)")
    p.add_argument("--mlp-tiles", type=int, default=1, help="run each MLP over the sequence in N tiles (default 1)")
    p.add_argument("--pack", action="store_true", help="pack short examples into rows of --seq-len tokens "
                   "(no attention across examples)")
    p.add_argument("--optim", default=TrainConfig().optim, help="paged-adamw-8bit (default), paged-adamw-32bit or adamw")


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train an adapter (default command)", description="Train an adapter.")
    d = TrainConfig()
    p.add_argument("--model", help="HF model directory, model id in the local HF cache, or a .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="JSONL or JSON array of alpaca, chat (messages or ShareGPT) or text records, "
                   "a CSV/TSV file with alpaca or text columns, or a .txt file, any of them gzipped "
                   "(default: the bundled demo set)")
    p.add_argument("--out", help="run directory (default: runs/<time>-<model>, numbered -2, -3, ... if taken)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    _plan_choices(p)
    p.add_argument("--lora-plus-ratio", type=float, default=d.lora_plus_ratio, help="LoRA+: B's lr over A's (default 16)")
    p.add_argument("--vera-d-init", type=float, default=d.vera_d_init, help="VeRA: initial d vector value (default 0.1)")
    p.add_argument("--delta-lambda", type=float, default=d.delta_lambda, help="Delta-LoRA: λ (default 2)")
    p.add_argument("--delta-start", type=int, default=None, help="Delta-LoRA: warm-up steps K (default 500, or a tenth of a shorter run)")
    p.add_argument("--targets", default=",".join(d.targets), help="comma-separated module names, or all-linear")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: twice the rank)")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank) (rsLoRA)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the gradients to this norm (0: no clipping; default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data (default 2; on a CPU at most 30 steps)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="held-out share for eval loss")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evals (0: four per run)")
    p.add_argument("--train-on-prompt", action="store_true", help="also compute the loss on prompt tokens")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--no-sample", dest="sample", action="store_false", help="skip the before/after generation sample")
    p.add_argument("--compile", default=d.compile, help="compile the decoder layers (faster steps after a first "
                   "slow one): auto (on for CUDA with Triton), on or off (default auto)")
    p.add_argument("--save-every", default=d.save_every,
                   help="checkpoint every N steps (100) or every so long (30s, 10m, 1h), or off (default 5m)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest checkpoints to keep (default 2)")
    p.add_argument("--no-tui", dest="tui", action="store_false",
                   help="plain progress lines instead of the terminal UI (the default on a terminal)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or killed run from its newest checkpoint, "
                   "with the run's own settings")
    return p


def _export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="merge a run's adapter into fp16 weights (HF directory)")
    p.add_argument("run_dir", help="a training run directory")
    p.add_argument("--out", help="directory to write the merged model to (default: RUN_DIR/merged)")
    p.add_argument("--dtype", default="fp16", help="fp16 (default), bf16 or fp32")
    p.add_argument("--max-shard-size", default="200MB", help="safetensors shard size (default 200MB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--checkpoint", type=int, metavar="STEP",
                   help="export the checkpoint of this step (default: the run's newest weights: its final adapter, "
                        "or a newer checkpoint of a run that stopped or is still training)")
    return p


def _pinned(args) -> dict:
    """The planned choices the user set, and TrainConfig's defaults for the rest."""
    d = TrainConfig()
    out = {name: getattr(args, name, None) for name in PLANNED}
    explicit = {name for name, v in out.items() if v is not None}
    for name, value in out.items():
        if value is None:
            out[name] = getattr(d, name)
    if "technique" in explicit and "bits" not in explicit and out["technique"] == "full":
        out["bits"] = 16
    elif "bits" not in explicit:
        out["bits"] = None
    if "alpha" not in explicit:
        out["alpha"] = 2.0 * out["rank"]
    out["fixed"] = tuple(sorted(explicit))
    return out


RESUME_OVERRIDES = ("save_every", "keep_checkpoints", "sample")  # settings a resumed run may change


def _use_tui(args) -> bool:
    """The terminal UI on a real terminal, unless --no-tui; piped or redirected output stays plain."""
    return bool(args.tui) and sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("TERM", "") not in ("", "dumb")


def _train(cfg, args, **kwargs) -> None:
    if _use_tui(args):
        from tinytune.tui import train_with_ui

        train_with_ui(cfg, **kwargs)
    else:
        from tinytune import train

        train.run(cfg, **kwargs)


def cmd_train(args) -> int:
    from pathlib import Path

    if args.resume:
        defaults = vars(build_parser().parse_args(["train"]))
        given = [k for k, v in vars(args).items()
                 if k not in ("resume", "tui", *RESUME_OVERRIDES) and v != defaults.get(k)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UserError(f"--resume continues with the run's own settings; drop {flag} "
                            "(only --save-every, --keep-checkpoints, --no-sample and --no-tui may change)")
        overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES if getattr(args, k) != defaults.get(k)}
        _train(None, args, resume=Path(args.resume), overrides=overrides)
        return 0
    cfg = TrainConfig(
        model=args.model, data=args.data, out=args.out, overwrite=args.overwrite,
        vram=parse_vram(args.vram) if args.vram is not None else None, gpu=args.gpu,
        lora_plus_ratio=args.lora_plus_ratio, vera_d_init=args.vera_d_init,
        delta_lambda=args.delta_lambda, delta_start=args.delta_start, targets=tuple(t.strip() for t in args.targets.split(",")),
        dropout=args.dropout, rslora=args.rslora, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, max_steps=args.max_steps, epochs=args.epochs, seed=args.seed,
        optim=args.optim, eval_fraction=args.eval_fraction,
        eval_every=args.eval_every, train_on_prompt=args.train_on_prompt, device=args.device, sample=args.sample,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        offload_checkpoints=args.offload_checkpoints, mlp_tiles=args.mlp_tiles, pack=args.pack, compile=args.compile,
        **_pinned(args),
    )
    _train(cfg, args)
    return 0


def _plan_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="show the plan for a memory budget (offline, no weights needed)",
                       description="Plan technique, rank, bits, micro-batch and checkpointing for a memory budget.")
    p.add_argument("--model", help="a preset (" + ", ".join(_preset_names()) + "), an HF model directory, "
                   "a model id in the local HF cache or a .gguf file (default: smollm2-135m, the embedded default)")
    _plan_choices(p)
    p.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear")
    p.add_argument("--dropout", type=float, default=TrainConfig().dropout)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _preset_names() -> list[str]:
    from tinytune import presets

    return presets.model_names()


def cmd_plan(args) -> int:
    import json

    from tinytune import planner

    if args.model is None:
        from tinytune import presets

        shape = presets.model_shape("smollm2-135m")
    else:
        shape = _shape_for(args.model)
    pinned = _pinned(args)
    cfg = TrainConfig(optim=args.optim, dropout=args.dropout, targets=tuple(t.strip() for t in args.targets.split(",")),
                      offload_checkpoints=args.offload_checkpoints, mlp_tiles=args.mlp_tiles, pack=args.pack,
                      **{k: v for k, v in pinned.items() if k != "fixed"})
    budget = planner.resolve_budget(parse_vram(args.vram) if args.vram is not None else None, args.gpu, "cuda", args.vram)
    if budget is None:
        raise UserError("no CUDA GPU here to measure: pass --vram 12GB or --gpu rtx3060 to plan for a card")
    seq_len = args.seq_len or min(DEFAULT_SEQ_CAP, shape.max_context or DEFAULT_SEQ_CAP)
    plan = planner.make_plan(shape, budget, seq_len, planner.fixed_from_config(cfg, set(pinned["fixed"])))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else planner.render(plan))
    return 0


def _shape_for(model: str):
    """A preset by name, else the config of a local model (no weights are read)."""
    from tinytune import presets
    from tinytune.memory.estimate import ModelShape

    try:
        return presets.model_shape(model)
    except UserError:
        if not (os.path.sep in model or "/" in model or model.endswith(".gguf") or os.path.exists(model)):
            raise
    from tinytune import loading

    source = loading.resolve_source(model)
    return ModelShape.from_config(loading.load_config(source), name=source.name)


def cmd_export(args) -> int:
    from pathlib import Path

    from tinytune.export import export

    run_dir = Path(args.run_dir)
    export(run_dir, Path(args.out) if args.out else run_dir / "merged", dtype=args.dtype, overwrite=args.overwrite,
           max_shard_size=args.max_shard_size, step=args.checkpoint)
    return 0


def _monitor_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("monitor", help="watch a run started elsewhere (live, or a replay once it has ended)")
    p.add_argument("run_dir", nargs="?",
                   help="a training run directory (default: the newest live run under ./runs, else the newest)")
    return p


def cmd_monitor(args) -> int:
    from pathlib import Path

    from tinytune import rundir
    from tinytune.tui import monitor

    run_dir = Path(args.run_dir) if args.run_dir else rundir.newest_run()
    if run_dir is None:
        raise UserError("monitor: no run under ./runs to watch; pass the run directory (the --out of a run)")
    if not args.run_dir:
        print(f"monitor: watching {run_dir}", flush=True)
    monitor(run_dir)
    return 0


def _profiles_parser(sub) -> argparse.ArgumentParser:
    return sub.add_parser("profiles", help="list the GPU profiles (--gpu) and model presets (plan --model)")


def cmd_profiles(args) -> int:
    from tinytune import presets

    print(f"{'GPU (--gpu)':<12} {'name':<34} {'VRAM GiB':>8} {'bf16':>5} {'GB/s':>6} {'bf16 TFLOP/s':>13}")
    for key in presets.gpu_names():
        g = presets.gpu(key)
        print(f"{key:<12} {g.name:<34} {g.vram_bytes / 2**30:>8g} {'yes' if g.bf16 else 'no':>5} {g.bandwidth_gbs:>6g} {g.bf16_tflops:>13g}")
    print(f"\n{'model (plan --model)':<22} {'type':<12} {'params':>8} {'layers':>7} {'hidden':>7} {'context':>8}")
    for key in presets.model_names():
        shape = presets.model_shape(key)
        print(f"{key:<22} {shape.model_type:<12} {shape.n_params / 1e9:>7.2f}B {shape.layers:>7} {shape.hidden:>7} {shape.max_context or 0:>8}")
    return 0


COMMANDS = {"train": (_train_parser, cmd_train), "plan": (_plan_parser, cmd_plan), "export": (_export_parser, cmd_export),
            "monitor": (_monitor_parser, cmd_monitor), "profiles": (_profiles_parser, cmd_profiles)}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tinytune", description="Quantized, low-memory LLM fine-tuning for consumer GPUs.")
    parser.add_argument("--version", action="version", version=f"tinytune {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for make, _ in COMMANDS.values():
        make(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "train")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command][1](args)
    except UserError as e:
        one_line = str(e).replace("\r", "\\r").replace("\n", "\\n")  # a path or a value may hold a newline
        print(f"tinytune: error: {one_line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tinytune: interrupted", file=sys.stderr)
        return 130
