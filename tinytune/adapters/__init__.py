"""Adapters: one file per technique on the small interface in ``base``."""

from __future__ import annotations

import torch
from torch import nn

from tinytune.adapters.base import AdapterLayer, adapter_layers, attach, check_rank, target_linears
from tinytune.adapters.lora import LoRALinear
from tinytune.config import TrainConfig

__all__ = ["AdapterLayer", "LoRALinear", "adapter_layers", "apply", "trainable_state", "load_trainable_state"]


def apply(model: nn.Module, cfg: TrainConfig) -> dict[str, AdapterLayer]:
    """Attach ``cfg.technique`` to the targeted layers; the base stays frozen."""
    names = target_linears(model, cfg.targets)
    check_rank(cfg.rank, names, model)
    device = next(model.parameters()).device
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # adapter init depends on the seed only, not on what ran before
    adapters = attach(
        model, names, lambda _n, base: LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora).to(device)
    )
    torch.random.set_rng_state(gen_state)
    for layer in adapters.values():
        layer.train(model.training)  # new modules start in training mode; follow the model's
    return adapters


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable adapter tensors by full name (``...q_proj.lora_A``), on the CPU."""
    out = {}
    for name, layer in adapter_layers(model).items():
        for pname, p in layer.named_parameters(recurse=False):
            out[f"{name}.{pname}"] = p.detach().to("cpu").contiguous()
    return out


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    layers = adapter_layers(model)
    expected = {f"{n}.{p}" for n, l in layers.items() for p, _ in l.named_parameters(recurse=False)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(f"adapter weights do not fit this model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for key, value in state.items():
            name, _, pname = key.rpartition(".")
            param = getattr(layers[name], pname)
            if param.shape != value.shape:
                raise ValueError(f"adapter weight {key} has shape {tuple(value.shape)}, model expects {tuple(param.shape)}")
            param.copy_(value.to(param.device, param.dtype))
