"""Adapters: one file per technique on the small interface in ``base``.

``apply`` attaches the configured technique; ``param_groups`` gives the optimizer its groups (LoRA+
differs only there); ``state``/``load_state`` save and restore everything an adapter needs, shared
tensors (VeRA's A and B) included.
"""

from __future__ import annotations

import torch
from torch import nn

from tinytune import quant
from tinytune.adapters import full
from tinytune.adapters.base import AdapterLayer, adapter_layers, attach, check_rank, target_linears
from tinytune.adapters.delta_lora import DeltaLoRALinear
from tinytune.adapters.lora import LoRALinear
from tinytune.adapters.lora_fa import LoRAFALinear
from tinytune.adapters.vera import VeRALinear, shared_matrices
from tinytune.config import TrainConfig
from tinytune.errors import UserError

__all__ = ["AdapterLayer", "LoRALinear", "LoRAFALinear", "VeRALinear", "DeltaLoRALinear", "adapter_layers", "apply",
           "param_groups", "state", "load_state", "delta_start"]

SHARED_PREFIX = "shared."


def delta_start(cfg: TrainConfig, total_steps: int) -> int:
    """Delta-LoRA's K: as configured, else 500 scaled down to a tenth of a shorter run."""
    if cfg.delta_start is not None:
        return cfg.delta_start
    return min(500, max(1, total_steps // 10))


def apply(model: nn.Module, cfg: TrainConfig, total_steps: int = 0) -> dict[str, AdapterLayer]:
    """Attach ``cfg.technique`` to the targeted layers; the base stays frozen (except for ``full``)."""
    if cfg.technique == "full":
        full.enable(model)
        return {}
    names = target_linears(model, cfg.targets)
    device = next(model.parameters()).device
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # adapter init depends on the seed only, not on what ran before
    t = cfg.technique
    if t == "vera":
        shapes = [quant.linear_shape(model.get_submodule(n)) for n in names]
        max_in, max_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
        if cfg.rank > min(max_in, max_out):
            raise UserError(f"--rank {cfg.rank} is larger than VeRA's shared matrices allow ({max_out}×{max_in}); "
                            f"use --rank {min(max_in, max_out)} or less")
        shared = shared_matrices(cfg.rank, max_in, max_out, cfg.seed, device)
        model.tinytune_shared = shared
        make = lambda _n, base: VeRALinear(base, shared, cfg.vera_d_init, cfg.dropout)  # noqa: E731
    else:
        check_rank(cfg.rank, names, model)
        if t in ("lora", "lora-plus"):
            make = lambda _n, base: LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)  # noqa: E731
        elif t == "lora-fa":
            make = lambda _n, base: LoRAFALinear(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)  # noqa: E731
        elif t == "delta-lora":
            k = delta_start(cfg, total_steps)
            make = lambda _n, base: DeltaLoRALinear(base, cfg.rank, cfg.alpha, cfg.rslora, cfg.delta_lambda, k)  # noqa: E731
        else:  # pragma: no cover - TrainConfig validates the name
            raise UserError(f"--technique {t!r} is unknown")
    adapters = attach(model, names, lambda n, base: make(n, base).to(device))
    torch.random.set_rng_state(gen_state)
    for layer in adapters.values():
        layer.train(model.training)  # new modules start in training mode; follow the model's
    return adapters


def trainable(model: nn.Module) -> list[nn.Parameter]:
    if full.is_full(model):
        return full.parameters(model)
    return [p for layer in adapter_layers(model).values() for p in layer.trainable_parameters()]


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups. LoRA+ (arXiv 2402.12354): B (and 1-D vectors) at ratio × lr, as PEFT groups them."""
    if cfg.technique != "lora-plus":
        return [{"params": trainable(model)}]
    group_a, group_b = [], []
    for layer in adapter_layers(model).values():
        for name, p in layer.named_parameters(recurse=False):
            if p.requires_grad:
                (group_b if "lora_B" in name or p.ndim == 1 else group_a).append(p)
    return [{"params": group_a, "lr": cfg.lr}, {"params": group_b, "lr": cfg.lr * cfg.lora_plus_ratio}]


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors an adapter run saves, by name: every weight for ``full``, else each layer's
    ``state_tensors`` plus the shared ones (``shared.vera_A``)."""
    if full.is_full(model):
        return dict(model.named_parameters())  # tied weights appear once
    out = {f"{n}.{k}": t for n, layer in adapter_layers(model).items() for k, t in layer.state_tensors().items()}
    out.update({SHARED_PREFIX + k: t for k, t in getattr(model, "tinytune_shared", {}).items()})
    return out


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What ``load_state`` restores, detached, on the CPU and each in its own memory (the optimizer may
    hold trainable tensors as views of one flat tensor)."""
    return {k: t.detach().to("cpu", copy=True).contiguous() for k, t in _tensors(model).items()}


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    targets = _tensors(model)
    if set(tensors) != set(targets):
        missing, extra = sorted(set(targets) - set(tensors))[:3], sorted(set(tensors) - set(targets))[:3]
        raise ValueError(f"adapter weights do not fit this model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for key, value in tensors.items():
            target = targets[key]
            if target.shape != value.shape:
                raise ValueError(f"adapter weight {key} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
            target.copy_(value.to(target.device, target.dtype))
