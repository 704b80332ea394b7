"""Budget + model shape → plan: technique, rank, bits, micro-batch, checkpointing, accumulation.

The decision rule prefers quality, then speed, and always fits (predicted need ≤ budget, where the
need is the estimator's peak plus allocator slack and the CUDA context):

A plan fits when the need is at most 95% of the budget: the other 5% is a safety margin.

1. Base precision: 16-bit if LoRA fits there at all (rank 8, micro-batch 1, gradient
   checkpointing), else 8-bit, else 4-bit (NF4 + double quantization).
2. Technique: LoRA. If LoRA does not fit even at 4 bits: LoRA-FA when activations are the larger
   share of the need (it keeps x·A instead of x), VeRA when weights and optimizer state are (it
   trains two vectors per layer); LoRA+ and Delta-LoRA cost what LoRA costs, full fine-tuning only
   when asked for (it rewrites every weight and forgets more on small data).
3. Rank: the largest of 64, 32, 16, 8 that fits (VeRA: 1024, 512, 256); past 64 LoRA on every
   linear layer gains little.
4. Micro-batch (≤ the effective batch of 8 sequences, the rest by accumulation) and gradient
   checkpointing: the pair with the best expected throughput that fits; checkpointing costs about a
   third more compute, a micro-batch of few tokens leaves the GPU idle. With checkpointing, the
   memory left over goes to plain last layers (not checkpointed): as many as fit.

Choices the user fixed (--technique, --rank, --bits, --seq-len, --batch, --no-gradient-checkpointing,
--plain-layers)
are kept and the rest is planned around them; when they cannot fit, the error says by how much.
When nothing fits, the error gives the smallest budget that would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from tinytune.config import GIB
from tinytune.errors import UserError
from tinytune.memory.estimate import CUDA_CONTEXT_BYTES, Estimate, ModelShape, Setup, estimate

BITS_ORDER = (16, 8, 4)
RANKS = (64, 32, 16, 8)
VERA_RANKS = (1024, 512, 256)
MICRO_BATCHES = (8, 4, 2, 1)
EFFECTIVE_BATCH = 8
DEFAULT_SEQ_CAP = 2048  # without --seq-len: plan for the longest example, at most this long
PLANNED = ("technique", "rank", "bits", "seq_len", "micro_batch", "grad_accum", "gradient_checkpointing", "plain_layers",
           "alpha")
OFFLOAD_TILE_TOKENS = 2048  # with offloading the MLP runs in tiles of about this many tokens
SAFETY_MARGIN = 0.05  # of the budget, kept free beyond the predicted need: the estimate's error bar
CHECKPOINT_COST = 1.33  # recomputing each layer's forward in backward: 4 passes of work instead of 3
QUALITY = {"full": "every weight trains", "lora": "LoRA", "lora-plus": "LoRA with B at a higher learning rate",
           "delta-lora": "LoRA whose base follows the update", "lora-fa": "LoRA with A frozen",
           "vera": "two vectors per layer on shared random matrices"}


@dataclass(frozen=True)
class Budget:
    bytes: int
    device: str  # "cuda" or "cpu"
    source: str  # what the figure is: "--vram 12GB", "--gpu rtx4070", "free memory of <GPU>"


@dataclass
class Fixed:
    """What the user pinned; None = the planner chooses."""

    technique: str | None = None
    rank: int | None = None
    bits: int | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    gradient_checkpointing: bool | None = None
    plain_layers: int | None = None
    """Last decoder layers left out of checkpointing; None = as many as the memory left over allows."""
    optim: str = "paged-adamw-8bit"
    dropout: float = 0.05
    targets: tuple[str, ...] = ("all-linear",)
    offload: bool = False
    mlp_tiles: int = 1
    packed: bool = False
    """Rows packed with several examples, each attending only to itself (Setup.packed)."""

    def named(self) -> str:
        flags = [f"--technique {self.technique}" if self.technique else "", f"--rank {self.rank}" if self.rank else "",
                 f"--bits {self.bits}" if self.bits else "", f"--batch {self.micro_batch}" if self.micro_batch else "",
                 "--no-gradient-checkpointing" if self.gradient_checkpointing is False else "",
                 f"--plain-layers {self.plain_layers}" if self.plain_layers else ""]
        return " ".join(f for f in flags if f)


@dataclass
class Candidate:
    setup: Setup
    est: Estimate
    grad_accum: int
    budget: int
    reason: str = ""

    @property
    def usable(self) -> int:
        """What a plan may use of the budget: all but the safety margin."""
        return int(self.budget * (1 - SAFETY_MARGIN))

    @property
    def fits(self) -> bool:
        return self.est.needed <= self.usable

    def shortfall(self) -> str:
        """How far a candidate that does not fit is over what it may use."""
        return (f"needs {self.est.needed / GIB:.2f} GiB, {(self.est.needed - self.usable) / GIB:.2f} GiB over "
                f"the {self.usable / GIB:.2f} GiB a plan may use")

    @property
    def headroom(self) -> int:
        return self.budget - self.est.needed

    def throughput(self) -> float:
        """Relative tokens/s: GPU utilisation grows with tokens per micro-batch, checkpointing costs a
        third for each layer it recomputes."""
        s = self.setup
        tokens = s.tokens
        layers = self.est.shape.layers
        checkpointed = (layers - min(s.plain_layers, layers)) / layers if s.gradient_checkpointing else 0.0
        return tokens / (tokens + 1024) / (1.0 + (CHECKPOINT_COST - 1.0) * checkpointed)

    def label(self) -> str:
        s = self.setup
        return f"{s.bits}-bit {s.technique} r{s.rank}" if s.technique != "full" else "16-bit full fine-tuning"

    def to_dict(self) -> dict:
        s = self.setup
        return {
            "technique": s.technique, "rank": s.rank, "bits": s.bits, "micro_batch": s.micro_batch,
            "grad_accum": self.grad_accum, "seq_len": s.seq_len, "gradient_checkpointing": s.gradient_checkpointing,
            "plain_layers": s.plain_layers,
            "optim": s.optim, "fits": self.fits, "predicted_peak_gib": round(self.est.peak / GIB, 3),
            "predicted_allocated_gib": round(self.est.allocator_peak / GIB, 3),
            "needed_gib": round(self.est.needed / GIB, 3), "headroom_gib": round(self.headroom / GIB, 3),
            "trainable_params": self.est.trainable_params,
            "breakdown_gib": {name: round(b / GIB, 4) for name, b, _ in self.est.table()}, "reason": self.reason,
        }


@dataclass
class Plan:
    shape: ModelShape
    budget: Budget
    chosen: Candidate
    runners_up: list[Candidate] = field(default_factory=list)
    activation_scale: float = 1.0

    def to_dict(self) -> dict:
        return {
            "model": self.shape.name, "budget_gib": round(self.budget.bytes / GIB, 3), "budget_source": self.budget.source,
            "device": self.budget.device, **self.chosen.to_dict(), "activation_scale": round(self.activation_scale, 4),
            "runners_up": [c.to_dict() for c in self.runners_up],
        }


def _candidate(shape: ModelShape, budget: Budget, fixed: Fixed, seq_len: int, technique: str, bits: int, rank: int,
               micro_batch: int, checkpointing: bool, scale: float, plain_layers: int | None = None) -> Candidate:
    plain = (fixed.plain_layers or 0) if plain_layers is None else plain_layers
    setup = Setup(technique=technique, rank=rank, bits=bits, micro_batch=micro_batch, seq_len=seq_len,
                  gradient_checkpointing=checkpointing, optim=fixed.optim, dropout=fixed.dropout,
                  targets=fixed.targets, device=budget.device, offload=fixed.offload and checkpointing,
                  mlp_tiles=fixed.mlp_tiles, packed=fixed.packed, plain_layers=plain if checkpointing else 0)
    est = estimate(shape, setup)
    if scale != 1.0:  # a calibration run measured activations differently from the formulas
        for key in ("activations", "backward working set"):
            est.components[key] = int(est.components[key] * scale)
    accum = fixed.grad_accum or max(1, math.ceil(EFFECTIVE_BATCH / micro_batch))
    return Candidate(setup, est, accum, budget.bytes)


def _max_rank(shape: ModelShape, technique: str, targets: tuple[str, ...] = ("all-linear",)) -> int:
    """The largest rank the adapted layers allow: each layer's smaller side, or for VeRA the smaller
    side of its shared matrices (as wide as the widest layer's input and output)."""
    sides = [shape.linears()[n] for n in Setup(technique=technique, targets=targets).adapted(shape)]
    if technique == "vera":
        return min(max(i for i, _ in sides), max(o for _, o in sides))
    return min(min(i, o) for i, o in sides)


def _best_in_family(shape, budget, fixed, seq_len, technique, bits, scale) -> tuple[Candidate, bool]:
    """The best candidate of one (technique, bits) family: rank first, then throughput.

    Returns (candidate, fits); when nothing fits, the smallest candidate of the family."""
    limit = _max_rank(shape, technique, fixed.targets)
    ranks = [fixed.rank] if fixed.rank else [r for r in (VERA_RANKS if technique == "vera" else RANKS)
                                               if r <= limit] or [1]
    if technique == "full":
        ranks = [0]
    mbs = [fixed.micro_batch] if fixed.micro_batch else [m for m in MICRO_BATCHES if m <= EFFECTIVE_BATCH]
    ckpts = [fixed.gradient_checkpointing] if fixed.gradient_checkpointing is not None else [True, False]
    if fixed.offload:
        ckpts = [True]  # offloading moves the checkpoints: it needs them
    smallest = None
    for rank in ranks:
        # Rank first: at the least-memory setting of everything else.
        least = _candidate(shape, budget, fixed, seq_len, technique, bits, rank, min(mbs), min(ckpts, key=lambda c: not c), scale)
        if smallest is None or least.est.needed < smallest.est.needed:
            smallest = least
        if not least.fits:
            continue
        options = [_candidate(shape, budget, fixed, seq_len, technique, bits, rank, mb, ck, scale) for mb in mbs for ck in ckpts]
        fitting = [_spend_on_plain_layers(c, shape, budget, fixed, scale) for c in options if c.fits]
        return max(fitting, key=lambda c: (c.throughput(), c.setup.micro_batch)), True
    return smallest, False


def _spend_on_plain_layers(c: Candidate, shape, budget, fixed, scale) -> Candidate:
    """A fitting checkpointed candidate with as many plain last layers as still fit (each runs its
    forward once instead of twice), unless the user chose the number."""
    if not c.setup.gradient_checkpointing or fixed.plain_layers is not None:
        return c
    s = c.setup
    best, lo, hi = c, 1, shape.layers - 1  # all layers plain is the no-checkpointing candidate
    while lo <= hi:  # more plain layers never need less memory: bisect for the most that fit
        mid = (lo + hi) // 2
        cand = _candidate(shape, budget, fixed, s.seq_len, s.technique, s.bits, s.rank, s.micro_batch, True, scale, mid)
        if cand.fits:
            best, lo = cand, mid + 1
        else:
            hi = mid - 1
    return best


def _families(fixed: Fixed) -> list[tuple[str, int]]:
    bits = [fixed.bits] if fixed.bits else list(BITS_ORDER)
    if fixed.technique:
        return [(fixed.technique, b) for b in bits if fixed.technique != "full" or b == 16]
    return [("lora", b) for b in bits]


def check_plain_layers(n: int, shape: ModelShape) -> None:
    if n >= shape.layers:
        raise UserError(f"--plain-layers {n}: {shape.name} has {shape.layers} decoder layers; use at most "
                        f"{shape.layers - 1}, or --no-gradient-checkpointing to checkpoint none")


def make_plan(shape: ModelShape, budget: Budget, seq_len: int, fixed: Fixed | None = None,
              activation_scale: float = 1.0) -> Plan:
    """Choose the plan by the rule in the module doc, or raise UserError saying what would fit."""
    fixed = fixed or Fixed()
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    if budget.device == "cuda" and budget.bytes <= CUDA_CONTEXT_BYTES:
        raise UserError(f"{budget.source}: {gib(budget.bytes)} is less than the CUDA context alone "
                        f"(≈{gib(CUDA_CONTEXT_BYTES)}); give the GPU's memory, e.g. --vram 12GB")
    check_plain_layers(fixed.plain_layers or 0, shape)
    if shape.max_context and seq_len > shape.max_context:
        raise UserError(f"--seq-len {seq_len} is beyond {shape.name}'s context of {shape.max_context} tokens; "
                        f"use --seq-len {shape.max_context} or less")
    if missing := [t for t in fixed.targets if t != "all-linear" and t not in shape.linears()]:
        raise UserError(f"--targets {','.join(missing)} matches no linear layer of the decoder; choose from "
                        f"{','.join(sorted(shape.linears()))} or all-linear")
    if fixed.rank and fixed.technique != "full":
        technique = fixed.technique or "lora"
        if fixed.rank > (limit := _max_rank(shape, technique, fixed.targets)):
            raise UserError(f"--rank {fixed.rank} is larger than {shape.name}'s {technique} layers allow; "
                            f"use --rank {limit} or less")
    tried: list[Candidate] = []
    chosen = None
    for technique, bits in _families(fixed):
        cand, fits = _best_in_family(shape, budget, fixed, seq_len, technique, bits, activation_scale)
        tried.append(cand)
        if fits and chosen is None:
            chosen = cand
    if chosen is None and not fixed.technique:
        # LoRA fits nowhere: trade where the memory goes, at the lowest precision allowed.
        low = min(b for _, b in _families(fixed))
        lora = next(c for c in tried if c.setup.bits == low)
        acts = lora.est.components["activations"] + lora.est.components["backward working set"]
        order = ("lora-fa", "vera") if acts > lora.est.peak - acts else ("vera", "lora-fa")
        for technique in order:
            cand, fits = _best_in_family(shape, budget, fixed, seq_len, technique, low, activation_scale)
            tried.append(cand)
            if fits and chosen is None:
                chosen = cand
    if chosen is None and budget.device == "cuda" and not fixed.offload and fixed.gradient_checkpointing is not False:
        # Nothing fits as is: move the checkpoints to host memory and tile the MLP (same gradients, slower).
        tiles = max(fixed.mlp_tiles, math.ceil(seq_len / OFFLOAD_TILE_TOKENS))
        try:
            return make_plan(shape, budget, seq_len, replace(fixed, offload=True, mlp_tiles=tiles), activation_scale)
        except UserError:
            pass  # report the plain attempt below: its figures are what the user asked about
    if chosen is None:
        least = min(tried, key=lambda c: c.est.needed)
        what = f"with {fixed.named()} " if fixed.named() else ""
        raise UserError(
            f"nothing fits in {gib(budget.bytes)} ({budget.source}) for {shape.name} at {seq_len} tokens {what}— the "
            f"smallest plan ({least.label()}, micro-batch {least.setup.micro_batch}, gradient checkpointing) "
            f"{least.shortfall()}; "
            + ("drop a fixed choice, " if what else "") + "shorten --seq-len or use a GPU with more memory"
        )
    chosen.reason = _reason(chosen, fixed)
    runners = _runners_up(shape, budget, fixed, seq_len, chosen, tried, activation_scale)
    return Plan(shape, budget, chosen, runners, activation_scale)


def _reason(c: Candidate, fixed: Fixed) -> str:
    s = c.setup
    why = []
    if fixed.bits:
        why.append(f"{s.bits}-bit as asked")
    elif s.bits == 16:
        why.append("16-bit base fits, so no quantization error")
    else:
        why.append(f"{s.bits}-bit: the largest base precision that fits")
    if s.technique != "full":
        why.append(f"rank {s.rank}" + (" as asked" if fixed.rank else " (largest that fits)" if s.rank != RANKS[0] and s.rank != VERA_RANKS[0] else ""))
    why.append(f"{s.micro_batch}×{s.seq_len} tokens per micro-batch × {c.grad_accum} accumulated")
    why.append("gradient checkpointing" + (" (needed to fit)" if s.gradient_checkpointing and fixed.gradient_checkpointing is None else "")
               if s.gradient_checkpointing else "no gradient checkpointing (fits without; ≈25% faster)")
    if s.plain_layers:
        why.append(f"the last {s.plain_layers} of {c.est.shape.layers} layers not checkpointed"
                   + (" as asked" if fixed.plain_layers is not None else " (memory to spare: they run once)"))
    if s.offload:
        why.append("checkpoints offloaded to host memory" + ("" if fixed.offload else " (needed to fit)"))
    if s.mlp_tiles > 1:
        why.append(f"MLP in {s.mlp_tiles} tiles")
    return f"{QUALITY[s.technique]}: " + "; ".join(why) + f"; {c.headroom / GIB:.2f} GiB headroom"


def _runners_up(shape, budget, fixed, seq_len, chosen: Candidate, tried: list[Candidate], scale) -> list[Candidate]:
    """Other families worth knowing about: the precision steps around the chosen one and the
    memory-saving techniques, each at its best setting, with why it was not chosen."""
    out = [c for c in tried if c is not chosen]
    seen = {(c.setup.technique, c.setup.bits) for c in tried}
    extra = [] if fixed.technique else [(t, chosen.setup.bits) for t in ("lora-fa", "vera")]
    if not fixed.technique and chosen.setup.bits == 16 and (not fixed.bits or fixed.bits == 16):
        extra.append(("full", 16))
    for technique, bits in extra:
        if (technique, bits) not in seen:
            out.append(_best_in_family(shape, budget, fixed, seq_len, technique, bits, scale)[0])
    for c in out:
        if not c.fits:
            c.reason = f"does not fit: {c.shortfall()}"
        elif c.setup.technique == "full":
            c.reason = "fits, but full fine-tuning is only used when asked for (--technique full)"
        elif c.setup.bits < chosen.setup.bits:
            c.reason = f"fits, but a {c.setup.bits}-bit base adds quantization error the {chosen.setup.bits}-bit plan avoids"
        elif c.setup.technique in ("lora-fa", "vera") and chosen.setup.technique == "lora":
            c.reason = f"fits, but {QUALITY[c.setup.technique]} learns less per step than LoRA, which fits"
        else:
            c.reason = "fits; the chosen plan ranks higher by the rule"
    return out[:5]


def fixed_from_config(cfg, explicit: set[str]) -> Fixed:
    """The choices of ``cfg`` that the user set (``explicit`` holds their field names)."""
    pick = lambda name: getattr(cfg, name) if name in explicit else None  # noqa: E731
    plain = pick("plain_layers")
    checkpointing = pick("gradient_checkpointing")
    return Fixed(technique=pick("technique"), rank=pick("rank"), bits=pick("bits"), micro_batch=pick("micro_batch"),
                 grad_accum=pick("grad_accum"), gradient_checkpointing=True if plain and checkpointing is None else checkpointing,
                 plain_layers=plain,
                 optim=cfg.optim, dropout=cfg.dropout, targets=cfg.targets,
                 offload=cfg.offload_checkpoints, mlp_tiles=cfg.mlp_tiles, packed=cfg.pack)


def apply(plan: Plan, cfg, pinned: set[str]) -> None:
    """Write the plan's choices into ``cfg`` (a TrainConfig), leaving what the user pinned."""
    s = plan.chosen.setup
    for name, value in (("technique", s.technique), ("bits", s.bits), ("micro_batch", s.micro_batch),
                        ("grad_accum", plan.chosen.grad_accum), ("gradient_checkpointing", s.gradient_checkpointing)):
        if name not in pinned:
            setattr(cfg, name, value)
    cfg.offload_checkpoints = cfg.offload_checkpoints or s.offload  # the planner only ever turns these on
    cfg.mlp_tiles = max(cfg.mlp_tiles, s.mlp_tiles)
    if "plain_layers" not in pinned:
        cfg.plain_layers = s.plain_layers  # 0 where the plan does not checkpoint (_candidate)
    if "rank" not in pinned and s.technique != "full":
        cfg.rank = s.rank
        if "alpha" not in pinned:
            cfg.alpha = 2.0 * s.rank
    cfg.__post_init__()  # re-validate the combination


def estimate_for(shape: ModelShape, cfg, device: str, seq_len: int | None = None) -> Estimate:
    return estimate(shape, Setup(technique=cfg.technique, rank=cfg.rank, bits=cfg.bits, micro_batch=cfg.micro_batch,
                                 seq_len=seq_len or cfg.seq_len, gradient_checkpointing=cfg.gradient_checkpointing,
                                 optim=cfg.optim, dropout=cfg.dropout, targets=cfg.targets, device=device,
                                 offload=cfg.offload_checkpoints and cfg.gradient_checkpointing, mlp_tiles=cfg.mlp_tiles,
                                 plain_layers=cfg.plain_layers, packed=cfg.pack))


def dynamic_bytes(est: Estimate) -> int:
    """What one micro-step adds over the loaded model: activations, working set and gradients."""
    c = est.components
    return c["activations"] + c["backward working set"] + c["gradients"]


def calibration_scale(est: Estimate, measured_dynamic: int) -> float:
    """How much larger activations measured than predicted (gradients are exact), within [0.5, 3]."""
    c = est.components
    acts = c["activations"] + c["backward working set"]
    return min(3.0, max(0.5, (measured_dynamic - c["gradients"]) / max(1, acts)))


def predicted(shape: ModelShape, cfg, device: str, plan: Plan | None) -> dict:
    """plan.json's prediction: the planner's when there was a budget, else the estimate of ``cfg``."""
    if plan is not None:
        d = plan.to_dict()
        return {k: d[k] for k in ("predicted_peak_gib", "predicted_allocated_gib", "needed_gib", "headroom_gib",
                                  "breakdown_gib", "reason", "budget_source", "activation_scale", "runners_up")}
    est = estimate_for(shape, cfg, device)
    return {"predicted_peak_gib": round(est.peak / GIB, 3), "predicted_allocated_gib": round(est.allocator_peak / GIB, 3),
            "needed_gib": round(est.needed / GIB, 3),
            "breakdown_gib": {name: round(b / GIB, 4) for name, b, _ in est.table()},
            "reason": "no budget given (--vram or --gpu): the configuration as set, not planned"}


def resolve_budget(vram: int | None, gpu_name: str | None, device: str = "cuda", vram_text: str | None = None) -> Budget | None:
    """The budget a user asked for: --vram, --gpu, else the free memory of the local GPU.

    Returns None on a CPU run without --vram or --gpu (nothing to plan against)."""
    from tinytune import presets

    if vram is not None and gpu_name is not None:
        raise UserError("--vram and --gpu both given: pass one (--gpu NAME plans for that card's memory)")
    if vram is not None:
        return Budget(vram, device, f"--vram {vram_text or f'{vram / GIB:g}GiB'}")
    if gpu_name is not None:
        profile = presets.gpu(gpu_name)
        return Budget(profile.vram_bytes, device, f"--gpu {profile.key}: {profile.name}")
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            return Budget(free, "cuda", f"free memory of {torch.cuda.get_device_name()}")
    return None


def render(plan: Plan) -> str:
    """The plan as a person reads it: chosen and runners-up side by side, component by component."""
    shape, budget = plan.shape, plan.budget
    plans = [plan.chosen, *plan.runners_up]
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    head = [c.label() for c in plans]
    sub = [f"mb {c.setup.micro_batch}×{c.grad_accum}" + (" ckpt" if c.setup.gradient_checkpointing else "")
           + (f" plain {c.setup.plain_layers}" if c.setup.plain_layers else "")
           + (" offload" if c.setup.offload else "") + (f" mlp/{c.setup.mlp_tiles}" if c.setup.mlp_tiles > 1 else "")
           for c in plans]
    names = list(dict.fromkeys(name for c in plans for name, _, _ in c.est.table()))
    width = max(16, *(len(h) + 2 for h in head + sub))
    first = max(len(n) for n in [*names, "predicted peak (GiB)"]) + 2
    lines = [
        f"plan for {shape.name} ({shape.n_params / 1e9:.2f}B parameters) in {gib(budget.bytes)} GiB ({budget.source}), "
        f"{plans[0].setup.seq_len} tokens per sequence, {'CUDA' if budget.device == 'cuda' else 'CPU'}",
        "",
        " " * first + "".join(f"{h:>{width}}" for h in ["chosen"] + ["runner-up"] * (len(plans) - 1)),
        " " * first + "".join(f"{h:>{width}}" for h in head),
        " " * first + "".join(f"{h:>{width}}" for h in sub),
    ]
    for name in names:
        row = []
        for c in plans:
            value = dict((n, b) for n, b, _ in c.est.table()).get(name)
            row.append("—" if value is None else gib(value))
        lines.append(f"{name:<{first}}" + "".join(f"{v:>{width}}" for v in row))
    lines.append(f"{'needed (GiB)':<{first}}" + "".join(f"{gib(c.est.needed):>{width}}" for c in plans))
    lines.append(f"{'headroom (GiB)':<{first}}" + "".join(f"{gib(c.headroom):>{width}}" for c in plans))
    lines.append(f"{'fits':<{first}}" + "".join(f"{'yes' if c.fits else 'no':>{width}}" for c in plans))
    lines.append("")
    lines.append(f"chosen: {plan.chosen.label()} — {plan.chosen.reason}")
    for c in plan.runners_up:
        lines.append(f"  {c.label()}: {c.reason}")
    lines.append(f"(needed = predicted peak + allocator slack + CUDA context; a plan fits within {1 - SAFETY_MARGIN:.0%} "
                 "of the budget)" if budget.device == "cuda" else "(CPU: activations in fp32, no CUDA context)")
    return "\n".join(lines)


def describe(cfg, model_config, device, dtype, n_trainable: int, total_steps: int, source) -> dict:
    """The plan a run uses, as plan.json records it; every figure says what it counts."""
    return {
        "technique": cfg.technique, "rank": cfg.rank, "alpha": cfg.alpha, "bits": cfg.bits,
        "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len, "grad_accum": cfg.grad_accum,
        "effective_batch": cfg.micro_batch * cfg.grad_accum,
        "max_tokens_per_step": cfg.micro_batch * cfg.grad_accum * cfg.seq_len,
        "gradient_checkpointing": cfg.gradient_checkpointing, "plain_layers": cfg.plain_layers,
        "offload_checkpoints": cfg.offload_checkpoints, "mlp_tiles": cfg.mlp_tiles, "optim": cfg.optim,
        "total_steps": total_steps,
        "trainable_params": n_trainable, "device": device.type, "compute_dtype": str(dtype).removeprefix("torch."),
        "budget_gib": round(cfg.vram / GIB, 3) if cfg.vram else None,
        "model": {"name": source.name, "kind": source.kind, "model_type": model_config.model_type,
                  "layers": model_config.num_hidden_layers, "hidden": model_config.hidden_size,
                  "vocab": model_config.vocab_size},
    }
