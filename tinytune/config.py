"""Typed configuration: the one source of truth for a run.

CLI flags are turned into these dataclasses and validated in ``__post_init__``; a run directory
stores ``config.json`` written from them, so ``export`` (and later ``--resume``) rebuild exactly the
same model and adapter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinytune.errors import UserError

GIB = 2**30

# Sizes a user types for a GPU. "GB" on a graphics card box means GiB (a "12GB" RTX 3060 has
# 12,288 MiB), so GB, G and GiB all mean 2^30 bytes here; MB and MiB mean 2^20.
_UNITS = {
    "": GIB, "g": GIB, "gb": GIB, "gib": GIB,
    "m": 2**20, "mb": 2**20, "mib": 2**20,
    "t": 2**40, "tb": 2**40, "tib": 2**40,
}
_VRAM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

TECHNIQUES = ("lora", "lora-fa", "vera", "delta-lora", "lora-plus", "full")
DEFAULT_EPOCHS = 2.0
# A CPU trains the 135M default at ≈80 tokens/s (2 cores), ≈9 s per 8-example step: 30 steps keep
# the default run near five minutes and are enough for the demo task's eval loss to fall ~5×.
CPU_DEFAULT_STEPS = 30
OPTIMIZERS = ("paged-adamw-8bit", "paged-adamw-32bit", "adamw")
BITS = (4, 8, 16)
DEVICES = ("auto", "cpu", "cuda")
_SAVE_EVERY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(steps?|s|sec|m|min|h)?\s*$", re.IGNORECASE)
_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_vram(text: str) -> int:
    """Parse a memory size such as ``12GB``, ``12 GB``, ``12GiB``, ``12000MiB`` or ``12g`` to bytes.

    GB/G/GiB are binary (2^30 bytes), the way GPU vendors label VRAM; a bare number is GiB.
    """
    m = _VRAM_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UserError(
            f"--vram {text!r} is not a memory size: write it like 12GB, 12 GB, 12GiB, 12000MiB or 12g "
            "(GB means GiB, 2^30 bytes, as on a GPU's box)"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UserError(f"--vram {text!r} must be larger than zero, e.g. --vram 12GB")
    return value


@dataclass(frozen=True)
class SaveEvery:
    """When to write a periodic checkpoint: every ``steps`` optimizer steps or every ``seconds``."""

    steps: int = 0
    seconds: float = 0.0

    def due(self, step: int, since_last_s: float) -> bool:
        if self.steps:
            return step % self.steps == 0
        return bool(self.seconds) and since_last_s >= self.seconds


def parse_save_every(text: str) -> SaveEvery:
    """``50`` or ``50steps`` → every 50 steps; ``30s``, ``10m``, ``1.5h`` → by time; ``0``/``off`` → never."""
    if str(text).strip().lower() in ("0", "off", "never", "no"):
        return SaveEvery()
    m = _SAVE_EVERY_RE.match(str(text))
    if not m:
        raise UserError(f"--save-every {text!r} is not a step count or a duration: write 100 (steps), 30s, 10m or 1h, or off")
    value, unit = float(m.group(1)), (m.group(2) or "steps").lower()
    if unit.startswith("step"):
        if value != int(value) or value < 1:
            raise UserError(f"--save-every {text!r}: a step count must be a positive whole number, e.g. 100")
        return SaveEvery(steps=int(value))
    if value <= 0:
        raise UserError(f"--save-every {text!r}: a duration must be positive, e.g. 10m")
    return SaveEvery(seconds=value * _SECONDS[unit])


def format_gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB"


@dataclass
class TrainConfig:
    """Everything that decides what a training run does."""

    model: str | None = None
    """HF model directory, model id in the local HF cache, or a .gguf file; None = embedded default."""
    data: str | None = None
    """JSONL (alpaca / chat / text records) or .txt file; None = the bundled demo dataset."""
    out: str | None = None
    """Run directory; None = runs/<timestamp>-<model>."""
    overwrite: bool = False
    """Allow writing into a directory that already holds a run."""
    vram: int | None = None
    """Memory budget in bytes (None = whatever the device has)."""
    gpu: str | None = None
    """Plan for this GPU profile's memory (profiles/gpus.json) instead of ``vram``."""
    bits: int | None = None
    """Base weights: 4 = NF4 + double quantization, 8 = LLM.int8, 16 = bf16/fp16 (fp32 on CPU).
    None = 4 for adapters, 16 for full fine-tuning."""
    technique: str = "lora"
    """lora, lora-fa (A frozen), vera (shared random A/B, trainable vectors), delta-lora, lora-plus, full."""
    lora_plus_ratio: float = 16.0
    """LoRA+: B's learning rate over A's."""
    vera_d_init: float = 0.1
    """VeRA: initial value of the trainable vector d (b starts at 0)."""
    delta_lambda: float = 2.0
    """Delta-LoRA: λ, how strongly W follows the change of B·A."""
    delta_start: int | None = None
    """Delta-LoRA: warm-up steps K before W follows (None = 500, or a tenth of a shorter run)."""
    targets: tuple[str, ...] = ("all-linear",)
    """Module names to adapt (e.g. q_proj,v_proj) or all-linear = every linear layer of the decoder."""
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    rslora: bool = False
    """Scale by alpha/sqrt(rank) instead of alpha/rank (rsLoRA)."""
    seq_len: int = 512
    micro_batch: int = 4
    grad_accum: int = 2
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    """Optimizer steps; None = run ``epochs`` over the training split."""
    epochs: float | None = None
    """Passes over the training split; None = 2 on a GPU, and at most ``CPU_DEFAULT_STEPS`` on a CPU."""
    seed: int = 0
    optim: str = "paged-adamw-8bit"
    gradient_checkpointing: bool = True
    offload_checkpoints: bool = False
    """Keep each layer's checkpointed input in (pinned) host memory until backward needs it."""
    mlp_tiles: int = 1
    """Run each MLP over the sequence in this many checkpointed tiles (long sequences)."""
    plain_layers: int = 0
    """With gradient checkpointing, run the last this many decoder layers without it (faster, more memory)."""
    compile: str = "auto"
    """Compile the decoder layers with torch.compile: on, off, or auto (on for CUDA with Triton)."""
    pack: bool = False
    """Pack short train examples into rows of seq_len tokens (no attention across examples)."""
    eval_fraction: float = 0.05
    eval_every: int = 0
    """Steps between evaluations; 0 = four times per run."""
    train_on_prompt: bool = False
    device: str = "auto"
    sample: bool = True
    """Generate a before/after sample from a held-out prompt."""
    save_every: str = "5m"
    """Periodic checkpoints: a step count (100), a duration (30s, 10m, 1h) or off."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep in RUN_DIR/checkpoints."""
    fixed: tuple[str, ...] | None = None
    """Fields the user pinned when the rest is planned from the memory budget (technique, rank,
    bits, seq_len, micro_batch, grad_accum, gradient_checkpointing, alpha); None = use every field as
    given, no planning."""
    _extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.fixed is not None:
            self.fixed = tuple(self.fixed)
        if self.bits is None:
            self.bits = 16 if self.technique == "full" else 4
        if self.technique not in TECHNIQUES:
            raise UserError(f"--technique {self.technique!r} is unknown: choose one of {', '.join(TECHNIQUES)}")
        if self.bits not in BITS:
            raise UserError(f"--bits {self.bits} is not supported: choose 4, 8 or 16")
        if self.optim not in OPTIMIZERS:
            raise UserError(f"--optim {self.optim!r} is unknown: choose one of {', '.join(OPTIMIZERS)}")
        if self.compile not in ("auto", "on", "off"):
            raise UserError(f"--compile {self.compile!r} is unknown: choose auto, on or off")
        if self.device not in DEVICES:
            raise UserError(f"--device {self.device!r} is unknown: choose auto, cpu or cuda")
        for f in dataclasses.fields(self):  # nan passes every comparison below, inf most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name.replace('_', '-')} {value} must be a finite number")
        for name, flag in (("rank", "--rank"), ("seq_len", "--seq-len"), ("micro_batch", "--batch"),
                           ("grad_accum", "--grad-accum")):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"{flag} {getattr(self, name)} must be a positive whole number")
        if self.lora_plus_ratio <= 0:
            raise UserError(f"--lora-plus-ratio {self.lora_plus_ratio} must be positive (the paper uses 16)")
        if self.vera_d_init == 0:
            raise UserError("--vera-d-init 0 would leave VeRA nothing to learn (b starts at 0, so neither vector "
                            "gets a gradient); the paper uses 0.1")
        if self.delta_lambda < 0:
            raise UserError(f"--delta-lambda {self.delta_lambda} must be 0 or more (the paper uses 2)")
        if self.delta_start is not None and self.delta_start < 0:
            raise UserError(f"--delta-start {self.delta_start} must be zero or more steps")
        if self.technique == "full" and self.bits != 16:
            raise UserError(
                f"--technique full with --bits {self.bits}: full fine-tuning updates every weight, and {self.bits}-bit "
                "weights are integer codes with no gradient; use --bits 16, or an adapter technique (lora, lora-fa, vera, ...)"
            )
        if self.technique == "delta-lora":
            self.dropout = 0.0  # Delta-LoRA drops the branch's dropout so W's update is exact
        if self.alpha <= 0:
            raise UserError(f"--alpha {self.alpha} must be positive (the usual choice is twice the rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout {self.dropout} must be in [0, 1)")
        if self.lr <= 0:
            raise UserError(f"--lr {self.lr} must be positive, e.g. 2e-4")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay {self.weight_decay} must be 0 or more")
        if self.max_grad_norm < 0:
            raise UserError(f"--max-grad-norm {self.max_grad_norm} must be 0 or more (0 = no clipping; a negative "
                            "norm would turn the gradients around)")
        if self.eval_every < 0:
            raise UserError(f"--eval-every {self.eval_every} must be 0 or more steps (0 = four evaluations per run)")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"--max-steps {self.max_steps} must be a positive whole number")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs {self.epochs} must be positive")
        if not 0.0 <= self.eval_fraction < 0.5:
            raise UserError(f"--eval-fraction {self.eval_fraction} must be in [0, 0.5)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"--warmup-ratio {self.warmup_ratio} must be in [0, 1)")
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise UserError("--offload-checkpoints moves gradient checkpoints to host memory; it needs gradient "
                            "checkpointing: drop --no-gradient-checkpointing")
        if self.plain_layers < 0:
            raise UserError(f"--plain-layers {self.plain_layers} must be 0 or more (0 = every layer checkpointed)")
        if self.plain_layers and not self.gradient_checkpointing:
            raise UserError(f"--plain-layers {self.plain_layers} leaves layers out of gradient checkpointing, which "
                            "is off: drop --no-gradient-checkpointing or --plain-layers")
        if self.mlp_tiles < 1:
            raise UserError(f"--mlp-tiles {self.mlp_tiles} must be a positive whole number (1 = no tiling)")
        parse_save_every(self.save_every)
        if self.keep_checkpoints < 1:
            raise UserError(f"--keep-checkpoints {self.keep_checkpoints} must be at least 1 (the newest checkpoint is what --resume needs)")
        if not self.targets or any(not t.strip() for t in self.targets):
            raise UserError("--targets is empty: name modules such as q_proj,v_proj, or all-linear")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("_extra")
        d["targets"] = list(self.targets)
        if self.fixed is not None:
            d["fixed"] = list(self.fixed)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"_extra"}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: Path) -> None:
        from tinytune import rundir

        rundir.write_json(path, {"tinytune_run_format": rundir.FORMAT_VERSION, **self.to_dict()})

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        from tinytune import rundir

        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read the run's config ({e.__class__.__name__}: {e}); "
                            "is this a tinytune run directory?") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: not a tinytune run config (a JSON object is expected)")
        version = d.get("tinytune_run_format", rundir.FORMAT_VERSION)  # runs from before the field are format 1
        if version != rundir.FORMAT_VERSION:
            raise UserError(f"{path}: run format {version!r}, this tinytune reads format {rundir.FORMAT_VERSION}; "
                            "use the tinytune version that made the run")
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise UserError(f"{path}: cannot read the run's config ({e}); is this a tinytune run directory?") from None
